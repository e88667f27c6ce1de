"""``python -m ptv2_kernels.train [train|recipes|tasks] ...`` (what torchrun runs)."""

import sys

from .cli import main

sys.exit(main())
