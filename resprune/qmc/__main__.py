"""``python -m resprune.qmc study ...`` (the same as ``resprune qmc study ...``)."""

import sys

from resprune.qmc.cli import main

if __name__ == "__main__":
    sys.exit(main())
