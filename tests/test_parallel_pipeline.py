"""The pipeline engine (torch.distributed.pipelining, GPipe / 1F1B).

Exactness is defined against the serial computation with the same micro-batches: in train
mode BatchNorm normalises each micro-batch on its own and updates its running statistics
once per micro-batch (GPipe), so the reference accumulates gradients over the same
micro-batches in one process (``microbatched_step``); with one micro-batch it is the serial
engine itself. Single process here (P = 1 runs the reference path); 2 and 4 gloo processes in
tests/dist_worker_pipeline.py (float64 1e-10, float32 1e-5)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import resprune as rp
from resprune.parallel import PipelineConfig, create_engine
from resprune.parallel.pipeline import microbatched_step, split_count

WORKER = Path(__file__).with_name("dist_worker_pipeline.py")


def _sgd(p):
    return torch.optim.SGD(p, lr=0.05, momentum=0.9)


def _resnet():
    torch.manual_seed(0)
    return rp.create_model("resnet20").double()


def test_split_count():
    assert [split_count(b, 4) for b in (64, 30, 29, 3, 1)] == [4, 3, 1, 3, 1]
    assert split_count(12, 1) == 1 and split_count(360, 8) == 8


def test_one_process_equals_serial_with_one_microbatch():
    base = _resnet()
    x, y = torch.randn(8, 3, 16, 16, dtype=torch.float64), torch.randint(0, 10, (8,))
    ser = create_engine("serial", copy.deepcopy(base), F.cross_entropy, _sgd, regularizer=rp.LayerScaleL1(1e-3))
    eng = create_engine("pipeline", copy.deepcopy(base), F.cross_entropy, _sgd,
                        PipelineConfig(microbatches=1, input_size=(1, 3, 16, 16)), regularizer=rp.LayerScaleL1(1e-3))
    for _ in range(2):
        assert eng.step(x, y) == pytest.approx(ser.step(x, y), rel=1e-14)
    sd, ssd = eng.full_state_dict(), ser.full_state_dict()
    assert max(float((sd[k].double() - ssd[k].double()).abs().max()) for k in ssd) <= 1e-12
    assert eng.stats["microbatches"] == 1 and eng.stats["times_s"]["total"] > 0
    assert set(eng.measured_layer_time()) == {n for n, _ in eng.seq}  # forward seconds per layer


def test_microbatches_follow_the_reference():
    """Four micro-batches: per-micro-batch BN, gradients accumulated (microbatched_step)."""
    base = _resnet()
    x, y = torch.randn(12, 3, 16, 16, dtype=torch.float64), torch.randint(0, 10, (12,))
    ref = copy.deepcopy(base)
    eng = create_engine("pipeline", copy.deepcopy(base), F.cross_entropy, _sgd,
                        PipelineConfig(microbatches=4, input_size=(1, 3, 16, 16)))
    loss = eng.forward_backward(x, y)
    assert loss == pytest.approx(microbatched_step(ref, F.cross_entropy, x, y, 4), rel=1e-14)
    g = dict(ref.named_parameters())
    assert max(float((p.grad - g[n].grad).abs().max()) for n, p in eng.local_named_parameters()) <= 1e-14
    for (k, a), b in zip(eng.model.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(a, b), k  # running statistics: 4 updates, as the reference
    full = create_engine("serial", copy.deepcopy(base), F.cross_entropy, _sgd)
    assert abs(full.forward_backward(x, y) - loss) > 1e-6  # full-batch BN is another computation


@pytest.mark.dist
@pytest.mark.parametrize("nproc", [2, 4])
def test_pipeline_matches_the_reference(nproc: int) -> None:
    """tests/dist_worker_pipeline.py: 1F1B and GPipe in float64 (1e-10) and float32 (1e-5),
    one micro-batch = serial, eval, the schedule torch runs, memory per rank, prune_."""
    from dist_worker_pipeline import N_CHECKS
    from test_parallel_dist import torchrun_results

    torchrun_results(WORKER, nproc, N_CHECKS)
