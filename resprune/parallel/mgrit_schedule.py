"""The schedule of one mgrit training step on one rank, and the grids as printable data.

:class:`MGRITStep` drives a :class:`~resprune.parallel.stage.Stage` through one step:

1. ``forward_solve``: FAS-MGRIT on the states (no graph; BN running statistics frozen);
2. ``forward_sweep``: F-relaxation from the solver's C-points that builds each owned layer's
   graph once (BN running statistics updated once, as a serial step does) and measures the
   C-point defect for free;
3. ``loss``: task loss on the last rank, the regularizer on every rank;
4. ``adjoint_solve``: the same solver backward in layer index (ranks reversed) on
   ``λ[n] = J_n(u[n])ᵀ λ[n+1]``;
5. ``adjoint_sweep``: parameter gradients from the final adjoints (each graph used once).

Phase seconds go to ``stats["times_s"]`` under ``fwd_solve``, ``fwd_sweep``, ``bwd_solve``
(loss included), ``bwd_sweep``. :func:`describe_levels` prints a hierarchy without processes.

Example:
    >>> from resprune.parallel.mgrit_solver import build_hierarchy
    >>> from resprune.parallel.mgrit_schedule import describe_levels
    >>> levels = build_hierarchy([False] + [True] * 6 + [False], [0, 4, 8], cf=3, max_levels=2)
    >>> print(describe_levels(levels, ["stem"] + [f"b{i}" for i in range(6)] + ["head"]))
    level 0: rank 0: stem | b0 | b1 | b2   rank 1: b3 | b4 | b5 | head
    level 1: rank 0: stem | b0 ×3   rank 1: b3 ×3 | head
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .comm import ReversedComm
from .mgrit_solver import Level, MGRITSolver
from .rebalance import neighbour_params
from .residual import averaged_coarse_step, coarse_step
from .stage import PhaseClock

if TYPE_CHECKING:  # pragma: no cover
    from .mgrit import MGRITEngine

__all__ = ["MGRITStep", "describe_levels", "bn_stats_frozen"]


def describe_levels(levels: list[Level], names: list[str]) -> str:
    """One line per level: each rank's steps (``name ×m`` for a coarse step of ``m`` layers)."""
    lines = []
    for i, lv in enumerate(levels):
        ranks = []
        for r in range(len(lv.bounds) - 1):
            steps = lv.steps[lv.bounds[r]:lv.bounds[r + 1]]
            ranks.append(f"rank {r}: " + " | ".join(names[t] + (f" ×{m}" if m else "") for t, m in steps))
        lines.append(f"level {i}: " + "   ".join(ranks))
    return "\n".join(lines)


@contextmanager
def bn_stats_frozen(module: nn.Module):
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


class MGRITStep:
    """One forward-backward of :class:`~resprune.parallel.mgrit.MGRITEngine` on one rank."""

    def __init__(self, eng: "MGRITEngine", x: torch.Tensor, y: torch.Tensor) -> None:
        self.eng, self.cfg, self.x, self.y = eng, eng.config, x, y
        self.me, self.P, self.B, self.N = eng.rank, eng.world_size, x.shape[0], len(eng.seq)
        self.info = eng._layer_info(x)
        self.clock = PhaseClock()
        # ‖Φ(u[c−1]) − u[c]‖², ‖u[c]‖² forward, then the same for the adjoint (read once, at the end)
        self.defect = torch.zeros(4, dtype=torch.float64, device=x.device)
        self.ltime: dict[int, float] = {}  # seconds per owned layer in the final sweeps
        self.graphs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        cfg = self.cfg
        self.conv = cfg.mode == "converged"
        self.iters = eng._iters if cfg.mode == "adaptive" else (cfg.fwd_iters, cfg.bwd_iters)
        if eng._store is not None:  # class-mean start: one guess per sample, from its label
            self.ug, self.lg = eng._store.guess(y)
            self.warm = self.ug is not None
        else:
            prev = eng._prev
            self.warm = bool(cfg.warm_start) and prev is not None and prev["shape"] == tuple(x.shape)
            self.ug, self.lg = (prev["u"], prev["lam"]) if self.warm else (None, None)

    def run(self) -> tuple[float, torch.Tensor, dict, dict]:
        """The five phases; returns ``(this rank's loss part, defect sums, states, adjoints)``."""
        start = "guess" if self.warm else self.cfg.initial
        tol = self.cfg.tol if self.conv else None
        self.fsolver = MGRITSolver(self.eng.fwd_levels, self.eng.comm, self.forward_step,
                                   lambda p: self.info.point_shape(p, self.B), self.cfg.relax)
        with torch.no_grad(), bn_stats_frozen(self.eng.part):
            u, self.finfo = self.fsolver.solve(self.x if self.me == 0 else None, self.x, self.iters[0], tol,
                                               start, self.ug)
        self.clock.lap("fwd_solve")
        self.forward_sweep(u)
        self.clock.lap("fwd_sweep")
        loss, lam_n = self.loss()
        N = self.N
        self.bsolver = MGRITSolver(self.eng.bwd_levels, ReversedComm(self.eng.comm), self.adjoint_step,
                                   lambda tp: self.info.point_shape(N - tp, self.B), self.cfg.relax)
        lam, self.binfo = self.bsolver.solve(lam_n, self.x, self.iters[1], tol, start, self.lg)
        self.clock.lap("bwd_solve")
        self.adjoint_sweep(lam)
        self.clock.lap("bwd_sweep")
        return loss, self.defect, u, lam

    # ---- propagators -----------------------------------------------------------------------
    def forward_step(self, desc, u: torch.Tensor) -> torch.Tensor:
        """Φ for a step descriptor ``(t, m)``: layer ``t``, or a coarse step for ``m`` layers."""
        t, m = desc
        layer = self.eng.seq[t][1]
        if m is None:
            return layer(u)
        if self.cfg.coarse_params == "average":
            out = averaged_coarse_step(self.eng.layers(t, m), u)
            if out is not None:
                return out
        return coarse_step(layer, m, u)

    def adjoint_step(self, desc, lam: torch.Tensor) -> torch.Tensor:
        """The adjoint step at adjoint time ``t`` (layer ``N − 1 − t``): ``J_nᵀλ`` exactly, or
        for ``m`` layers ``Dλ + m·(J_nᵀλ − Dλ)`` with ``D`` the ReLU mask at the output (the
        linearisation of the coarse forward step), or the averaged step's Jacobian."""
        t, m = desc
        n = self.N - 1 - t
        inp, out = self.graphs[n]
        if m is not None and self.cfg.coarse_params == "average":
            # the interval is layers n−m+1..n; linearise the averaged step at u[n]
            with torch.enable_grad():
                v = inp.detach().requires_grad_(True)
                outc = averaged_coarse_step(self.eng.layers(n - m + 1, m), v)
            if outc is not None:
                return torch.autograd.grad(outc, v, lam)[0]
        (g,) = torch.autograd.grad(out, inp, lam, retain_graph=True)
        if m is None:
            return g
        dl = lam * (out > 0) if self.eng._relu_out[n] else lam
        return dl + m * (g - dl)

    # ---- sweeps and loss -------------------------------------------------------------------
    def forward_sweep(self, u: dict[int, torch.Tensor]) -> None:
        """F-relaxation that builds each owned layer's graph (BN statistics update once)."""
        owned = set(self.fsolver.c_points())
        for a, b in self.fsolver.intervals(0):
            s = u[a]
            for n in range(a, b):
                t0 = time.perf_counter()
                inp = s.detach().requires_grad_(True)
                out = self.eng.seq[n][1](inp)
                self.graphs[n] = (inp, out)
                s = out.detach()
                self.ltime[n] = time.perf_counter() - t0
            if b in owned:
                self.defect[0] += (s - u[b]).double().pow(2).sum()
                self.defect[1] += u[b].double().pow(2).sum()

    def loss(self) -> tuple[float, torch.Tensor | None]:
        """This rank's part of the loss (task loss on the last rank, regularizer everywhere;
        its gradient already accumulated) and the adjoint seed ``∂loss/∂logits``."""
        loss, lam_n, eng = 0.0, None, self.eng
        if self.me == self.P - 1:
            logits = self.graphs[self.N - 1][1]
            task = eng.loss_fn(logits, self.y)
            (lam_n,) = torch.autograd.grad(task, logits, retain_graph=True)
            loss += float(task.detach())
        if eng.regularizer is not None:
            kw = neighbour_params(eng) if getattr(eng.regularizer, "neighbours", False) else {}
            reg = eng.regularizer(eng.part, **kw)
            if reg.requires_grad:
                reg.backward()
            loss += float(reg.detach())
        return loss, lam_n

    def adjoint_sweep(self, lam: dict[int, torch.Tensor]) -> None:
        """Parameter gradients from the final adjoints (each layer's graph used once more)."""
        N = self.N
        bowned = set(self.bsolver.c_points()) - {N}  # the input point has no adjoint value here
        for a, b in self.bsolver.intervals(0):
            s = lam[a]
            for tp in range(a, b):
                n = N - 1 - tp
                t0 = time.perf_counter()
                inp, out = self.graphs.pop(n)
                params = [p for p in self.eng.seq[n][1].parameters() if p.requires_grad]
                inputs = params + ([inp] if n > 0 else [])
                if inputs:
                    torch.autograd.backward(out, s, inputs=inputs)
                s = inp.grad if inp.grad is not None else torch.zeros_like(inp)
                self.ltime[n] = self.ltime.get(n, 0.0) + time.perf_counter() - t0
            if b in bowned:
                self.defect[2] += (s - lam[b]).double().pow(2).sum()
                self.defect[3] += lam[b].double().pow(2).sum()
