"""``fuse`` / ``fuse_``: every ResConv2d (and ConvBN2d) becomes one plain ``nn.Conv2d``.

A layer with ``act=True`` becomes ``Sequential(Conv2d, ReLU)``. Conv → BatchNorm2d pairs
that were never converted (for example in a model built outside resprune) are folded too,
found on a torch.fx trace. The fused model computes the eval-mode output of the original.

Example:
    >>> import torch, resprune as rp
    >>> m = rp.create_model("resnet20").eval()
    >>> d = rp.fuse(m)
    >>> any(isinstance(x, (rp.ResConv2d, torch.nn.BatchNorm2d)) for x in d.modules())
    False
"""

from __future__ import annotations

import copy
import logging

import torch
from torch import nn

from .layers import ConvBN2d, ResConv2d, _bn_factors, _make_conv
from .models.convert import find_conv_bn_pairs, set_submodule

logger = logging.getLogger(__name__)

__all__ = ["fuse", "fuse_"]


def _fold_leftover_bn(model: nn.Module) -> None:
    if not any(isinstance(m, nn.BatchNorm2d) for m in model.modules()):
        return
    try:
        plan = find_conv_bn_pairs(model)
    except Exception as exc:  # untraceable model: report, do not guess
        logger.warning("fuse_: BatchNorm2d left unfused, torch.fx could not trace the model: %s", exc)
        return
    for conv_name, bn_name in plan.pairs.items():
        conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
        t, shift = _bn_factors(bn)
        w = conv.weight * t.reshape(-1, 1, 1, 1)
        b = shift + (conv.bias * t if conv.bias is not None else 0.0)
        fused = _make_conv(conv, w, b)
        set_submodule(model, conv_name, fused)
        set_submodule(model, bn_name, nn.Identity())
    left = [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    if left:
        logger.warning("fuse_: BatchNorm2d not after a conv, left as it is: %s", ", ".join(left))


@torch.no_grad()
def fuse_(model: nn.Module) -> nn.Module:
    """Fuse ``model`` in place (it is put in eval mode) and return it."""
    model.eval()
    targets = [(n, m) for n, m in model.named_modules() if isinstance(m, (ResConv2d, ConvBN2d))]
    for name, m in targets:
        conv = m.fuse()
        new: nn.Module = nn.Sequential(conv, nn.ReLU()) if m.act else conv
        if name:
            set_submodule(model, name, new)
        else:
            raise ValueError("fuse_ cannot replace the model itself; use fuse(model)")
    _fold_leftover_bn(model)
    arch = getattr(model, "resprune_arch", None)
    if arch is not None:
        arch["ops"].append(["fuse"])
    return model.eval()


def fuse(model: nn.Module) -> nn.Module:
    """A fused copy of ``model``; the original is untouched.

    A bare ResConv2d or ConvBN2d is returned as its fused conv (plus ReLU when it has one).
    """
    if isinstance(model, (ResConv2d, ConvBN2d)):
        conv = model.fuse()
        return (nn.Sequential(conv, nn.ReLU()) if model.act else conv).eval()
    return fuse_(copy.deepcopy(model))
