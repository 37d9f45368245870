"""`python -m cotrr_ray.evaluate`: the evaluation CLI's stable entry point (`cotrr_ray.training.evaluate`)."""

from cotrr_ray.training.evaluate import main

if __name__ == "__main__":
    main()
