"""Stages: one rank's contiguous piece of a model, and the engine base built on them.

As in ``torch.distributed.pipelining``, a :class:`Stage` owns one piece of the model (a
contiguous range of ``model.layer_sequence()``) and an engine's schedule drives it. The
model object stays whole on every rank (its structure, names and the training loop's view of
it), but the layers a rank does not own are *released* to the meta device: no storage, so
parameter and buffer memory per rank falls as ranks are added (scalars stay) (:meth:`Stage.resident_bytes`,
``engine.memory_bytes()``). A released layer comes back by itself when weights are loaded
into it (``model.load_state_dict`` on rank 0 after a gather), and is released again at the
next step; :meth:`StagedEngine.sync_model` brings every layer back on every rank (pruning).

Release happens at the first step (or :meth:`StagedEngine.memory_bytes`), not when the
engine is built: the training loop moves the model to its device after building the engine,
and a meta tensor cannot be moved.

:class:`StagedEngine` holds what the stage engines (``mgrit``, ``pipeline``, ``local``) share:
partition (balanced by counted cost), ownership, the gathered state dict, the pipelined exact
forward, per-layer timing, re-partition after pruning, phase timers and memory counters;
:class:`StageConfig` the checks their settings share.
"""

from __future__ import annotations

import itertools
import logging
import time
import weakref
from collections import OrderedDict
from dataclasses import asdict
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import nn

from .comm import Comm, DistComm, SingleComm
from .engines import Engine
from .partition import LayerInfo, analyze_layers, balanced_bounds, layer_sequence
from .rebalance import gather_layer_time, repartition_engine

logger = logging.getLogger(__name__)

__all__ = ["Stage", "StagedEngine", "StageConfig", "PhaseClock", "default_comm", "tensor_bytes",
           "infer_input_size"]


def default_comm() -> Comm:
    """The default process group when torch.distributed is initialised, else one process."""
    if dist.is_available() and dist.is_initialized():
        return DistComm()
    return SingleComm()


def tensor_bytes(tensors) -> int:
    """Bytes held by ``tensors`` (each storage once; meta tensors hold none)."""
    seen, total = set(), 0
    for t in tensors:
        if t is None or t.is_meta:
            continue
        key = t.untyped_storage().data_ptr()
        if key in seen:
            continue
        seen.add(key)
        total += t.untyped_storage().nbytes()
    return total


def infer_input_size(model: nn.Module, spatial: int = 32) -> tuple[int, ...]:
    """``(1, C, spatial, spatial)`` with ``C`` the input channels of the model's first
    convolution (``(1, F)`` for a model that starts with a linear layer): the sample shape a
    partition is balanced for when a config gives none (only relative costs matter)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            return (1, m.in_channels, spatial, spatial)
        if isinstance(m, nn.Linear):
            return (1, m.in_features)
    raise ValueError("cannot infer the input size of a model without conv or linear layers; set input_size")


class StageConfig:
    """Base of the stage engines' settings (frozen dataclasses): the ``input_size`` check
    they share (call :meth:`_check_input_size` from ``__post_init__``) and :meth:`to_dict`."""

    def _check_input_size(self) -> None:
        """``input_size`` as a tuple of ints that includes the batch dimension (``None``
        stays: the engine infers it from the model, :func:`infer_input_size`)."""
        size = self.input_size  # type: ignore[attr-defined]
        if size is None:
            return
        if len(size) < 2:
            raise ValueError(f"input_size must include the batch dimension, got {size!r}")
        object.__setattr__(self, "input_size", tuple(int(s) for s in size))

    def to_dict(self) -> dict:
        return asdict(self)


class PhaseClock:
    """Wall seconds per named phase of one step: ``lap(name)`` charges the time since the
    previous lap to ``name``; ``times()`` adds ``total``."""

    def __init__(self) -> None:
        self.start = self.last = time.perf_counter()
        self.phases: dict[str, float] = {}

    def lap(self, name: str) -> float:
        now = time.perf_counter()
        dt = now - self.last
        self.phases[name] = self.phases.get(name, 0.0) + dt
        self.last = now
        return dt

    def times(self) -> dict[str, float]:
        return {**self.phases, "total": time.perf_counter() - self.start}


def _release(layer: nn.Module) -> None:
    """Every parameter and buffer of ``layer`` with more than one element onto the meta device."""
    for mod in layer.modules():
        for name, p in list(mod._parameters.items()):
            if p is not None and not p.is_meta and p.numel() > 1:
                mod._parameters[name] = nn.Parameter(p.detach().to("meta"), requires_grad=p.requires_grad)
        for name, b in list(mod._buffers.items()):
            if b is not None and not b.is_meta and b.numel() > 1:
                mod._buffers[name] = b.to("meta")


def _materialize_on_load(stage: "Stage"):
    """A load-state-dict pre-hook that gives a released layer storage on the stage's device.
    A plain function holding a weak reference: a deep copy of the model (profiling, fusion)
    copies the hook, not the stage."""
    ref = weakref.ref(stage)

    def hook(module: nn.Module, *args: Any) -> None:
        if any(t.is_meta for t in itertools.chain(module.parameters(), module.buffers())):
            st = ref()
            module.to_empty(device=st.device if st is not None else torch.device("cpu"))
            if st is not None:
                st.released = False

    return hook


class Stage:
    """Layers ``[lo, hi)`` of ``seq`` (a model's layer sequence), owned by ``rank``.

    ``part`` is an ``nn.ModuleList`` of the owned layers (what regularizers see);
    ``named_parameters()``/``state_dict()`` use the model's own names.
    """

    def __init__(self, model: nn.Module, seq: list[tuple[str, nn.Module]], bounds: list[int], rank: int) -> None:
        self.model, self.seq, self.bounds, self.rank = model, seq, list(bounds), rank
        self.lo, self.hi = bounds[rank], bounds[rank + 1]
        self.layers = seq[self.lo:self.hi]
        self.part = nn.ModuleList([m for _, m in self.layers])
        self.released = False
        self._hooks: dict[int, Any] = {}  # id(layer) -> load-hook handle

    @property
    def device(self) -> torch.device:
        """Where the owned layers are now (the training loop may move the model after the
        engine was built)."""
        first = next(itertools.chain(self.part.parameters(), self.part.buffers()), None)
        return first.device if first is not None else torch.device("cpu")

    @property
    def others(self) -> list[tuple[str, nn.Module]]:
        """The layers other ranks own."""
        return self.seq[:self.lo] + self.seq[self.hi:]

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        for name, m in self.layers:
            for pn, p in m.named_parameters():
                yield f"{name}.{pn}", p

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The owned layers' parameters and buffers under the model's keys, on the CPU."""
        return {f"{name}.{k}": v.detach().cpu().clone() for name, m in self.layers
                for k, v in m.state_dict().items()}

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        """Load the owned layers' entries of a whole-model ``sd``."""
        for name, m in self.layers:
            pre = f"{name}."
            m.load_state_dict({k[len(pre):]: v for k, v in sd.items() if k.startswith(pre)})

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        for _, m in self.layers:
            s = m(s)
        return s

    # ---- memory --------------------------------------------------------------------------
    def release_(self) -> None:
        """Move the tensors of the layers other ranks own to the meta device (no storage);
        scalars stay (a layer scale, a BN counter: what a log may read, as stale values).
        Loading weights into such a layer (``load_state_dict``) brings it back on this
        stage's device."""
        if self.released:
            return
        for _, m in self.others:
            _release(m)
            if id(m) not in self._hooks:
                self._hooks[id(m)] = m.register_load_state_dict_pre_hook(_materialize_on_load(self))
        self.released = True

    def materialize_(self) -> None:
        """Give every released layer storage again (uninitialised: load weights next)."""
        for _, m in self.others:
            if any(t.is_meta for t in itertools.chain(m.parameters(), m.buffers())):
                m.to_empty(device=self.device)
        self.released = False

    def close(self) -> None:
        """Remove the load hooks (the stage is being replaced)."""
        for h in self._hooks.values():
            h.remove()
        self._hooks.clear()

    def resident_bytes(self) -> dict[str, int]:
        """Bytes of the model's parameters and buffers that have storage on this rank."""
        return {"params": tensor_bytes(self.model.parameters()), "buffers": tensor_bytes(self.model.buffers())}


class StagedEngine(Engine):
    """Base of the engines whose ranks each own one :class:`Stage`.

    Subclasses set ``name``, call ``super().__init__`` and implement ``forward_backward``;
    ``config_class`` (set by :func:`~resprune.parallel.engines.register_engine`) is the
    settings type: ``config=None`` means its defaults, another type is a ``TypeError``.
    ``_on_partition()`` rebuilds what depends on the stage bounds (called at start and after
    :meth:`repartition`), ``_extra_modules()`` lists modules an engine adds (auxiliary heads).
    """

    config_class: type | None = None

    def __init__(self, model, loss_fn, optimizer_factory, config=None, regularizer=None,
                 comm: Comm | None = None) -> None:
        super().__init__(model, loss_fn, optimizer_factory, regularizer)
        self.config = self._settings(config)
        self.comm = comm if comm is not None else default_comm()
        self.rank, self.world_size = self.comm.rank, self.comm.world_size
        self.layer_time: dict[str, float] = {}  # measured seconds per owned layer (EMA)
        self._setup_partition(None)
        self._make_optimizer()
        logger.info("%s rank %d/%d owns layers %d..%d (%s .. %s)", self.name, self.rank, self.world_size,
                    self.lo, self.hi - 1, self.seq[self.lo][0], self.seq[self.hi - 1][0])

    def _settings(self, config: Any) -> Any:
        """``config``, or the defaults of ``config_class`` for ``None``."""
        cls = self.config_class
        if cls is None:
            return config
        cfg = config if config is not None else cls()
        if not isinstance(cfg, cls):
            raise TypeError(f"{self.name} engine needs {cls.__name__} settings, got {type(cfg).__name__}")
        return cfg

    @property
    def input_size(self) -> tuple[int, ...]:
        size = getattr(self.config, "input_size", None)
        return tuple(size) if size is not None else infer_input_size(self.model)

    def _setup_partition(self, bounds: list[int] | None) -> None:
        """Layer sequence, analysis, rank bounds (``None``: balanced by counted cost), stage."""
        if getattr(self, "stage", None) is not None:
            self.stage.close()
        self.seq = layer_sequence(self.model)
        self.info = analyze_layers(self.model, self.input_size)
        self._infos = {tuple(self.input_size[1:]): self.info}
        self.bounds = list(bounds) if bounds is not None else balanced_bounds(self.info.costs, self.world_size)
        self.stage = Stage(self.model, self.seq, self.bounds, self.rank)
        self.lo, self.hi, self.part = self.stage.lo, self.stage.hi, self.stage.part
        self._on_partition()

    def _on_partition(self) -> None:
        """Hook: rebuild what depends on the bounds."""

    def _extra_modules(self) -> list[tuple[str, nn.Module]]:
        """Hook: ``(name, module)`` an engine trains besides the model's layers."""
        return []

    def _ensure_released(self) -> None:
        self.stage.release_()

    # ---- ownership -----------------------------------------------------------------------
    def local_named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        yield from self.stage.named_parameters()
        for name, m in self._extra_modules():
            for pn, p in m.named_parameters():
                yield f"{name}.{pn}", p

    def describe(self) -> str:
        return (f"{self.name}: {len(self.seq)} layers over {self.world_size} ranks, bounds {self.bounds}, "
                f"{self.config}")

    def _layer_info(self, x: torch.Tensor) -> LayerInfo:
        key = tuple(x.shape[1:])
        if key not in self._infos:
            info = analyze_layers(self.model, (1, *key))
            if info.residual != self.info.residual:
                raise ValueError(f"input shape {key} changes which layers keep their shape")
            self._infos[key] = info
        return self._infos[key]

    def _record_layer_time(self, ltime: dict[int, float]) -> None:
        """Fold this step's seconds per owned layer (by index) into ``layer_time`` (EMA)."""
        for n, sec in ltime.items():
            name = self.seq[n][0]
            old = self.layer_time.get(name)
            self.layer_time[name] = sec if old is None else 0.8 * old + 0.2 * sec

    # ---- memory and counters ---------------------------------------------------------------
    def memory_bytes(self) -> dict[str, int]:
        """This rank's resident bytes: model parameters and buffers with storage here (the
        owned layers once the others are released), the engine's own modules, gradients and
        optimizer state."""
        self._ensure_released()
        mem = self.stage.resident_bytes()
        extra = [m for _, m in self._extra_modules()]
        mem["params"] += tensor_bytes(p for m in extra for p in m.parameters())
        mem["buffers"] += tensor_bytes(b for m in extra for b in m.buffers())
        mem["grads"] = tensor_bytes(p.grad for _, p in self.local_named_parameters())
        mem["optimizer"] = tensor_bytes(v for s in self.optimizer.state.values() for v in s.values()
                                        if torch.is_tensor(v))
        mem["total"] = sum(mem.values())
        return mem

    def gather_memory_bytes(self) -> list[dict[str, int]] | None:
        """Collective: :meth:`memory_bytes` of every rank, on rank 0 (None elsewhere)."""
        return self.comm.gather_object(self.memory_bytes())

    def _step_stats(self, clock: PhaseClock, **extra: Any) -> dict[str, Any]:
        return {**extra, "times_s": clock.times(), "comm_wait_s": self.comm.wait_s,
                "sent_bytes": self.comm.sent_bytes}

    # ---- exact forward ---------------------------------------------------------------------
    def _exact_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Exact forward propagation in the modules' current modes, pipelined over
        micro-batches (one per rank); the output (logits) on every rank."""
        self._ensure_released()
        me, P, B = self.rank, self.world_size, x.shape[0]
        info = self._layer_info(x)
        outs = []
        for idx in torch.arange(B).tensor_split(min(P, B)):
            s = x[idx] if me == 0 else self.comm.recv(info.point_shape(self.lo, len(idx)), me - 1, x)
            s = self.stage.forward(s)
            if me < P - 1:
                self.comm.isend(s, me + 1)
            else:
                outs.append(s)
        self.comm.wait()
        if me == P - 1:
            logits = torch.cat(outs)
        else:
            logits = torch.empty(info.point_shape(len(self.seq), B), dtype=x.dtype, device=x.device)
        return self.comm.broadcast(logits, P - 1)

    # ---- checkpoints -----------------------------------------------------------------------
    def full_state_dict(self) -> "OrderedDict[str, torch.Tensor] | None":
        parts = self.comm.gather_object(self.stage.state_dict())
        if parts is None:
            return None
        merged: dict[str, torch.Tensor] = {}
        for d in parts:
            merged.update(d)
        return self._ordered(self.model, merged)

    def load_full_state_dict(self, sd: dict[str, torch.Tensor] | None) -> None:
        """Every rank loads its own layers' entries of rank 0's ``sd`` (broadcast when other
        ranks pass None); the keys must be the model's."""
        missing = self.comm.all_reduce_sum([1.0 if sd is None else 0.0])[0]
        if missing:
            sd = self.comm.broadcast_object(sd if self.rank == 0 else None, 0)
        if sd is None:
            raise ValueError("load_full_state_dict: rank 0 has no state dict")
        want = set(self.model.state_dict())
        if set(sd) != want:
            raise KeyError(f"load_full_state_dict: keys differ from the model's: missing "
                           f"{sorted(want - set(sd))[:5]}, unexpected {sorted(set(sd) - want)[:5]}")
        self.stage.load_state_dict(sd)
        self._on_load()

    def _on_load(self) -> None:
        """Hook: forget what depended on the old weights (warm starts)."""

    def sync_model(self) -> None:
        """Collective: every rank's copy of the whole model takes the current owned weights
        (released layers come back first)."""
        parts = self.comm.broadcast_object(self.comm.gather_object(self.stage.state_dict()), 0)
        merged = {k: v for d in parts for k, v in d.items()}
        self.stage.materialize_()
        own = self.model.state_dict()
        with torch.no_grad():
            for k, v in merged.items():
                if k in own:
                    own[k].copy_(v)

    # ---- re-partition ------------------------------------------------------------------------
    def measured_layer_time(self) -> dict[str, float]:
        """Collective: seconds per layer measured in training (moving average), all ranks'
        layers, on every rank (what :meth:`repartition` balances)."""
        return gather_layer_time(self)

    def repartition(self, times: dict[str, float] | None = None) -> dict:
        """Collective, after layers were removed from the model (on every rank alike, e.g. by
        :meth:`prune_`): rebalance the stages by measured per-layer time (``times``, default
        the times measured in training; layers never timed are costed by their counted cost
        at the median seconds per unit), move the optimizer state of every surviving
        parameter to its new owner (same optimizer object), rebuild the stage. Returns
        ``bounds_before/after``, per-rank loads and ``imbalance_before/after`` (max / mean − 1;
        before: the old stages without the removed layers; ``imbalance_unpruned``: the old
        stages of the whole old sequence); see :func:`~resprune.parallel.rebalance.repartition_engine`."""
        return repartition_engine(self, times)

    def prune_(self, prune_config, times: dict[str, float] | None = None):
        """Collective: gather the current weights on every rank, prune the model alike
        everywhere (:func:`resprune.prune.prune_`), re-partition. Returns
        ``(PruneReport, repartition dict)``."""
        from ..prune import prune_ as prune_model

        self.sync_model()
        report = prune_model(self.model, prune_config)
        return report, self.repartition(times)
