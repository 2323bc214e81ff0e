"""``python -m resprune`` (also what torchrun runs: ``torchrun ... -m resprune train ...``)."""

import sys

from .cli import main

sys.exit(main())
