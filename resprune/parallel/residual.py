"""How a block tells the layer-parallel engines its residual structure (no type tests).

MGRIT's coarse propagator needs to know whether a layer is a residual step
``y = act(x + r(x))`` and what ``r`` and ``act`` are. A block says so itself through a small
duck-typed protocol (what ``fuse()`` is for fusion):

- ``block.residual_form() -> (r, relu) | None``: ``r`` a callable with
  ``block(x) == relu?(x + r(x))`` for every ``x`` (``relu`` says whether a ReLU follows the
  sum), or ``None`` when the block is not of that form (e.g. its shortcut changes the shape).
  Blocks without the method are treated as generic steps ``f`` (MGRIT then coarsens them
  as ``u + m·(f(u) − u)``, which is unstable with ReLU for large ``m``).
- optional ``block.average_residual(blocks, x) -> Tensor | None``: one step standing for the
  run ``blocks`` (``blocks[0]`` is ``block``) built from their averaged parameters
  (``MGRITConfig.coarse_params="average"``), ``None`` when the run does not allow it.

:class:`resprune.ResConv2d` (identity shortcut) implements both. Example of a user block::

    class MyBlock(nn.Module):
        def forward(self, x):
            return F.relu(x + self.body(x))

        def residual_form(self):
            return self.body, True

Example:
    >>> import torch, resprune as rp
    >>> from resprune.parallel.residual import residual_form
    >>> r, relu = residual_form(rp.ResConv2d(4, 4))
    >>> relu, residual_form(rp.ResConv2d(4, 8, stride=2))
    (True, None)
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["residual_form", "coarse_step", "averaged_coarse_step", "relu_after_sum"]

Branch = Callable[[torch.Tensor], torch.Tensor]


def residual_form(block: nn.Module) -> tuple[Branch, bool] | None:
    """``(r, relu)`` from ``block.residual_form()``; ``None`` for blocks without the method
    or not of the form ``relu?(x + r(x))``."""
    fn = getattr(block, "residual_form", None)
    if fn is None:
        return None
    form = fn()
    if form is None:
        return None
    r, relu = form
    return r, bool(relu)


def relu_after_sum(block: nn.Module) -> bool:
    """Whether ``block`` is a residual step with a ReLU after the sum (the mask the coarse
    adjoint step linearises)."""
    form = residual_form(block)
    return form is not None and form[1]


def coarse_step(block: nn.Module, m: int, u: torch.Tensor) -> torch.Tensor:
    """One step standing for ``m`` layers like ``block`` (parameters injected from it):
    ``act(u + m·r(u))`` for a residual block (the Euler step times ``m``, the activation
    kept), ``u + m·(f(u) − u)`` for any other block."""
    form = residual_form(block)
    if form is None:
        return u + m * (block(u) - u)
    r, relu = form
    y = u + m * r(u)
    return F.relu(y) if relu else y


def averaged_coarse_step(blocks: list[nn.Module], u: torch.Tensor) -> torch.Tensor | None:
    """The first block's ``average_residual(blocks, u)``: one step built from the averaged
    parameters of the run ``blocks``; ``None`` when the block has no such method or the run
    does not allow it (e.g. different kinds of layers)."""
    fn = getattr(blocks[0], "average_residual", None)
    return None if fn is None else fn(blocks, u)
