"""``python -m cotrr_ray.batch --bundle URI --input PATH --output PATH`` (see `cotrr_ray.batch.cli`)."""

import sys

from cotrr_ray.batch.cli import main

sys.exit(main())
