"""How much each removable layer matters, beside its ``|scale|``: the branch's output gain and
a first-order (Taylor) estimate of the loss change when the scale goes to 0. The pruner
(:func:`resprune.prune_`, ``PruneConfig.rank``) orders units by them.
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import ResPruneError
from .layers import ResConv2d

__all__ = ["PruneError", "gain", "taylor_scores"]


class PruneError(ResPruneError, ValueError):
    """A pruning request that cannot be met or makes no sense; nothing was removed."""


def gain(m: ResConv2d) -> float:
    """``|s|·√mean_c(γ_c² + β_c²)``: the RMS of ``s·BN(z)`` under its batch statistics."""
    bn = m.bn
    if bn.weight is None:
        return abs(float(m.effective_scale.detach()))
    rms = (bn.weight.detach().pow(2) + bn.bias.detach().pow(2)).mean().sqrt()
    return float(m.effective_scale.detach().abs() * rms)


def taylor_scores(model: nn.Module, batches, loss_fn=None) -> dict[str, float]:
    """``mean_b (s·∂L_b/∂s)²`` for every removable scale, over ``batches`` of ``(x, y)``: the
    first-order (Taylor) estimate of how much the loss changes when ``s`` is set to 0, squared
    per batch so that gradients of opposite sign do not cancel. The model runs in eval mode
    (BatchNorm running statistics untouched); its gradients are left cleared."""
    import torch.nn.functional as F

    loss_fn = loss_fn or F.cross_entropy
    scales = {n: m.scale for n, m in model.named_modules() if isinstance(m, ResConv2d) and m.removable}
    was = model.training
    model.eval()
    total = {n: 0.0 for n in scales}
    count = 0
    try:
        for x, y in batches:
            grads = torch.autograd.grad(loss_fn(model(x).float(), y), list(scales.values()), allow_unused=True)
            for (n, s), g in zip(scales.items(), grads):
                total[n] += float((s.detach() * g).pow(2)) if g is not None else 0.0
            count += 1
    finally:
        model.train(was)
    if not count:
        raise PruneError("taylor_scores: no batches given")
    return {n: v / count for n, v in total.items()}
