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
- ``full_optimizer_state()`` / ``load_full_optimizer_state(saved)``: the same for the
  optimizer state, keyed by parameter name (:func:`optimizer_state_by_name`), so a checkpoint
  resumes on any number of ranks; ``loop_state()`` / ``load_loop_state(d)``: the small state an
  engine carries from step to step (the same on every rank), for checkpoints;
- ``indexed_epoch(epoch) -> bool``: called by the training loop as epoch ``epoch`` (1-based)
  begins; True asks for that epoch's batches without augmentation and with the samples'
  indices in the training set, passed as ``step(x, y, index=...)`` (engines that keep
  per-sample state: ``auxvar``); the default is False;
- ``train()`` / ``eval()``, and the attributes ``optimizer`` (rank-local, for LR schedulers),
  ``rank``, ``world_size``, ``comm`` (:class:`~resprune.parallel.comm.Comm` of the ranks),
  ``stats`` (what the last step did: for the stage engines ``times_s`` per phase,
  ``comm_wait_s``, ``sent_bytes``);
- stage engines (:class:`~resprune.parallel.stage.StagedEngine`: ``mgrit``, ``pipeline``,
  ``local``) add ``memory_bytes()`` / ``gather_memory_bytes()`` (resident bytes per rank),
  ``measured_layer_time()``, ``repartition()`` and ``prune_()``.

Engines register with their config class, ``@register_engine("name", config=NameConfig)``;
:func:`engine_config` builds a config from a recipe's ``engine_options``.

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

from ..prune import recalibrate_bn_
from ..serialization import CheckpointError
from .comm import Comm, SingleComm

logger = logging.getLogger(__name__)

__all__ = ["Engine", "SerialEngine", "create_engine", "list_engines", "register_engine", "engine_config",
           "engine_config_class", "optimizer_state_by_name", "load_optimizer_state_by_name"]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
OptimizerFactory = Callable[[list[tuple[str, nn.Parameter]]], torch.optim.Optimizer]
Regularizer = Callable[[nn.Module], torch.Tensor]

_ENGINES: dict[str, Callable[..., "Engine"]] = {}
_CONFIGS: dict[str, type | None] = {}


def register_engine(name: str, config: type | None = None):
    """Class decorator: make an engine available to :func:`create_engine` under ``name``;
    ``config`` is its settings dataclass (``None``: the engine takes none), which
    :func:`engine_config` builds from a recipe's ``engine_options``; it becomes the class's
    ``config_class``."""

    def deco(cls):
        _ENGINES[name] = cls
        _CONFIGS[name] = config
        cls.config_class = config
        return cls

    return deco


def list_engines() -> list[str]:
    """Names of the registered engines (the ``--engine`` vocabulary)."""
    return sorted(_ENGINES)


def engine_config_class(name: str) -> type | None:
    """The config dataclass engine ``name`` registered (``None`` when it takes none)."""
    if name not in _ENGINES:
        raise ValueError(f"unknown engine {name!r}; available: {', '.join(list_engines())}")
    return _CONFIGS[name]


def engine_config(name: str, options: dict | None = None, input_size: tuple[int, ...] | None = None) -> Any:
    """Engine ``name``'s config built from ``options`` (a recipe's ``engine_options``);
    ``input_size`` (the data's sample shape) fills the config's ``input_size`` field when
    it has one and ``options`` does not set it. Raises ``ValueError`` naming unknown
    engines, unknown keys (with the valid ones) and bad values.

    Example:
        >>> engine_config("mgrit", {"cf": 2}, (1, 1, 16, 16)).input_size
        (1, 1, 16, 16)
    """
    from dataclasses import fields

    cls = engine_config_class(name)
    opts = dict(options or {})
    if cls is None:
        if opts:
            raise ValueError(f"engine_options {sorted(opts)} given, but engine {name!r} takes none")
        return None
    valid = {f.name for f in fields(cls)}
    unknown = sorted(set(opts) - valid)
    if unknown:
        raise ValueError(f"unknown engine_options key(s) {', '.join(unknown)} for engine {name!r}; "
                         f"valid: {', '.join(sorted(valid))}")
    if "input_size" in valid:
        if input_size is not None:
            opts.setdefault("input_size", tuple(input_size))
        if opts.get("input_size") is not None:
            opts["input_size"] = tuple(opts["input_size"])
    try:
        return cls(**opts)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"engine_options: {exc}") from exc


def create_engine(
    name: str,
    model: nn.Module,
    loss_fn: LossFn,
    optimizer_factory: OptimizerFactory,
    config: Any = None,
    regularizer: Regularizer | None = None,
    **kwargs: Any,
) -> "Engine":
    """Build engine ``name`` (:func:`list_engines`) for ``model``; collective for
    distributed engines (every rank builds the same model with the same weights first).
    ``config`` may also be a dict of the engine's options (:func:`engine_config`)."""
    if name not in _ENGINES:
        raise ValueError(f"unknown engine {name!r}; available: {', '.join(list_engines())}")
    if isinstance(config, dict):
        config = engine_config(name, config)
    return _ENGINES[name](model, loss_fn, optimizer_factory, config, regularizer=regularizer, **kwargs)


def optimizer_state_by_name(
    optimizer: torch.optim.Optimizer, named: list[tuple[str, nn.Parameter]]
) -> dict:
    """``optimizer``'s state in a form that does not depend on which process owns which
    parameter: ``{"state_by_name": {name: {key: value}}, "param_groups": [hyper-parameters]}``
    (per-parameter state such as momentum buffers keyed by the names in ``named``, tensors on
    the CPU; each group's settings without its parameters, e.g. the current ``lr``)."""
    names = {id(p): n for n, p in named}
    state = {names[id(p)]: {k: v.detach().cpu().clone() if torch.is_tensor(v) else v for k, v in s.items()}
             for p, s in optimizer.state.items() if id(p) in names}
    groups = [{k: v for k, v in g.items() if k not in ("params", "param_names")} for g in optimizer.param_groups]
    return {"state_by_name": state, "param_groups": groups}


def load_optimizer_state_by_name(
    optimizer: torch.optim.Optimizer, named: list[tuple[str, nn.Parameter]], saved: dict
) -> None:
    """Restore what :func:`optimizer_state_by_name` saved, for the parameters in ``named``
    (the state of other names belongs to other ranks); group settings by group index."""
    if len(saved["param_groups"]) != len(optimizer.param_groups):
        raise CheckpointError(f"cannot restore the optimizer: the checkpoint has {len(saved['param_groups'])} "
                         f"parameter groups, this optimizer {len(optimizer.param_groups)}")
    for group, hyper in zip(optimizer.param_groups, saved["param_groups"]):
        group.update(hyper)
    for name, p in named:
        s = saved["state_by_name"].get(name)
        if s is None:
            optimizer.state.pop(p, None)
            continue
        optimizer.state[p] = {k: v.to(device=p.device, dtype=p.dtype)
                              if torch.is_tensor(v) and v.is_floating_point() and k != "step" else v
                              for k, v in s.items()}


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
        self.comm: Comm = SingleComm()
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

    def indexed_epoch(self, epoch: int) -> bool:
        """Whether epoch ``epoch`` (1-based) trains on non-augmented batches with sample
        indices (``step(x, y, index=...)``); engines keeping per-sample state override it."""
        return False

    #: True when the BatchNorm running statistics an engine accumulates in training are those
    #: of the exact forward pass (serial, converged MGRIT). Simultaneous MGRIT accumulates
    #: them from inexact states; the training loop then calls :meth:`recalibrate_bn`.
    exact_bn_stats = True

    def _exact_forward(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def recalibrate_bn(self, batches) -> None:
        """Re-estimate every BatchNorm's running statistics from exact forward passes over
        ``batches`` (inputs only; cumulative average), collectively. Parameters are untouched."""
        recalibrate_bn_(self.model, batches, forward=self._exact_forward)

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

    def full_optimizer_state(self) -> dict | None:
        """Collective: every rank's optimizer state, keyed by parameter name
        (:func:`optimizer_state_by_name`), on rank 0; ``None`` elsewhere."""
        mine = optimizer_state_by_name(self.optimizer, list(self.local_named_parameters()))
        parts = self.comm.gather_object(mine)
        if parts is None:
            return None
        merged = {name: s for part in parts for name, s in part["state_by_name"].items()}
        return {"state_by_name": merged, "param_groups": mine["param_groups"]}

    def load_full_optimizer_state(self, saved: dict | None) -> None:
        """Collective: every rank takes the state of the parameters it owns from rank 0's
        ``saved`` (what :meth:`full_optimizer_state` returned, on any number of ranks; other
        ranks pass ``None``). ``None`` on rank 0 leaves every optimizer as it is."""
        saved = self.comm.broadcast_object(saved if self.rank == 0 else None, 0)
        if saved is not None:
            load_optimizer_state_by_name(self.optimizer, list(self.local_named_parameters()), saved)

    def loop_state(self) -> dict:
        """State carried from step to step besides weights and optimizer (same on every rank)."""
        return {}

    def load_loop_state(self, state: dict) -> None:
        """Restore :meth:`loop_state` (keys it does not know are ignored)."""

    @staticmethod
    def _ordered(model: nn.Module, parts: dict[str, torch.Tensor]) -> "OrderedDict[str, torch.Tensor]":
        keys = list(model.state_dict().keys())
        missing = [k for k in keys if k not in parts]
        if missing:
            raise RuntimeError(f"state entries owned by no rank: {missing[:5]}")
        return OrderedDict((k, parts[k]) for k in keys)


@register_engine("serial", config=None)
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
