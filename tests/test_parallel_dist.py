"""Multi-process tests of the mgrit engine against the serial engine (torchrun, gloo, CPU).

One torchrun launch per process count runs every check of tests/dist_worker_mgrit.py
(start-up costs ~4-7 s per launch on a 2-core machine); each launch has a timeout and uses
``--standalone`` (a free local port).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("dist_worker_mgrit.py")
ODE_WORKER = Path(__file__).with_name("dist_worker_ode.py")
RESUME_WORKER = Path(__file__).with_name("dist_worker_resume.py")


def torchrun_results(worker: Path, nproc: int, expected: int) -> None:
    """Run ``worker`` on ``nproc`` gloo ranks; every ``RESULT`` line must PASS, ``expected`` of them."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           "--nproc_per_node", str(nproc), str(worker)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    except subprocess.TimeoutExpired as e:  # a hung collective must not block CI
        pytest.fail(f"torchrun timed out after 240 s:\n{e.stdout}\n{e.stderr}")
    out = r.stdout + r.stderr
    results = [line for line in out.splitlines() if line.startswith("RESULT")]
    print("\n".join(results))
    assert results, out[-4000:]
    assert not [line for line in results if "FAIL" in line], "\n".join(results)
    assert len(results) == expected, out[-4000:]
    assert r.returncode == 0, out[-4000:]


@pytest.mark.dist
@pytest.mark.parametrize("nproc", [2, 4])
def test_mgrit_matches_serial(nproc: int) -> None:
    torchrun_results(WORKER, nproc, 10)


@pytest.mark.dist
@pytest.mark.parametrize("nproc", [2, 4])
def test_mgrit_ode_options_match_serial(nproc: int) -> None:
    """The ODE-regime options and the re-partition (tests/ode_checks.py), one launch each."""
    from ode_checks import N_CHECKS

    torchrun_results(ODE_WORKER, nproc, N_CHECKS)


@pytest.mark.dist
def test_mgrit_trainer_resumes_exactly() -> None:
    """Straight vs checkpoint + resume under the mgrit engine (tests/dist_worker_resume.py)."""
    torchrun_results(RESUME_WORKER, 2, 4)


@pytest.mark.dist
@pytest.mark.parametrize("nproc", [2, 4])
def test_consensus_agents_as_processes(nproc: int) -> None:
    """NEXT and D-PSGD over gloo ranks equal the threads simulation (tests/dist_worker_consensus.py)."""
    from dist_worker_consensus import N_CHECKS

    torchrun_results(Path(__file__).with_name("dist_worker_consensus.py"), nproc, N_CHECKS)
