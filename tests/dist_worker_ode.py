"""Rank process for tests/test_parallel_dist.py: the converged-equivalence checks of the
mgrit engine's ODE-regime options (tests/ode_checks.py) under torchrun (gloo, CPU, float64).
Prints one ``RESULT`` line per check on rank 0 and leaves through ``finalize``."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from ode_checks import run_checks  # noqa: E402
from resprune.parallel import init_distributed  # noqa: E402
from resprune.parallel.comm import DistComm  # noqa: E402


def main() -> int:
    rank, world, _, _ = init_distributed(timeout_s=120)
    torch.set_num_threads(1)
    failures: list[str] = []

    def check(name: str, ok: bool, detail: str) -> None:
        if rank == 0:
            print(f"RESULT {'PASS' if ok else 'FAIL'} P={world} {name}: {detail}", flush=True)
        if not ok:
            failures.append(name)

    run_checks(DistComm(), check)
    return 1 if failures else 0


if __name__ == "__main__":
    from helpers import run_rank

    run_rank(main)
