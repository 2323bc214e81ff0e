"""Layer-parallel training by nonlinear multigrid across layers (MGRIT with FAS).

A ResNet is forward Euler over the layer index: ``u[n+1] = f_n(u[n])`` with ``f_n`` the n-th
entry of ``model.layer_sequence()`` (stem, blocks, head). Forward propagation is solved by
:class:`~resprune.parallel.mgrit_solver.MGRITSolver` with each rank owning a contiguous,
cost-balanced range of layers; backpropagation is the adjoint recurrence
``λ[n] = J_n(u[n])ᵀ λ[n+1]`` (vector-Jacobian products by ``torch.autograd``), solved by the
same solver backward in layer index (the ranks in reverse order).

Choices (see docs/parallel.md):

- **Structure.** A :class:`~resprune.parallel.stage.Stage` owns the rank's layers (the
  others are released); :class:`~resprune.parallel.mgrit_schedule.MGRITStep` is the step's
  schedule (solves, sweeps, loss), this module the contract and the state across steps.
- **Coarse propagator.** A coarse step standing for ``m`` residual layers starting at layer
  ``t`` is ``act(u + m·r_t(u))`` for blocks that declare the form ``act(u + r(u))``
  (``block.residual_form()``, :mod:`resprune.parallel.residual`; no type tests), else
  ``u + m·(f_t(u) − u)``: the first layer's increment, scaled (forward Euler with step
  ``m·h``; parameters injected from the C-point). Its adjoint is ``Dλ + m·(J_tᵀλ − Dλ)``
  with ``D`` the ReLU mask at the output and ``J_t`` taken at ``u[t]`` (in the adjoint's
  own time the interval's first step is the highest layer of the chunk).
- **Shape changes.** Layers whose output shape differs from their input (stem, stride-2
  transitions, head) are never coarsened: they are exact steps on every level, so each
  stage of equal shape is coarsened on its own and transitions are propagated exactly.
- **BatchNorm.** Every relaxation sweep uses batch statistics (train mode) but does not
  touch the running statistics; they are updated once per step, in the final sweep that
  builds the autograd graphs from the final states (so converged mode updates them exactly
  as serial training does).
- **Start.** Forward and adjoint start from a nested coarse solve (exact on the coarsest
  level, F-relaxed down; not counted as an iteration). With ``warm_start=True`` and a batch
  of the same shape as the previous step, the C-point states and adjoints of the previous
  step are the start instead (sound when the same batch repeats, e.g. full-batch training);
  ``warm_start="class_mean"`` starts each sample from its class's mean C-point states and
  adjoints (:class:`~resprune.parallel.rebalance.ClassMeanStore`).
- **Modes.** ``converged``: iterate until the relative C-point residual is ``<= tol`` (caps
  ``fwd_iters``/``bwd_iters``): gradients equal serial ones to rounding. ``simultaneous``
  (one-shot): exactly ``fwd_iters``/``bwd_iters`` cycles after the start per step: inexact
  gradients, each optimizer step sees the current approximation. ``adaptive``: the cycles
  of the next step follow this step's measured defect (``tol`` the target).
- **Re-partition.** :meth:`MGRITEngine.prune_` / :meth:`MGRITEngine.repartition` rebalance
  the stages by measured per-layer time after layers were removed, keeping the optimiser
  state of the surviving parameters.

Example (run under torchrun; on one process it degenerates to serial):
    >>> import torch, resprune as rp
    >>> from resprune.parallel import create_engine, MGRITConfig
    >>> eng = create_engine("mgrit", rp.create_model("resnet20"), torch.nn.functional.cross_entropy,
    ...                     lambda p: torch.optim.SGD(p, lr=0.1), MGRITConfig(mode="simultaneous"))
    >>> loss = eng.step(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3]))
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from ..profile import DEFAULT_INPUT_SIZE
from .engines import register_engine
from .mgrit_schedule import MGRITStep, describe_levels
from .mgrit_solver import build_hierarchy
from .rebalance import ClassMeanStore
from .residual import averaged_coarse_step, relu_after_sum, residual_form
from .stage import StageConfig, StagedEngine

logger = logging.getLogger(__name__)

__all__ = ["MGRITConfig", "MGRITEngine", "averaged_coarse_step", "residual_increment"]


@dataclass(frozen=True)
class MGRITConfig(StageConfig):
    """Settings of the ``mgrit`` engine.

    Args:
        cf: coarsening factor (fine residual layers per coarse step), >= 2.
        levels: grid levels (2 = two-level; more = V-cycles), >= 2.
        relax: ``"F"`` or ``"FCF"`` relaxation, or one per level separated by commas
            (``"F,FCF"``: F on the finest level, FCF on every coarser one, TorchBraid's
            default); a list is joined.
        mode: ``"converged"`` (iterate to ``tol``; exact gradients), ``"simultaneous"``
            (exactly ``fwd_iters``/``bwd_iters`` cycles per step) or ``"adaptive"`` (cycles
            per step set from the measured defect of the previous step: +1 while the defect
            is above ``tol``, −1 while below ``tol/4``, between ``min_iters`` and the caps
            ``fwd_iters``/``bwd_iters``, starting at the caps).
        fwd_iters: forward MGRIT cycles after the start (a cap in converged and adaptive
            mode; 0 in simultaneous mode: the nested start alone, what ``1`` meant before
            cycles were counted after it). Default (None): 1 in simultaneous mode, 4 in adaptive mode, 1000 in
            converged mode, i.e. ``tol`` decides (MGRIT is exact after as many cycles as
            coarse intervals, so the cap never binds in practice).
        bwd_iters: the same for the adjoint.
        min_iters: the fewest cycles adaptive mode runs.
        tol: relative C-point residual at which converged mode stops; the defect adaptive
            mode aims at.
        warm_start: ``False``; ``True`` or ``"batch"``: start from the previous step's
            C-point states/adjoints when the batch shape is unchanged (sound for repeated
            batches); ``"class_mean"``: start each sample from the mean C-point state and
            adjoint of its class, stored from the latest step in which the class occurred
            (memory per rank: classes × Σ over the owned C-points of one sample's state,
            twice). Otherwise and on the first step: the ``initial`` start.
        initial: ``"coarse"`` (nested iteration) or ``"zero"`` start when not warm.
        coarse_params: how a coarse step gets its parameters from the ``m`` fine layers it
            stands for: ``"inject"`` (the first layer's, times ``m``: classic MGRIT) or
            ``"average"`` (identity-shortcut ResConv2d runs only: the mean conv kernel and
            the summed BN affine ``Σ sᵢγᵢ, Σ sᵢβᵢ``, i.e. ``act(u + Σᵢ sᵢ·BNᵢ(W̄∗u))`` to first
            order in how much the layers differ; its adjoint is the Jacobian of that step
            at the interval's state). Other layers always inject.
        input_size: sample input shape used to classify layers and balance the partition
            (``None``: the model's input channels at 32×32, as the other stage engines).
        version: config format version.

    Example:
        >>> MGRITConfig(cf=8, mode="simultaneous", fwd_iters=1, bwd_iters=1).levels
        2
    """

    cf: int = 4
    levels: int = 2
    relax: str = "F"
    mode: str = "simultaneous"
    fwd_iters: int | None = None
    bwd_iters: int | None = None
    min_iters: int = 1
    tol: float = 1e-6
    warm_start: bool | str = False
    initial: str = "coarse"
    coarse_params: str = "inject"
    input_size: tuple[int, ...] = DEFAULT_INPUT_SIZE
    version: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.cf, int) or self.cf < 2:
            raise ValueError(f"cf (coarsening factor) must be an int >= 2, got {self.cf!r}")
        if not isinstance(self.levels, int) or self.levels < 2:
            raise ValueError(f"levels must be an int >= 2, got {self.levels!r}")
        relax = ",".join(self.relax) if isinstance(self.relax, (list, tuple)) else self.relax
        if not isinstance(relax, str) or any(r.strip() not in ("F", "FCF") for r in relax.split(",")):
            raise ValueError(f"relax must be 'F', 'FCF' or one per level like 'F,FCF', got {self.relax!r}")
        object.__setattr__(self, "relax", ",".join(r.strip() for r in relax.split(",")))
        if self.mode not in ("converged", "simultaneous", "adaptive"):
            raise ValueError(f"mode must be 'converged', 'simultaneous' or 'adaptive', got {self.mode!r}")
        if self.warm_start not in (False, True, "batch", "class_mean"):
            raise ValueError(f"warm_start must be false, true, 'batch' or 'class_mean', got {self.warm_start!r}")
        if not isinstance(self.min_iters, int) or self.min_iters < 1:
            raise ValueError(f"min_iters must be an int >= 1, got {self.min_iters!r}")
        for k in ("fwd_iters", "bwd_iters"):
            if getattr(self, k) is None:
                object.__setattr__(self, k, {"converged": 1000, "adaptive": 4}.get(self.mode, 1))
            v = getattr(self, k)
            low = 0 if self.mode == "simultaneous" else 1  # 0: the nested start alone, no cycle
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"{k} must be an int >= {low} in {self.mode} mode, got {v!r}")
        if not (self.tol > 0):
            raise ValueError(f"tol must be > 0, got {self.tol!r}")
        if self.coarse_params not in ("inject", "average"):
            raise ValueError(f"coarse_params must be 'inject' or 'average', got {self.coarse_params!r}")
        if self.initial not in ("coarse", "zero"):
            raise ValueError(f"initial must be 'coarse' or 'zero', got {self.initial!r}")
        self._check_input_size()


def residual_increment(layer: nn.Module, u: torch.Tensor | None):
    """``(r(u), relu)`` for a block that declares the residual form ``act(u + r(u))``
    (:func:`~resprune.parallel.residual.residual_form`), ``None`` for any other layer; with
    ``u=None`` only the form is checked and ``r`` is ``None``."""
    form = residual_form(layer)
    if form is None:
        return None
    r, relu = form
    return (None if u is None else r(u)), relu


@register_engine("mgrit", config=MGRITConfig)
class MGRITEngine(StagedEngine):
    """Nonlinear multigrid (FAS-MGRIT) across layers, forward and adjoint.

    Each rank's :class:`~resprune.parallel.stage.Stage` owns a contiguous range of
    ``layer_sequence()`` (the other layers are released at the first step); an
    :class:`~resprune.parallel.mgrit_schedule.MGRITStep` drives the solves and sweeps.
    ``comm`` defaults to the default process group (one process when torch.distributed is
    not initialised).
    """

    name = "mgrit"

    def _on_partition(self) -> None:
        """Grids of both directions, ReLU flags, warm-start stores, adaptive cycle counts."""
        cfg, n = self.config, len(self.seq)
        self.fwd_levels = build_hierarchy(self.info.residual, self.bounds, cfg.cf, cfg.levels)
        rbounds = [n - b for b in reversed(self.bounds)]
        self.bwd_levels = build_hierarchy(self.info.residual[::-1], rbounds, cfg.cf, cfg.levels)
        self._relu_out = [relu_after_sum(m) for _, m in self.seq]
        self._iters = [cfg.fwd_iters, cfg.bwd_iters]  # this step's cycles (adaptive mode moves them)
        self._on_load()
        logger.info("mgrit rank %d: %d forward levels", self.rank, len(self.fwd_levels))

    def _on_load(self) -> None:
        self._prev: dict | None = None
        self._store = ClassMeanStore() if self.config.warm_start == "class_mean" else None

    def layers(self, first: int, m: int) -> list[nn.Module]:
        """Layers ``first .. first + m − 1`` (a coarse step's interval, inside this rank)."""
        return [self.seq[n][1] for n in range(first, first + m)]

    def describe_levels(self) -> str:
        """The forward grids, rank by rank (:func:`~resprune.parallel.mgrit_schedule.describe_levels`)."""
        return describe_levels(self.fwd_levels, [n for n, _ in self.seq])

    # ---- training ------------------------------------------------------------------------
    def forward_backward(self, x: torch.Tensor, y: torch.Tensor) -> float:
        self._ensure_released()
        self._zero_grad()
        self.comm.reset_counters()
        step = MGRITStep(self, x, y)
        loss, defect, u, lam = step.run()
        self._record_layer_time(step.ltime)
        self._keep_start(step, y, u, lam)
        total, *d = self.comm.all_reduce_sum([loss, *defect.tolist()])
        fdef = (d[0] / d[1]) ** 0.5 if d[1] > 0 else None
        bdef = (d[2] / d[3]) ** 0.5 if d[3] > 0 else None
        self._adapt(fdef, bdef)
        times = step.clock.times()
        # the solves' coarsest-level (sequential) part, waiting included
        times.update(fwd_coarsest=step.fsolver.seq_s, bwd_coarsest=step.bsolver.seq_s)
        self.stats = {"warm": step.warm, "fwd_iters": step.finfo.iterations, "fwd_residuals": step.finfo.residuals,
                      "bwd_iters": step.binfo.iterations, "bwd_residuals": step.binfo.residuals,
                      # relative C-point defect of the states/adjoints the gradients used:
                      # ‖Φ(u[c−1]) − u[c]‖/‖u[c]‖ over the C-points inside ranks (0 if exact)
                      "fwd_defect": fdef, "bwd_defect": bdef,
                      # wall seconds of this rank's phases (the solves include waiting for
                      # other ranks; comm_wait_s is all time blocked in communication)
                      "times_s": times, "comm_wait_s": self.comm.wait_s, "sent_bytes": self.comm.sent_bytes}
        return total

    def _keep_start(self, step: MGRITStep, y: torch.Tensor, u: dict, lam: dict) -> None:
        """Store this step's C-point values for the next step's warm start."""
        fpts, bpts = step.fsolver.c_points(), step.bsolver.c_points()
        if self._store is not None:
            self._store.update(y, {p: u[p] for p in fpts}, {p: lam[p] for p in bpts})
        elif self.config.warm_start:
            self._prev = {"shape": tuple(step.x.shape), "u": {p: u[p].detach() for p in fpts},
                          "lam": {p: lam[p].detach() for p in bpts}}

    def _adapt(self, fdef: float | None, bdef: float | None) -> None:
        """Adaptive mode: next step's cycles from this step's measured defects."""
        cfg = self.config
        if cfg.mode != "adaptive":
            return
        for i, (d, cap) in enumerate(((fdef, cfg.fwd_iters), (bdef, cfg.bwd_iters))):
            if d is not None and d > cfg.tol:
                self._iters[i] = min(cap, self._iters[i] + 1)
            elif d is not None and d < cfg.tol / 4:
                self._iters[i] = max(min(cfg.min_iters, cap), self._iters[i] - 1)

    @property
    def exact_bn_stats(self) -> bool:  # simultaneous mode accumulates them from inexact states
        return self.config.mode == "converged"

    # ---- checkpoints ---------------------------------------------------------------------
    def loop_state(self) -> dict:
        """The cycle counts adaptive mode chose for the next step. Warm-start states
        (``warm_start``) are not kept: a resumed run starts its first step cold."""
        return {"iters": list(self._iters)}

    def load_loop_state(self, state: dict) -> None:
        if "iters" in state:
            self._iters = [int(i) for i in state["iters"]]
