"""Rank process for tests/test_parallel_dist.py: the converged-equivalence checks of the
mgrit engine's ODE-regime options (tests/ode_checks.py) under torchrun (gloo, CPU, float64).
Prints one ``RESULT`` line per check on rank 0 and leaves through ``finalize``."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from helpers import RankChecks, run_rank  # noqa: E402
from ode_checks import run_checks  # noqa: E402
from resprune.parallel.comm import DistComm  # noqa: E402


def main() -> int:
    check = RankChecks()
    run_checks(DistComm(), check)
    return check.exit_code


if __name__ == "__main__":
    run_rank(main)
