"""``python -m cotrr_ray.data convert ...`` (see `cotrr_ray.data.convert`)."""

import sys

from cotrr_ray.data.convert import main

sys.exit(main())
