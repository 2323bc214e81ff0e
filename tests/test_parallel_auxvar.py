"""The auxvar engine (auxiliary-variable serial-parallel hybrid): the checks of
tests/auxvar_checks.py on simulated ranks (threads), 2 and 4 gloo processes
(tests/dist_worker_auxvar.py); config errors, bytes, memory and the training loop here."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from auxvar_checks import B, CHECKS, batch, chain, make
from resprune.parallel import AuxVarConfig, engine_config
from test_parallel_dist import torchrun_results
from test_parallel_mgrit import run_threads

WORKER = Path(__file__).with_name("dist_worker_auxvar.py")


@pytest.mark.parametrize("P", [2, 3])
@pytest.mark.parametrize("name", sorted(CHECKS))
def test_check_on_threads(name, P):
    results = run_threads(P, lambda r, comm: CHECKS[name](comm))
    assert all(ok for ok, _ in results), results


def test_one_rank_is_serial():
    """K = 1: no boundary, no λ; a parallel step is a serial step of the whole net."""
    results = run_threads(1, lambda r, comm: CHECKS["correction_is_serial"](comm))
    assert results[0][0], results
    eng = make(None, chain())
    x, y = batch()
    eng.step(x, y, torch.arange(B))
    assert eng.lam is None and eng.stats["phase"] == "parallel" and eng.stats["penalty"] == 0.0


@pytest.mark.parametrize("f", [1, 2])
def test_bytes_and_memory(f):
    """A parallel step sends one coarse state each way per boundary (B·d/f² float64 values);
    the rank owning the boundary stores λ (B·d) and, AL, μ (B·d/f²) per sample seen."""
    base, (x, y) = chain(), batch()

    def run(r, comm):
        eng = make(comm, base, variant="al", downsample=f)
        idx = torch.arange(B)
        eng.step(x, y, idx)
        init = eng.stats["sent_bytes"]
        eng.step(x, y, idx)
        return init, eng.stats["sent_bytes"], eng.memory_bytes()["aux"]

    (i0, s0, m0), (i1, s1, m1) = run_threads(2, run)
    d = 8 * 8 * 8
    assert (i0, i1) == (B * d * 8, 0)  # initialisation: the full state forward only
    assert s0 == s1 == B * d // f ** 2 * 8
    assert m1 == B * d * 8 + B * d // f ** 2 * 8 + 4 * B and m0 == 2 * B  # + flags: 2 bytes a sample a store


def test_config_errors():
    with pytest.raises(ValueError, match="variant"):
        AuxVarConfig(variant="admm")
    with pytest.raises(ValueError, match="aux_step"):
        AuxVarConfig(aux_step=1.5)
    with pytest.raises(ValueError, match="beta_max"):
        AuxVarConfig(beta=10.0, beta_max=1.0)
    with pytest.raises(ValueError, match="unknown engine_options"):
        engine_config("auxvar", {"lambda_lr": 1})
    with pytest.raises(ValueError, match="downsample=3.*divisible by 3"):
        run_threads(2, lambda r, comm: make(comm, chain(), downsample=3))


def test_beta_schedule_and_phases():
    eng = make(None, chain(), parallel_epochs=2, beta=0.5, beta_growth=4.0, beta_max=1.0)
    assert eng.indexed_epoch(1) and eng.beta == 0.5 and not eng.exact_bn_stats
    assert eng.indexed_epoch(2) and eng.beta == 1.0
    assert not eng.indexed_epoch(3) and eng.exact_bn_stats


@pytest.mark.dist
@pytest.mark.parametrize("nproc", [2, 4])
def test_auxvar_dist(nproc):
    torchrun_results(WORKER, nproc, len(CHECKS))
