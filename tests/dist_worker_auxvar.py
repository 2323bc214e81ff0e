"""Rank process for tests/test_parallel_auxvar.py: every check of tests/auxvar_checks.py under
torchrun (gloo, CPU); one ``RESULT`` line per check on rank 0, PASS only when every rank passed."""

from __future__ import annotations

from auxvar_checks import CHECKS
from helpers import RankChecks, run_rank
from resprune.parallel.comm import DistComm


def main() -> int:
    check = RankChecks()
    comm = DistComm()
    for name, fn in CHECKS.items():
        ok, detail = fn(comm)
        failed = comm.all_reduce_sum([0.0 if ok else 1.0])[0]
        check(name, failed == 0, f"rank 0: {detail}; ranks failing: {int(failed)}")
    return check.exit_code


if __name__ == "__main__":
    run_rank(main)
