"""The engine contract (DESIGN.md §5), the serial reference engine and the engine registry.

Every rank calls, collectively:

- ``forward_backward(x, y) -> float``: zeroes the owned gradients, computes the loss (task
  loss plus the optional regularizer, summed over ranks: the same number on every rank) and
  leaves gradients in the parameters this rank owns;
- ``step(x, y) -> float``: the same plus ``optimizer.step()``;
- ``eval_forward(x) -> Tensor``: logits of the whole batch on every rank, computed with the
  model in eval mode (running BN statistics; the previous mode is restored);
- ``local_named_parameters()``: (name, parameter) owned by this rank, names as in the model;
- ``full_state_dict()``: the whole model's ``state_dict`` (parameters and buffers, the
  original keys, tensors on CPU) on rank 0, ``None`` elsewhere;
- ``load_full_state_dict(sd)``: every rank loads its part (``sd`` may be ``None`` on ranks
  other than 0: rank 0's copy is then broadcast);
- ``train()`` / ``eval()``, and the attributes ``optimizer`` (rank-local, for LR schedulers),
  ``rank``, ``world_size``, ``stats`` (what the last step did).

``create_engine(name, model, loss_fn, optimizer_factory, config=None, regularizer=None)``:

- ``loss_fn(logits, y) -> scalar tensor``;
- ``optimizer_factory(named_params) -> torch.optim.Optimizer`` receives the owned
  ``[(name, param), ...]`` (torch optimizers accept named parameters directly; a factory
  may also split them into groups by name, e.g. no weight decay on ``.scale``);
- ``regularizer(part) -> scalar tensor`` is applied to an ``nn.Module`` holding the layers
  this rank owns, e.g. ``resprune.LayerScaleL1(1e-4)``; it must be a sum over layers so
  that the ranks' parts add up to the whole model's value.

Example:
    >>> import torch, resprune as rp
    >>> from resprune.parallel import create_engine
    >>> model = rp.create_model("resnet20")
    >>> eng = create_engine("serial", model, torch.nn.functional.cross_entropy,
    ...                     lambda p: torch.optim.SGD(p, lr=0.1), regularizer=rp.LayerScaleL1(1e-4))
    >>> loss = eng.step(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3]))
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Any, Callable, Iterator

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

logger = logging.getLogger(__name__)

__all__ = ["Engine", "SerialEngine", "create_engine", "list_engines", "register_engine"]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
OptimizerFactory = Callable[[list[tuple[str, nn.Parameter]]], torch.optim.Optimizer]
Regularizer = Callable[[nn.Module], torch.Tensor]

_ENGINES: dict[str, Callable[..., "Engine"]] = {}


def register_engine(name: str):
    """Class decorator: make an engine available to :func:`create_engine` under ``name``."""

    def deco(cls):
        _ENGINES[name] = cls
        return cls

    return deco


def list_engines() -> list[str]:
    return sorted(_ENGINES)


def create_engine(
    name: str,
    model: nn.Module,
    loss_fn: LossFn,
    optimizer_factory: OptimizerFactory,
    config: Any = None,
    regularizer: Regularizer | None = None,
    **kwargs: Any,
) -> "Engine":
    """Build engine ``name`` (``"serial"``, ``"mgrit"``) for ``model``; collective for
    distributed engines (every rank builds the same model with the same weights first)."""
    if name not in _ENGINES:
        raise ValueError(f"unknown engine {name!r}; available: {', '.join(list_engines())}")
    return _ENGINES[name](model, loss_fn, optimizer_factory, config, regularizer=regularizer, **kwargs)


class Engine:
    """Base class: the parts of the contract every engine shares."""

    name = "base"

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        optimizer_factory: OptimizerFactory,
        regularizer: Regularizer | None = None,
    ) -> None:
        self.model, self.loss_fn, self.regularizer = model, loss_fn, regularizer
        self.optimizer_factory = optimizer_factory
        self.rank, self.world_size = 0, 1
        self.stats: dict[str, Any] = {}
        self.optimizer: torch.optim.Optimizer

    def _make_optimizer(self) -> None:
        self.optimizer = self.optimizer_factory(list(self.local_named_parameters()))

    def _zero_grad(self) -> None:
        for _, p in self.local_named_parameters():
            p.grad = None

    def local_named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:  # pragma: no cover
        raise NotImplementedError

    def forward_backward(self, x: torch.Tensor, y: torch.Tensor) -> float:  # pragma: no cover
        raise NotImplementedError

    #: True when the BatchNorm running statistics an engine accumulates in training are those
    #: of the exact forward pass (serial, converged MGRIT). Simultaneous MGRIT accumulates
    #: them from inexact states; the training loop then calls :meth:`recalibrate_bn`.
    exact_bn_stats = True

    def _exact_forward(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    @torch.no_grad()
    def recalibrate_bn(self, batches) -> None:
        """Re-estimate every BatchNorm's running statistics from exact forward passes over
        ``batches`` (inputs only; cumulative average), collectively. Parameters are untouched."""
        bns = [m for m in self.model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
        modes = {m: m.training for m in self.model.modules()}
        momenta = [m.momentum for m in bns]
        for m in bns:
            m.reset_running_stats()
            m.momentum = None
        self.model.eval()
        for m in bns:
            m.train()
        try:
            for x in batches:
                self._exact_forward(x)
        finally:
            for m, mom in zip(bns, momenta):
                m.momentum = mom
            for m, t in modes.items():
                m.training = t

    def eval_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Exact logits in eval mode, on every rank (collective)."""
        modes = {m: m.training for m in self.model.modules()}
        self.model.eval()
        try:
            with torch.no_grad():
                return self._exact_forward(x)
        finally:
            for m, t in modes.items():
                m.training = t

    def step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """``forward_backward`` then the optimizer step; returns the loss."""
        loss = self.forward_backward(x, y)
        self.optimizer.step()
        return loss

    def train(self, mode: bool = True) -> "Engine":
        self.model.train(mode)
        return self

    def eval(self) -> "Engine":
        return self.train(False)

    @staticmethod
    def _ordered(model: nn.Module, parts: dict[str, torch.Tensor]) -> "OrderedDict[str, torch.Tensor]":
        keys = list(model.state_dict().keys())
        missing = [k for k in keys if k not in parts]
        if missing:
            raise RuntimeError(f"state entries owned by no rank: {missing[:5]}")
        return OrderedDict((k, parts[k]) for k in keys)


@register_engine("serial")
class SerialEngine(Engine):
    """The whole model on one process: the reference every other engine is tested against.

    It never communicates (``rank`` 0, ``world_size`` 1), so it may also run on every rank of
    a distributed job as a local reference. ``config`` is ignored.
    """

    name = "serial"

    def __init__(self, model, loss_fn, optimizer_factory, config=None, regularizer=None) -> None:
        super().__init__(model, loss_fn, optimizer_factory, regularizer)
        self._make_optimizer()

    def local_named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        yield from self.model.named_parameters()

    def forward_backward(self, x: torch.Tensor, y: torch.Tensor) -> float:
        self._zero_grad()
        loss = self.loss_fn(self.model(x), y)
        if self.regularizer is not None:
            loss = loss + self.regularizer(self.model)
        loss.backward()
        return float(loss.detach())

    @torch.no_grad()
    def _exact_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def full_state_dict(self) -> "OrderedDict[str, torch.Tensor]":
        return OrderedDict((k, v.detach().cpu().clone()) for k, v in self.model.state_dict().items())

    def load_full_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(sd)
