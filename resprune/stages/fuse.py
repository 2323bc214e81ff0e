"""The ``fuse`` stage: the final model (``finetuned.pt``, else ``pruned.pt``) → ``fused.pt``,
``sparse.pt`` → ``fused_unpruned.pt`` (docs/run-dir.md).

Fusion is exact up to float rounding, so each fused model is checked against the model it
was fused from by their logits on a fixed batch (as export checks onnxruntime against
torch): the max |difference| may be at most ``FUSE_RTOL`` of the largest |logit| (of 1 when
the logits are smaller). Accuracy is no check: one image whose top-2 logits are nearly tied
flips on rounding alone (0.28 points of the 360-image demo test set), while a fusion error
that moves every logit by 0.1% changes no prediction.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from ..config import Recipe
from ..errors import ResPruneError
from ..fuse import fuse
from ..rundir import RunDir
from ..serialization import load, save
from ..train.loop import evaluate, select_device
from ..train.pipeline import _loaders, deploy_info, loader_input_size, model_stats
from ..util import training_mode

logger = logging.getLogger(__name__)

__all__ = ["stage_fuse", "check_fused", "FuseMismatch", "FUSE_RTOL"]

FUSE_RTOL = 1e-4  # float32 rounding of a fused ResNet-56 is ~1e-6 of the largest |logit|
CHECK_BATCH, CHECK_SEED = 8, 1234  # the fixed batch: standard normal inputs of this seed


class FuseMismatch(ResPruneError, RuntimeError):
    """A fused model does not compute what the model it was fused from computes."""


@torch.no_grad()
def check_fused(model: nn.Module, fused: nn.Module, input_size: tuple[int, ...], what: str = "fused model",
                rtol: float = FUSE_RTOL) -> dict:
    """Compare the logits of ``fused`` with those of ``model`` on :data:`CHECK_BATCH` standard
    normal inputs of shape ``input_size[1:]`` (seed :data:`CHECK_SEED`), both in eval mode
    (their modes are restored), each on the device it is on: pass CPU models (a GPU's TF32
    convolutions round more than fusion does). Raises :class:`FuseMismatch` when the max
    |difference| exceeds ``rtol·max(max|logit|, 1)``; returns ``{"max_abs_diff",
    "max_abs_logit", "rtol"}``."""
    x = torch.randn((CHECK_BATCH, *input_size[1:]), generator=torch.Generator().manual_seed(CHECK_SEED))
    logits = []
    for m in (model, fused):
        p = next(m.parameters(), None)
        with training_mode(m, False):
            logits.append(m(x if p is None else x.to(p.device, p.dtype)).float().cpu())
    ref, got = logits
    diff, scale = float((got - ref).abs().max()), float(ref.abs().max())
    if not diff <= rtol * max(scale, 1.0):  # NaN fails too
        raise FuseMismatch(f"{what} disagrees with the model it was fused from: max |logit difference| {diff:.3g} "
                           f"on a fixed batch, {diff / max(scale, 1e-30):.2g} of the largest |logit| {scale:.3g} "
                           f"(tolerance {rtol:g}); fusion is exact up to rounding, so this is a fusion bug")
    return {"max_abs_diff": diff, "max_abs_logit": scale, "rtol": rtol}


def stage_fuse(recipe: Recipe, run: RunDir) -> dict:
    """Fuse the final model (``finetuned.pt``, ``pruned.pt`` when there is none) →
    ``fused.pt``, and ``sparse.pt`` → ``fused_unpruned.pt``, each checked by
    :func:`check_fused`; their test accuracy, MACs and params go to the ``fused`` and
    ``unpruned_fused`` entries of ``metrics.json``."""
    final = "finetuned.pt" if (run / "finetuned.pt").is_file() else "pruned.pt"
    if final == "pruned.pt" and (run.records().get("finetune") or {}).get("state") == "invalidated":
        logger.warning("[fuse] the fine-tuned model was invalidated (its pruned.pt was replaced): fusing the "
                       "pruned model without fine-tuning; run `resprune finetune %s` first to fine-tune it", run.path)
    out, models = {}, {}
    device = select_device(recipe.train.device)
    train_l, test_l = _loaders(recipe, device)
    size = loader_input_size(train_l)
    for src, dst, key in (("sparse.pt", "fused_unpruned.pt", "unpruned_fused"), (final, "fused.pt", "fused")):
        model = load(run.need(src, "fuse")).to(device).eval()
        loss, acc = evaluate(model, test_l)
        fused = fuse(model)
        floss, facc = evaluate(fused, test_l)
        fused = fused.cpu()
        check = check_fused(model.cpu(), fused, size, f"{run / dst} (fused from {src})")
        models[dst] = (fused, {**deploy_info(recipe, test_l), "test_accuracy": facc})
        out[key] = {"test_acc": facc, "test_loss": floss, "source_acc": acc, "from": src, "check": check,
                    **model_stats(fused, size)}
    with run.writing("fuse", {}, inputs=["sparse.pt", final]):
        for dst, (fused, deploy) in models.items():
            save(fused, run / dst, extra={"input_size": list(size), "deploy": deploy})
        for key, values in out.items():
            run.update_metrics(key, values)
    return out
