"""`python -m cotrr_ray.registry ...`: the registry CLI (`cotrr_ray.bundles.cli`), at a short name."""

from cotrr_ray.bundles.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
