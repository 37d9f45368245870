import sys

from cotrr_ray.experiments.cli import main

sys.exit(main())
