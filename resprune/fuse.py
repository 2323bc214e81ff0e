"""``fuse`` / ``fuse_``: every module with a ``fuse()`` method is replaced by what it returns.

The walker is duck-typed (as timm's ``reparameterize_model``): a child module that has a
``fuse()`` method is replaced by the module that method returns, which must compute the
child's eval-mode output; children without one are searched in turn. ResConv2d and ConvBN2d
return one plain ``nn.Conv2d`` (``Sequential(Conv2d, ReLU)`` when ``act=True``), and a
block class of your own fuses the same way once it has such a method. Conv → BatchNorm2d
pairs left after that (for example in a model built outside resprune) are folded by
``torch.nn.utils.fusion.fuse_conv_bn_eval``, found on a torch.fx trace. The fused model
computes the eval-mode output of the original.

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
from torch.nn.utils.fusion import fuse_conv_bn_eval

from .models.arch import ArchRecord
from .models.convert import find_conv_bn_pairs

logger = logging.getLogger(__name__)

__all__ = ["fuse", "fuse_"]


def _fuse_method(m: nn.Module):
    fn = getattr(m, "fuse", None)
    return fn if callable(fn) else None


def _fused(m: nn.Module) -> nn.Module:
    new = _fuse_method(m)()
    if not isinstance(new, nn.Module):
        raise TypeError(f"{type(m).__name__}.fuse() returned a {type(new).__name__}, not an nn.Module")
    return new


def _fuse_children(module: nn.Module) -> None:
    """Replace every child with a ``fuse()`` method by its result, depth first."""
    for name, child in list(module.named_children()):
        if _fuse_method(child) is not None:
            child = _fused(child)
            setattr(module, name, child)
        _fuse_children(child)


def _fold_leftover_bn(model: nn.Module) -> None:
    if not any(isinstance(m, nn.BatchNorm2d) for m in model.modules()):
        return
    try:
        plan = find_conv_bn_pairs(model)
    except Exception as exc:  # untraceable model: report, do not guess
        logger.warning("fuse_: BatchNorm2d left unfused, torch.fx could not trace the model: %s", exc)
        return
    for conv_name, bn_name in plan.pairs.items():
        conv = fuse_conv_bn_eval(model.get_submodule(conv_name), model.get_submodule(bn_name))
        conv.bias.requires_grad_(conv.weight.requires_grad)  # a conv without bias gets a trainable one
        model.set_submodule(conv_name, conv)
        model.set_submodule(bn_name, nn.Identity())
    left = [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    if left:
        logger.warning("fuse_: BatchNorm2d not after a conv, left as it is: %s", ", ".join(left))


@torch.no_grad()
def fuse_(model: nn.Module) -> nn.Module:
    """Fuse ``model`` in place (it is put in eval mode) and return it."""
    if _fuse_method(model) is not None:
        raise ValueError(f"fuse_ cannot replace the model itself ({type(model).__name__} has a fuse() method); "
                         "use fuse(model)")
    record = ArchRecord.of(model)
    edit = record.edit_before(model) if record is not None else None
    model.eval()
    _fuse_children(model)
    model.eval()  # the modules fuse() returned are new
    _fold_leftover_bn(model)
    if record is not None:
        record.append(model, ["fuse"], edit)
    return model


def fuse(model: nn.Module) -> nn.Module:
    """A fused copy of ``model``; the original is untouched.

    A model that itself has a ``fuse()`` method (a bare ResConv2d or ConvBN2d) gives what
    that method returns for a copy of it.
    """
    if _fuse_method(model) is not None:
        with torch.no_grad():
            new = _fused(copy.deepcopy(model).eval())
            _fuse_children(new)
        return new.eval()
    return fuse_(copy.deepcopy(model))
