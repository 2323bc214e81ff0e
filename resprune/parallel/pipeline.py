"""Exact pipeline parallelism: GPipe or 1F1B over micro-batches (``torch.distributed.pipelining``).

Each rank's :class:`~resprune.parallel.stage.Stage` (a contiguous range of
``layer_sequence()``, balanced by counted cost) becomes a ``PipelineStage``; torch's
``ScheduleGPipe`` or ``Schedule1F1B`` runs the micro-batches. Gradients are exact: every
parameter gets the gradient of the batch loss.

**Micro-batches and BatchNorm.** A batch of ``B`` samples is cut into ``n`` equal
micro-batches, ``n`` the largest divisor of ``B`` not above ``config.microbatches`` (torch's
stages need one shape per micro-batch; a batch of prime size runs as one micro-batch). In
train mode every BatchNorm then normalises each micro-batch with its own statistics and
updates its running statistics once per micro-batch, as GPipe does. So the engine computes
exactly what one process computes when it accumulates gradients over the same micro-batches,
``loss = Σᵢ loss_fn(model(xᵢ), yᵢ) / n`` (:func:`microbatched_step`, the reference the tests
compare with); with ``microbatches=1`` (or a model without BatchNorm) that is serial training
itself. ``loss_fn`` must be a mean over samples (as ``cross_entropy``) for the sum of the
micro-batch losses to be the batch loss. Evaluation (BN in eval mode) equals serial for any
split.

**Schedules as data.** :func:`schedule_order` lists the compute actions of each rank
(``"0F1"``: stage 0, forward, micro-batch 1) without processes; it is the order torch's
schedule of the same kind runs (logged from the stage in the multi-process tests; torch's
own ``pipeline_order`` table numbers the last stage's 1F1B forwards from 1, torch 2.14.1). ``1f1b`` needs ``n ≥ P``
micro-batches; with fewer the step runs GPipe (same arithmetic, other order).

Example:
    >>> from resprune.parallel.pipeline import schedule_order, split_count
    >>> split_count(64, 4), split_count(30, 4), split_count(29, 4)
    (4, 3, 1)
    >>> schedule_order("1f1b", 2, 3)[0]
    ['0F0', '0F1', '0B0', '0F2', '0B1', '0B2']
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from .comm import Comm, DistComm
from .engines import register_engine
from .rebalance import neighbour_params
from .stage import PhaseClock, StageConfig, StagedEngine

logger = logging.getLogger(__name__)

__all__ = ["PipelineConfig", "PipelineEngine", "split_count", "schedule_order", "microbatched_step"]

SCHEDULES = ("gpipe", "1f1b")


@dataclass(frozen=True)
class PipelineConfig(StageConfig):
    """Settings of the ``pipeline`` engine.

    Args:
        microbatches: the most micro-batches a batch is cut into (the largest divisor of the
            batch size not above it is used); with BatchNorm in train mode the result depends
            on it (see the module docstring), not on the number of processes.
        schedule: ``"1f1b"`` (one forward one backward: at most ``P`` micro-batches' graphs
            alive per rank) or ``"gpipe"`` (all forwards, then all backwards).
        input_size: sample input shape the partition is balanced for (default: the model's
            input channels at 32×32).
        version: config format version.

    Example:
        >>> PipelineConfig(microbatches=8, schedule="gpipe").microbatches
        8
    """

    microbatches: int = 4
    schedule: str = "1f1b"
    input_size: tuple[int, ...] | None = None
    version: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.microbatches, bool) or not isinstance(self.microbatches, int) or self.microbatches < 1:
            raise ValueError(f"microbatches must be an int >= 1, got {self.microbatches!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        self._check_input_size()


def split_count(batch: int, microbatches: int) -> int:
    """How many equal micro-batches a batch of ``batch`` samples is cut into: the largest
    divisor of ``batch`` that is at most ``microbatches``."""
    return max(d for d in range(1, min(batch, microbatches) + 1) if batch % d == 0)


def schedule_order(kind: str, stages: int, microbatches: int) -> dict[int, list[str]]:
    """Compute actions per rank, in order (``"{stage}F{mb}"`` forward, ``"{stage}B{mb}"``
    backward) of a ``"gpipe"`` or ``"1f1b"`` schedule (1F1B with fewer micro-batches than
    stages runs as GPipe)."""
    if kind not in SCHEDULES:
        raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {kind!r}")
    order: dict[int, list[str]] = {}
    for r in range(stages):
        fwd = [f"{r}F{i}" for i in range(microbatches)]
        bwd = [f"{r}B{i}" for i in range(microbatches)]
        if kind == "gpipe" or microbatches < stages:
            order[r] = fwd + bwd
            continue
        warm = min(stages - 1 - r, microbatches)
        acts = fwd[:warm]
        for i in range(microbatches - warm):
            acts += [fwd[warm + i], bwd[i]]
        order[r] = acts + bwd[microbatches - warm:]
    return order


def microbatched_step(forward: Callable[[torch.Tensor], torch.Tensor], loss_fn, x: torch.Tensor,
                      y: torch.Tensor, microbatches: int) -> float:
    """The one-process reference of the pipeline engine: the :func:`split_count` equal
    micro-batches in order, ``loss_fn(forward(xᵢ), yᵢ) / n`` backpropagated one at a time
    (gradients accumulate; BN running statistics update once per micro-batch). Returns the
    summed loss (the batch loss for a mean-reduced ``loss_fn``)."""
    n = split_count(x.shape[0], microbatches)
    total = 0.0
    for xi, yi in zip(x.chunk(n), y.chunk(n)):
        loss = loss_fn(forward(xi), yi) / n
        loss.backward()
        total += float(loss.detach())
    return total


class _Contiguous(nn.Module):
    """The stage's output in contiguous memory (what torch's stage sends must be dense)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous()


@register_engine("pipeline", config=PipelineConfig)
class PipelineEngine(StagedEngine):
    """Exact pipeline-parallel training with torch's GPipe / 1F1B schedules.

    Needs a ``torch.distributed`` process group for more than one rank (``comm`` a
    :class:`~resprune.parallel.comm.DistComm`); on one process it runs
    :func:`microbatched_step` on the whole model.
    """

    name = "pipeline"

    def __init__(self, model, loss_fn, optimizer_factory, config: PipelineConfig | None = None,
                 regularizer=None, comm: Comm | None = None) -> None:
        super().__init__(model, loss_fn, optimizer_factory, config, regularizer, comm)
        if self.world_size > 1 and not isinstance(self.comm, DistComm):
            raise TypeError("the pipeline engine runs torch.distributed.pipelining: it needs a "
                            "torch.distributed process group (DistComm) for more than one rank")

    def _on_partition(self) -> None:
        self._runs: dict[tuple, Any] = {}  # (shape, dtype, n, train) -> torch schedule
        self.submodule = nn.Sequential(*self.part, _Contiguous())  # gloo sends dense tensors only

    @contextmanager
    def _timed(self):
        """Forward seconds per owned layer while the body runs (hooks only for its duration,
        so copies of the model carry none)."""
        self._fwd_time = {}
        start: list[float] = [0.0]

        def tic(module: nn.Module, args: Any) -> None:
            start[0] = time.perf_counter()

        def toc(n: int):
            def hook(module: nn.Module, args: Any, out: Any) -> None:
                self._fwd_time[n] = self._fwd_time.get(n, 0.0) + time.perf_counter() - start[0]
            return hook

        hooks = []
        for i, (_, m) in enumerate(self.stage.layers):
            hooks += [m.register_forward_pre_hook(tic), m.register_forward_hook(toc(self.lo + i))]
        try:
            yield
        finally:
            for h in hooks:
                h.remove()

    # ---- torch.distributed.pipelining ------------------------------------------------------
    def _run(self, x: torch.Tensor, n: int, train: bool):
        """The torch schedule for micro-batches of ``x.shape[0] // n`` samples (cached per
        shape: torch's stages have one static shape per micro-batch)."""
        key = (tuple(x.shape), x.dtype, n, train)
        if key not in self._runs:
            from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

            info, b = self._layer_info(x), x.shape[0] // n

            def example(point: int, grad: bool) -> torch.Tensor:  # static shapes: no inference pass
                return torch.empty(info.point_shape(point, b), dtype=x.dtype, device="meta", requires_grad=grad)

            stage = PipelineStage(self.submodule, self.rank, self.world_size, self.stage.device,
                                  input_args=example(self.lo, train and self.rank > 0),
                                  output_args=example(self.hi, train), group=self.comm.group)
            one_f_one_b = self.config.schedule == "1f1b" and n >= self.world_size and train
            kind = Schedule1F1B if one_f_one_b else ScheduleGPipe
            loss = (lambda out, y: self.loss_fn(out, y) / n) if train else None
            self._runs[key] = kind(stage, n, loss_fn=loss, scale_grads=False)
        return self._runs[key]

    def _pipeline_bytes(self, x: torch.Tensor, n: int, train: bool) -> int:
        """Bytes this rank sends in one schedule run: activations forward, input gradients back."""
        info, b, size = self._layer_info(x), x.shape[0] // n, x.element_size()
        out = 0
        if self.rank < self.world_size - 1:
            out += n * torch.Size(info.point_shape(self.hi, b)).numel() * size
        if train and self.rank > 0:
            out += n * torch.Size(info.point_shape(self.lo, b)).numel() * size
        return out

    # ---- training ------------------------------------------------------------------------
    def forward_backward(self, x: torch.Tensor, y: torch.Tensor) -> float:
        self._ensure_released()
        self._zero_grad()
        self.comm.reset_counters()
        clock = PhaseClock()
        n = split_count(x.shape[0], self.config.microbatches)
        self._layer_info(x)  # shapes of a new batch shape, before the timing hooks
        with self._timed():
            task, sent = self._pipeline_step(x, y, n)
        clock.lap("pipeline")
        reg = 0.0
        if self.regularizer is not None:
            kw = neighbour_params(self) if getattr(self.regularizer, "neighbours", False) else {}
            r = self.regularizer(self.part, **kw)
            if r.requires_grad:
                r.backward()
            reg = float(r.detach())
        clock.lap("regularizer")
        self._record_layer_time(self._fwd_time)
        total = self.comm.all_reduce_sum([task + reg])[0]
        self.comm.sent_bytes += sent
        self.stats = self._step_stats(clock, microbatches=n, fwd_compute_s=sum(self._fwd_time.values()))
        return total

    def _pipeline_step(self, x: torch.Tensor, y: torch.Tensor, n: int) -> tuple[float, int]:
        """One schedule run: (the task loss on the last rank, 0 elsewhere; bytes sent)."""
        task, sent = 0.0, 0
        if self.world_size == 1:
            task = microbatched_step(self.stage.forward, self.loss_fn, x, y, n)
        else:
            run, losses = self._run(x, n, True), []
            if self.rank == 0:
                run.step(x.contiguous(), return_outputs=False)
            elif self.rank == self.world_size - 1:
                run.step(target=y, losses=losses, return_outputs=False)
            else:
                run.step(return_outputs=False)
            task = sum(float(v.detach()) for v in losses)
            sent = self._pipeline_bytes(x, n, True)
        return task, sent

    def _exact_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Forward in the modules' current modes through torch's schedule (micro-batched);
        the logits on every rank."""
        if self.world_size == 1:
            return super()._exact_forward(x)
        self._ensure_released()
        n = split_count(x.shape[0], self.config.microbatches)
        run = self._run(x, n, False)
        with torch.no_grad():
            out = run.step(x.contiguous()) if self.rank == 0 else run.step()
        last = self.world_size - 1
        if self.rank != last:
            out = torch.empty(self._layer_info(x).point_shape(len(self.seq), x.shape[0]),
                              dtype=x.dtype, device=x.device)
        return self.comm.broadcast(out, last)

    def describe(self) -> str:
        return (f"pipeline: {len(self.seq)} layers over {self.world_size} ranks, bounds {self.bounds}, "
                f"{self.config.schedule} with up to {self.config.microbatches} micro-batches")
