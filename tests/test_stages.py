"""The stages as functions (resprune.stages): the fuse stage's logit check; every stage one
function of its own module, listed in the package."""

from __future__ import annotations

import importlib

import pytest
import torch

import resprune as rp
from helpers import randomize_
from resprune.errors import ResPruneError
from resprune.rundir import STAGES
from resprune.stages.fuse import FUSE_RTOL, FuseMismatch, check_fused


def test_check_fused_accepts_rounding_and_restores_modes():
    m = randomize_(rp.create_model("resnet20"), seed=3)
    fused = rp.fuse(m)
    m.train()
    res = check_fused(m, fused, (1, 3, 32, 32))
    assert m.training and not fused.training  # each back in the mode it had
    assert res["rtol"] == FUSE_RTOL and res["max_abs_logit"] > 0
    assert res["max_abs_diff"] <= 1e-2 * FUSE_RTOL * max(1.0, res["max_abs_logit"])  # rounding: far below it


@pytest.mark.parametrize("factor", [1.003, float("nan")])
def test_check_fused_refuses_a_model_that_computes_something_else(factor):
    """0.3% on one convolution's weights moves the logits far more than rounding does, though
    it need not change a single prediction (the accuracy check it replaces let such errors
    through); NaN logits are refused too."""
    m = randomize_(rp.create_model("resnet20"), seed=3).eval()
    fused = rp.fuse(m)
    with torch.no_grad():
        next(x for x in fused.modules() if isinstance(x, torch.nn.Conv2d)).weight.mul_(factor)
    with pytest.raises(FuseMismatch, match="fused.pt disagrees with the model it was fused from") as e:
        check_fused(m, fused, (1, 3, 32, 32), "runs/x/fused.pt")
    assert isinstance(e.value, ResPruneError) and isinstance(e.value, RuntimeError)


def test_every_stage_is_one_function_of_its_own_module():
    import resprune.stages as stages

    for name in STAGES:
        mod = importlib.import_module(f"resprune.stages.{name}")
        fn = getattr(stages, f"stage_{name}")
        assert fn is getattr(mod, f"stage_{name}") and fn.__module__ == mod.__name__
        assert [n for n in mod.__all__ if n.startswith("stage_")] == [f"stage_{name}"]
