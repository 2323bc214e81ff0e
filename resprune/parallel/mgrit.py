"""Layer-parallel training by nonlinear multigrid across layers (MGRIT with FAS).

A ResNet is forward Euler over the layer index: ``u[n+1] = f_n(u[n])`` with ``f_n`` the n-th
entry of ``model.layer_sequence()`` (stem, blocks, head). Forward propagation is solved by
:class:`~resprune.parallel.mgrit_solver.MGRITSolver` with each rank owning a contiguous,
cost-balanced range of layers; backpropagation is the adjoint recurrence
``λ[n] = J_n(u[n])ᵀ λ[n+1]`` (vector-Jacobian products by ``torch.autograd``), solved by the
same solver backward in layer index (the ranks in reverse order).

Choices (see docs/parallel.md):

- **Coarse propagator.** A coarse step standing for ``m`` residual layers starting at layer
  ``t`` is ``Φc(u) = u + m·(f_t(u) − u)``: the first layer's increment, scaled (forward
  Euler with step ``m·h``; parameters injected from the C-point). Its adjoint is
  ``λ + m·(J_tᵀλ − λ)`` with ``J_t`` taken at ``u[t]`` (in the adjoint's own time the
  interval's first step is the highest layer of the chunk).
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
import time
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..layers import ResConv2d
from ..models.cifar_resnet import BasicBlock
from .comm import Comm, DistComm, ReversedComm, SingleComm
from .engines import Engine, register_engine
from .mgrit_solver import MGRITSolver, build_hierarchy
from .partition import LayerInfo, analyze_layers, balanced_bounds, layer_sequence
from .rebalance import ClassMeanStore, gather_layer_time, neighbour_params, repartition_engine

logger = logging.getLogger(__name__)

__all__ = ["MGRITConfig", "MGRITEngine"]


@dataclass(frozen=True)
class MGRITConfig:
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
        input_size: sample input shape used to classify layers and balance the partition.
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
    input_size: tuple[int, ...] = (1, 3, 32, 32)
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
        if len(self.input_size) < 2:
            raise ValueError(f"input_size must include the batch dimension, got {self.input_size!r}")
        object.__setattr__(self, "input_size", tuple(int(s) for s in self.input_size))

    def to_dict(self) -> dict:
        return asdict(self)


def residual_increment(layer: nn.Module, u: torch.Tensor | None):
    """``(r(u), relu)`` for layers of the form ``y = act(u + r(u))`` that resprune builds
    (identity-shortcut ResConv2d: ``r = s·BN(W∗u)``; identity-shortcut BasicBlock:
    ``r = conv2(conv1(u))``), ``None`` for any other layer. With ``u=None`` only the form is
    checked and ``r`` is ``None``. The coarse step is then ``act(u + m·r(u))``: the layer
    scale (the Euler step) times ``m``, the activation kept, which stays stable where
    ``u + m·(f(u) − u)`` would turn each ReLU-clipped entry into a factor ``1 − m``.
    """
    if isinstance(layer, ResConv2d) and layer.shortcut and layer.identity_shortcut:
        r = None if u is None else layer.branch(u)  # the same op order as layer.forward
        return r, layer.act
    if isinstance(layer, BasicBlock) and isinstance(layer.shortcut, nn.Identity):
        return (None if u is None else layer.conv2(layer.conv1(u))), True
    return None


@contextmanager
def _bn_stats_frozen(module: nn.Module):
    """Train-mode BN uses batch statistics but leaves running statistics untouched."""
    bns = [m for m in module.modules()
           if isinstance(m, _BatchNorm) and m.training and m.track_running_stats]
    for m in bns:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in bns:
            m.track_running_stats = True


def averaged_coarse_step(layers: list[nn.Module], u: torch.Tensor) -> torch.Tensor | None:
    """``act(u + Σᵢ sᵢ·BNᵢ(W̄∗u))`` for a run of identity-shortcut ResConv2d layers of one
    configuration (``W̄`` the mean kernel; batch statistics of ``W̄∗u``; affine ``Σ sᵢγᵢ``,
    ``Σ sᵢβᵢ``), ``None`` when the run is anything else. It equals the sum of the layers'
    increments at ``u`` when the kernels agree, and differs from it to first order in their
    spread; parameter injection (``m·s₀γ₀``, ``W₀``) keeps only the first layer."""
    first = layers[0]
    if not all(isinstance(m, ResConv2d) and m.shortcut and m.identity_shortcut and m.bn.affine
               and m.conv.weight.shape == first.conv.weight.shape and m.act == first.act
               and m.conv.bias is None for m in layers):
        return None
    w = torch.stack([m.conv.weight for m in layers]).mean(0)
    gamma = sum(m.effective_scale * m.bn.weight for m in layers)
    beta = sum(m.effective_scale * m.bn.bias for m in layers)
    c = first.conv
    z = F.conv2d(u, w, None, c.stride, c.padding, c.dilation, c.groups)
    y = u + F.batch_norm(z, None, None, gamma, beta, True, 0.0, first.bn.eps)
    return F.relu(y) if first.act else y


def _default_comm() -> Comm:
    if dist.is_available() and dist.is_initialized():
        return DistComm()
    return SingleComm()


@register_engine("mgrit")
class MGRITEngine(Engine):
    """Nonlinear multigrid (FAS-MGRIT) across layers, forward and adjoint.

    Every rank holds the whole model (same weights) but computes, owns and optimizes only
    its contiguous range of ``layer_sequence()``. ``comm`` defaults to the default process
    group (a one-process group when torch.distributed is not initialised).
    """

    name = "mgrit"

    def __init__(self, model, loss_fn, optimizer_factory, config: MGRITConfig | None = None,
                 regularizer=None, comm: Comm | None = None) -> None:
        super().__init__(model, loss_fn, optimizer_factory, regularizer)
        self.config = cfg = config if config is not None else MGRITConfig()
        if not isinstance(cfg, MGRITConfig):
            raise TypeError(f"mgrit engine needs an MGRITConfig, got {type(cfg).__name__}")
        self.comm = comm if comm is not None else _default_comm()
        self.rank, self.world_size = self.comm.rank, self.comm.world_size
        self.layer_time: dict[str, float] = {}  # measured seconds per owned layer (final sweeps, EMA)
        self._iters = [cfg.fwd_iters, cfg.bwd_iters]  # this step's cycles (adaptive mode moves them)
        self._setup_partition(None)
        self._make_optimizer()
        logger.info("mgrit rank %d/%d owns layers %d..%d (%s .. %s); %d forward levels",
                    self.rank, self.world_size, self.lo, self.hi - 1, self.seq[self.lo][0],
                    self.seq[self.hi - 1][0], len(self.fwd_levels))

    def _setup_partition(self, bounds: list[int] | None) -> None:
        """Layer sequence, analysis, rank bounds (``None``: balanced by counted cost), grids."""
        cfg = self.config
        self.seq = layer_sequence(self.model)
        self.info = analyze_layers(self.model, cfg.input_size)
        self._infos = {tuple(cfg.input_size[1:]): self.info}
        n = len(self.seq)
        self.bounds = bounds if bounds is not None else balanced_bounds(self.info.costs, self.world_size)
        self.lo, self.hi = self.bounds[self.rank], self.bounds[self.rank + 1]
        self.fwd_levels = build_hierarchy(self.info.residual, self.bounds, cfg.cf, cfg.levels)
        rbounds = [n - b for b in reversed(self.bounds)]
        self.bwd_levels = build_hierarchy(self.info.residual[::-1], rbounds, cfg.cf, cfg.levels)
        self._relu_out = [residual_increment(m, None) is not None and residual_increment(m, None)[1]
                          for _, m in self.seq]
        self.part = nn.ModuleList([m for _, m in self.seq[self.lo:self.hi]])
        self._prev: dict | None = None
        self._store = ClassMeanStore() if cfg.warm_start == "class_mean" else None

    def repartition(self, times: dict[str, float] | None = None) -> dict:
        """Collective, after layers were removed from the model (on every rank alike, e.g. by
        :meth:`prune_`): rebalance the ranks' stages by measured per-layer time (``times``,
        default the times measured in the final sweeps; layers never timed are costed by
        their counted cost at the median seconds per unit), gather the owned parameters and
        buffers and the optimiser state of every surviving parameter, then rebuild the grids
        and the optimiser with the state kept (hyper-parameters and LR-scheduler binding kept
        when the optimiser's groups line up). Returns ``bounds_before/after``, the per-rank
        loads in measured seconds and ``imbalance_before/after`` (max load / mean load − 1;
        before: the old stages with the removed layers gone, i.e. without re-partitioning;
        ``imbalance_unpruned``: the old stages of the whole old sequence)."""
        return repartition_engine(self, times)

    def measured_layer_time(self) -> dict[str, float]:
        """Collective: seconds per layer measured in the final sweeps (moving average), all
        ranks' layers, on every rank (what :meth:`repartition` balances)."""
        return gather_layer_time(self)

    def prune_(self, prune_config, times: dict[str, float] | None = None):
        """Collective: gather the current weights on every rank, prune the model alike
        everywhere (:func:`resprune.prune.prune_`), re-partition. Returns
        ``(PruneReport, repartition dict)``."""
        from ..prune import prune_ as prune_model

        self.sync_model()
        report = prune_model(self.model, prune_config)
        return report, self.repartition(times)

    def sync_model(self) -> None:
        """Collective: every rank's copy of the whole model takes the current owned weights
        (ranks otherwise hold stale copies of the layers they do not own)."""
        local = {}
        for name, m in self.seq[self.lo:self.hi]:
            for k, v in m.state_dict().items():
                local[f"{name}.{k}"] = v.detach().cpu().clone()
        parts = self.comm.broadcast_object(self.comm.gather_object(local), 0)
        merged = {k: v for d in parts for k, v in d.items()}
        own = self.model.state_dict()
        with torch.no_grad():
            for k, v in merged.items():
                if k in own:
                    own[k].copy_(v)

    # ---- ownership -----------------------------------------------------------------------
    def local_named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        for name, m in self.seq[self.lo:self.hi]:
            for pn, p in m.named_parameters():
                yield f"{name}.{pn}", p

    def describe(self) -> str:
        """One line per rank range and the grid sizes (for logs)."""
        lv = ", ".join(str(level.n_steps) for level in self.fwd_levels)
        return (f"mgrit: {len(self.seq)} layers over {self.world_size} ranks, bounds {self.bounds}, "
                f"forward grid steps per level [{lv}], {self.config}")

    def _layer_info(self, x: torch.Tensor) -> LayerInfo:
        key = tuple(x.shape[1:])
        if key not in self._infos:
            info = analyze_layers(self.model, (1, *key))
            if info.residual != self.info.residual:
                raise ValueError(f"input shape {key} changes which layers keep their shape")
            self._infos[key] = info
        return self._infos[key]

    # ---- steps ---------------------------------------------------------------------------
    def _fstep(self, desc, u: torch.Tensor) -> torch.Tensor:
        t, m = desc
        layer = self.seq[t][1]
        if m is None:
            return layer(u)
        if self.config.coarse_params == "average":
            out = averaged_coarse_step(self._coarse_layers(t, m), u)
            if out is not None:
                return out
        inc = residual_increment(layer, u)
        if inc is None:  # unknown residual layer: scale its whole increment
            return u + m * (layer(u) - u)
        r, relu = inc
        y = u + m * r
        return F.relu(y) if relu else y

    def _coarse_layers(self, first: int, m: int) -> list[nn.Module]:
        return [self.seq[n][1] for n in range(first, first + m)]

    # ---- training ------------------------------------------------------------------------
    def forward_backward(self, x: torch.Tensor, y: torch.Tensor) -> float:
        cfg, n_layers, me, P = self.config, len(self.seq), self.rank, self.world_size
        self._zero_grad()
        B = x.shape[0]
        info = self._layer_info(x)
        conv = cfg.mode == "converged"
        fits, bits = self._iters if cfg.mode == "adaptive" else (cfg.fwd_iters, cfg.bwd_iters)
        if self._store is not None:  # class-mean start: one guess per sample, from its label
            ug, lg = self._store.guess(y)
            warm = ug is not None
        else:
            warm = bool(cfg.warm_start) and self._prev is not None and self._prev["shape"] == tuple(x.shape)
            ug, lg = (self._prev["u"], self._prev["lam"]) if warm else (None, None)
        clock = [time.perf_counter()]
        self.comm.wait_s = 0.0

        def lap() -> float:  # seconds since the previous lap (phase timings for stats)
            clock.append(time.perf_counter())
            return clock[-1] - clock[-2]

        # forward: MGRIT on the states (no graph, BN running stats frozen)
        fsolver = MGRITSolver(self.fwd_levels, self.comm, self._fstep,
                              lambda p: info.point_shape(p, B), cfg.relax)
        with torch.no_grad(), _bn_stats_frozen(self.part):
            u, finfo = fsolver.solve(x if me == 0 else None, x, fits, cfg.tol if conv else None,
                                     "guess" if warm else cfg.initial, ug)
        t_fwd_solve = lap()
        # final sweep: F-relaxation that builds each owned layer's graph (BN stats update once)
        graphs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        # defect sums: the sweep's value at each owned C-point against the solver's (free);
        # kept as tensors, read once with the loss (no device sync per interval)
        defect = torch.zeros(4, dtype=torch.float64, device=x.device)  # fwd ‖Φ(u[c−1]) − u[c]‖², ‖u[c]‖²; adj
        owned = set(fsolver.c_points())
        ltime: dict[int, float] = {}  # seconds per owned layer in the final sweeps
        for a, b in fsolver.intervals(0):
            s = u[a]
            for n in range(a, b):
                t0 = time.perf_counter()
                inp = s.detach().requires_grad_(True)
                out = self.seq[n][1](inp)
                graphs[n] = (inp, out)
                s = out.detach()
                ltime[n] = time.perf_counter() - t0
            if b in owned:
                defect[0] += (s - u[b]).double().pow(2).sum()
                defect[1] += u[b].double().pow(2).sum()

        t_fwd_sweep = lap()
        loss = torch.zeros((), dtype=torch.float64)
        lam_n = None
        if me == P - 1:
            logits = graphs[n_layers - 1][1]
            task = self.loss_fn(logits, y)
            (lam_n,) = torch.autograd.grad(task, logits, retain_graph=True)
            loss += float(task.detach())
        if self.regularizer is not None:
            kw = neighbour_params(self) if getattr(self.regularizer, "neighbours", False) else {}
            reg = self.regularizer(self.part, **kw)
            if reg.requires_grad:
                reg.backward()
            loss += float(reg.detach())

        # adjoint: MGRIT backward in layer index (time point t = layer point N − t)
        def bstep(desc, lam: torch.Tensor) -> torch.Tensor:
            t, m = desc
            n = n_layers - 1 - t
            inp, out = graphs[n]
            if m is not None and cfg.coarse_params == "average":
                # the interval is layers n−m+1..n; linearise the averaged step at u[n]
                with torch.enable_grad():
                    v = inp.detach().requires_grad_(True)
                    outc = averaged_coarse_step(self._coarse_layers(n - m + 1, m), v)
                if outc is not None:
                    return torch.autograd.grad(outc, v, lam)[0]
            (g,) = torch.autograd.grad(out, inp, lam, retain_graph=True)
            if m is None:
                return g
            # J = D (I + s B) with D the ReLU mask at the output: coarse (I + m s B)ᵀ D λ
            dl = lam * (out > 0) if self._relu_out[n] else lam
            return dl + m * (g - dl)

        bsolver = MGRITSolver(self.bwd_levels, ReversedComm(self.comm), bstep,
                              lambda tp: info.point_shape(n_layers - tp, B), cfg.relax)
        lam, binfo = bsolver.solve(lam_n, x, bits, cfg.tol if conv else None,
                                   "guess" if warm else cfg.initial, lg)
        t_bwd_solve = lap()
        # final adjoint sweep: parameter gradients from the final adjoints (each layer once)
        bowned = set(bsolver.c_points()) - {n_layers}  # the input point has no adjoint value here
        for a, b in bsolver.intervals(0):
            s = lam[a]
            for tp in range(a, b):
                n = n_layers - 1 - tp
                t0 = time.perf_counter()
                inp, out = graphs.pop(n)
                params = [p for p in self.seq[n][1].parameters() if p.requires_grad]
                inputs = params + ([inp] if n > 0 else [])
                if inputs:
                    torch.autograd.backward(out, s, inputs=inputs)
                s = inp.grad if inp.grad is not None else torch.zeros_like(inp)
                ltime[n] = ltime.get(n, 0.0) + time.perf_counter() - t0
            if b in bowned:
                defect[2] += (s - lam[b]).double().pow(2).sum()
                defect[3] += lam[b].double().pow(2).sum()

        t_bwd_sweep = lap()
        for n, sec in ltime.items():  # per-layer time for re-partitioning (EMA over steps)
            name = self.seq[n][0]
            self.layer_time[name] = sec if name not in self.layer_time else 0.8 * self.layer_time[name] + 0.2 * sec
        if self._store is not None:
            self._store.update(y, {p: u[p] for p in fsolver.c_points()}, {p: lam[p] for p in bsolver.c_points()})
        elif cfg.warm_start:
            self._prev = {
                "shape": tuple(x.shape),
                "u": {p: u[p].detach() for p in fsolver.c_points()},
                "lam": {p: lam[p].detach() for p in bsolver.c_points()},
            }
        total, *defect = self.comm.all_reduce_sum([float(loss), *defect.tolist()])
        t_total = time.perf_counter() - clock[0]
        fdef = (defect[0] / defect[1]) ** 0.5 if defect[1] > 0 else None
        bdef = (defect[2] / defect[3]) ** 0.5 if defect[3] > 0 else None
        if cfg.mode == "adaptive":  # next step's cycles from this step's measured defects
            for i, (d, cap) in enumerate(((fdef, cfg.fwd_iters), (bdef, cfg.bwd_iters))):
                if d is not None and d > cfg.tol:
                    self._iters[i] = min(cap, self._iters[i] + 1)
                elif d is not None and d < cfg.tol / 4:
                    self._iters[i] = max(min(cfg.min_iters, cap), self._iters[i] - 1)
        self.stats = {"warm": warm, "fwd_iters": finfo.iterations, "fwd_residuals": finfo.residuals,
                      "bwd_iters": binfo.iterations, "bwd_residuals": binfo.residuals,
                      # relative C-point defect of the states/adjoints the gradients used:
                      # ‖Φ(u[c−1]) − u[c]‖/‖u[c]‖ over the C-points inside ranks (0 if exact)
                      "fwd_defect": fdef, "bwd_defect": bdef,
                      # wall seconds of this rank's phases (the solves include waiting for
                      # other ranks; comm_wait_s is all time blocked in communication)
                      "times_s": {"fwd_solve": t_fwd_solve, "fwd_sweep": t_fwd_sweep,
                                  "bwd_solve": t_bwd_solve, "bwd_sweep": t_bwd_sweep,
                                  "total": t_total,
                                  # the solves' coarsest-level (sequential) part, waiting included
                                  "fwd_coarsest": fsolver.seq_s, "bwd_coarsest": bsolver.seq_s},
                      "comm_wait_s": self.comm.wait_s}
        return total

    @property
    def exact_bn_stats(self) -> bool:  # simultaneous mode accumulates them from inexact states
        return self.config.mode == "converged"

    def _exact_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Exact forward propagation in the modules' current modes, pipelined over
        micro-batches; the output (logits) on every rank."""
        me, P, B = self.rank, self.world_size, x.shape[0]
        info = self._layer_info(x)
        chunks = torch.arange(B).tensor_split(min(P, B))
        outs = []
        for idx in chunks:
            if me == 0:
                s = x[idx]
            else:
                s = self.comm.recv(info.point_shape(self.lo, len(idx)), me - 1, x)
            for n in range(self.lo, self.hi):
                s = self.seq[n][1](s)
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

    # ---- checkpoints ---------------------------------------------------------------------
    def full_state_dict(self) -> "OrderedDict[str, torch.Tensor] | None":
        local = {}
        for name, m in self.seq[self.lo:self.hi]:
            for k, v in m.state_dict().items():
                local[f"{name}.{k}"] = v.detach().cpu().clone()
        parts = self.comm.gather_object(local)
        if parts is None:
            return None
        merged: dict[str, torch.Tensor] = {}
        for d in parts:
            merged.update(d)
        return self._ordered(self.model, merged)

    def loop_state(self) -> dict:
        """The cycle counts adaptive mode chose for the next step. Warm-start states
        (``warm_start``) are not kept: a resumed run starts its first step cold."""
        return {"iters": list(self._iters)}

    def load_loop_state(self, state: dict) -> None:
        if "iters" in state:
            self._iters = [int(i) for i in state["iters"]]

    def load_full_state_dict(self, sd: dict[str, torch.Tensor] | None) -> None:
        missing = self.comm.all_reduce_sum([1.0 if sd is None else 0.0])[0]
        if missing:
            sd = self.comm.broadcast_object(sd if self.rank == 0 else None, 0)
        if sd is None:
            raise ValueError("load_full_state_dict: rank 0 has no state dict")
        self.model.load_state_dict(sd)
        self._prev = None
        if self._store is not None:
            self._store = ClassMeanStore()
