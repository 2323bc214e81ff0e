"""Distributed nonlinear multigrid-reduction-in-time (MGRIT, FAS) for one-step recurrences.

The solver knows nothing about networks. A problem is a recurrence over "time" points
``0..N``::

    u[0] given,    u[n+1] = Φ(step_n, u[n]) + g[n+1]      (g = 0 on the finest level)

where ``Φ`` is supplied by the caller as ``step_fn(desc, u)`` and ``desc = (t, m)`` names a
step: ``t`` is the index of a finest-level step and ``m`` is ``None`` (apply step ``t``
exactly) or an integer ``m ≥ 2`` (a coarse step standing for ``m`` fine steps, injected from
step ``t``; the caller decides what that means, e.g. ``u + m·(f_t(u) − u)``). A step is
*coarsenable* when the caller flags it so (same shape in and out); other steps (shape
changes) are kept as exact steps on every level.

Hierarchy (:func:`build_hierarchy`): the fine steps are split into contiguous ranges, one per
rank. Within a rank, each maximal run of coarsenable steps is cut into chunks of ``cf``
steps (starting at the run's beginning); every chunk becomes one coarse step, every
non-coarsenable step stays a step of its own. Chunk starts are the C-points, so rank
boundaries are C-points on every level, every interval lies inside one rank, and every rank
keeps at least one step on every level.

One iteration (:meth:`MGRITSolver.solve`), level ℓ with right-hand side ``g``:

1. relax: F (propagate every interval from its C-point, all intervals at once) or FCF,
   chosen per level (e.g. ``"F,FCF"``: F on the finest level, FCF on the coarser ones);
2. C-point residual ``r = Φ(u[c−1]) + g[c] − u[c]`` (the norm is recorded on level 0);
3. FAS coarse problem ``v[k+1] = Φc(v[k]) + G[k+1]`` with
   ``G[k+1] = Φ(u[c_{k+1}−1]) + g[c_{k+1}] − Φc(u[c_k])`` and initial guess ``v = u[C]``;
   solved by a V-cycle on the next level, or sequentially (pipelined across ranks) on the
   coarsest;
4. correct ``u[C] ← v`` (injection; FAS), and on coarse levels F-relax again.

With F-relaxation the iteration is exact after as many iterations as there are level-1
intervals (exactness of MGRIT): interval ``k`` is exact after iteration ``k``. Iterations
count cycles: the start (nested coarse solve, zero, or a guess) is not one.

Communication: one tensor (or a stack of two) to the next rank per relaxation phase and per
level, and one all-reduce of two numbers per fine-level iteration.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch

from .comm import Comm

__all__ = ["Level", "build_hierarchy", "MGRITSolver", "SolveInfo"]

Step = tuple[int, "int | None"]


@dataclass
class Level:
    """One grid level: its steps (global list), the first step of each rank (``bounds``),
    each point's index on level 0, and the points kept on the next level (``cpts``)."""

    steps: list[Step]
    bounds: list[int]
    fine_point: list[int]
    cpts: list[int] | None = None

    @property
    def n_steps(self) -> int:
        return len(self.steps)


def build_hierarchy(coarsenable: list[bool], bounds: list[int], cf: int, max_levels: int) -> list[Level]:
    """Levels 0..L−1 (L ≤ ``max_levels``; fewer when a level cannot be coarsened further)."""
    n = len(coarsenable)
    if bounds[0] != 0 or bounds[-1] != n or any(b >= a for a, b in zip(bounds[1:], bounds[:-1])):
        raise ValueError(f"bad bounds {bounds} for {n} steps")
    if cf < 2:
        raise ValueError("coarsening factor must be >= 2")
    levels = [Level([(t, None) for t in range(n)], list(bounds), list(range(n + 1)))]
    while len(levels) < max_levels:
        fine = levels[-1]
        cpts: list[int] = []
        steps: list[Step] = []
        nb = [0]
        for r in range(len(bounds) - 1):
            i, hi = fine.bounds[r], fine.bounds[r + 1]
            while i < hi:
                cpts.append(i)
                t, m = fine.steps[i]
                j, total = i, 0
                while j < hi and j - i < cf and coarsenable[fine.steps[j][0]]:
                    total += fine.steps[j][1] or 1
                    j += 1
                if j - i <= 1:  # a non-coarsenable step, or a run of one: kept as it is
                    steps.append((t, m))
                    i += 1
                else:
                    steps.append((t, total))
                    i = j
            nb.append(len(steps))
        cpts.append(fine.n_steps)
        if len(steps) == fine.n_steps:
            break
        fine.cpts = cpts
        levels.append(Level(steps, nb, [fine.fine_point[c] for c in cpts]))
    return levels


@dataclass
class SolveInfo:
    """What one solve did: cycles after the start (the nested coarse start is not counted),
    and the relative C-point residual ‖r‖/‖u_C‖ after each relaxation on level 0."""

    iterations: int
    residuals: list[float]


def _add(a: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return a if b is None else a + b


class MGRITSolver:
    """One rank's part of a distributed FAS-MGRIT solve.

    Args:
        levels: from :func:`build_hierarchy` (identical on every rank).
        comm: the ranks, in time order (rank 0 owns point 0).
        step_fn: ``step_fn(desc, u) -> Φ(u)`` for a step descriptor ``(t, m)``.
        shape_fn: shape of the state at a level-0 point (for receives).
        relax: ``"F"``, ``"FCF"``, or one per level separated by commas (``"F,FCF"``; the
            last one holds for every deeper level).
    """

    def __init__(
        self,
        levels: list[Level],
        comm: Comm,
        step_fn: Callable[[Step, torch.Tensor], torch.Tensor],
        shape_fn: Callable[[int], tuple[int, ...]],
        relax: str = "F",
    ) -> None:
        self.levels, self.comm, self.step_fn, self.shape_fn = levels, comm, step_fn, shape_fn
        self.relax = relax
        self._relax_kinds = [r.strip() for r in relax.split(",")]
        self.me, self.P = comm.rank, comm.world_size
        if len(levels[0].bounds) != self.P + 1:
            raise ValueError(f"hierarchy has {len(levels[0].bounds) - 1} ranks, comm has {self.P}")
        self._iv = [self._owned_intervals(lv) for lv in range(len(levels) - 1)]
        self.like: torch.Tensor | None = None
        self.seq_s = 0.0  # seconds in coarsest-level (sequential, pipelined) solves

    # ---- bookkeeping -------------------------------------------------------------------
    def range(self, lvl: int) -> tuple[int, int]:
        b = self.levels[lvl].bounds
        return b[self.me], b[self.me + 1]

    def _owned_intervals(self, lvl: int) -> list[tuple[int, int]]:
        lo, hi = self.range(lvl)
        c = self.levels[lvl].cpts
        assert c is not None
        return [(a, b) for a, b in zip(c[:-1], c[1:]) if lo <= a < hi]

    def intervals(self, lvl: int = 0) -> list[tuple[int, int]]:
        """This rank's (C-point, next C-point) pairs on a level (one pair per step when the
        hierarchy has a single level)."""
        if lvl < len(self._iv):
            return self._iv[lvl]
        lo, hi = self.range(lvl)
        return [(n, n + 1) for n in range(lo, hi)]

    def _phi(self, lvl: int, n: int, u: torch.Tensor) -> torch.Tensor:
        return self.step_fn(self.levels[lvl].steps[n], u)

    def _shape(self, lvl: int, p: int) -> tuple[int, ...]:
        return tuple(self.shape_fn(self.levels[lvl].fine_point[p]))

    def _exchange(self, lvl: int, vals: dict[int, torch.Tensor], mult: int = 0) -> dict[int, torch.Tensor]:
        """Send the value for my ``hi`` point to the next rank, receive the one for my ``lo``."""
        lo, hi = self.range(lvl)
        if self.me < self.P - 1 and hi in vals:
            self.comm.isend(vals.pop(hi), self.me + 1)
        if self.me > 0:
            shape = self._shape(lvl, lo)
            vals[lo] = self.comm.recv((mult, *shape) if mult else shape, self.me - 1, self.like)
        self.comm.wait()
        return vals

    # ---- relaxation ----------------------------------------------------------------------
    def frelax(self, lvl: int, u: dict, g: dict) -> None:
        for a, b in self._iv[lvl]:
            for j in range(a + 1, b):
                u[j] = _add(self._phi(lvl, j - 1, u[j - 1]), g.get(j))

    def _cvals(self, lvl: int, u: dict) -> dict[int, torch.Tensor]:
        return {b: self._phi(lvl, b - 1, u[b - 1]) for a, b in self._iv[lvl]}

    def crelax(self, lvl: int, u: dict, g: dict) -> None:
        for b, v in self._exchange(lvl, self._cvals(lvl, u)).items():
            u[b] = _add(v, g.get(b))

    def relax_at(self, lvl: int) -> str:
        return self._relax_kinds[min(lvl, len(self._relax_kinds) - 1)]

    def _relax(self, lvl: int, u: dict, g: dict) -> None:
        self.frelax(lvl, u, g)
        if self.relax_at(lvl) == "FCF":
            self.crelax(lvl, u, g)
            self.frelax(lvl, u, g)

    def sequential(self, lvl: int, u: dict, g: dict) -> None:
        """Exact solve of a level, pipelined: each rank waits for its first point. The wall
        time goes to ``seq_s`` (the part of a solve that does not shrink as ranks are added)."""
        t0 = time.perf_counter()
        try:
            self._sequential(lvl, u, g)
        finally:
            self.seq_s += time.perf_counter() - t0

    def _sequential(self, lvl: int, u: dict, g: dict) -> None:
        lo, hi = self.range(lvl)
        if self.me > 0:
            u[lo] = _add(self.comm.recv(self._shape(lvl, lo), self.me - 1, self.like), g.get(lo))
        for n in range(lo, hi):
            val = self._phi(lvl, n, u[n])
            if n + 1 == hi and self.me < self.P - 1:
                self.comm.isend(val, self.me + 1)
            else:
                u[n + 1] = _add(val, g.get(n + 1))
        self.comm.wait()

    # ---- coarse grid -----------------------------------------------------------------------
    def _restrict(self, lvl: int, u: dict, g: dict) -> tuple[dict, dict, float, float]:
        """Coarse initial guess ``v``, FAS right-hand side ``G`` and C-point residual sums."""
        fine, coarse = self.levels[lvl], self.levels[lvl + 1]
        cidx = {c: k for k, c in enumerate(fine.cpts)}
        cv = self._cvals(lvl, u)
        msgs = {}
        for a, b in self._iv[lvl]:
            phic = self.step_fn(coarse.steps[cidx[a]], u[a])
            msgs[b] = torch.stack([cv[b], phic])
        msgs = self._exchange(lvl, msgs, mult=2)
        G: dict[int, torch.Tensor] = {}
        rsq = usq = 0.0
        for b, m in msgs.items():
            gb = g.get(b)
            r = _add(m[0], gb) - u[b]
            rsq += float(r.double().pow(2).sum())
            usq += float(u[b].double().pow(2).sum())
            G[cidx[b]] = _add(m[0] - m[1], gb)
        v = {cidx[p]: val for p, val in u.items() if p in cidx}
        return v, G, rsq, usq

    def _cycle(self, lvl: int, u: dict, g: dict) -> None:
        if lvl == len(self.levels) - 1:
            self.sequential(lvl, u, g)
            return
        self._relax(lvl, u, g)
        v, G, _, _ = self._restrict(lvl, u, g)
        self._cycle(lvl + 1, v, G)
        self._correct(lvl, u, v)
        self.frelax(lvl, u, g)

    def _correct(self, lvl: int, u: dict, v: dict) -> None:
        c = self.levels[lvl].cpts
        for k, val in v.items():
            if c[k] != 0:
                u[c[k]] = val

    def nested_start(self, u: dict) -> None:
        """Initial guess at the level-0 C-points: exact solve on the coarsest level, then
        F-relaxation down the levels (nested iteration; one coarse-grid solve)."""
        top = len(self.levels) - 1
        w = {0: u[0]} if self.me == 0 else {}
        self.sequential(top, w, {})
        for lvl in range(top - 1, -1, -1):
            c = self.levels[lvl].cpts
            w = {c[k]: val for k, val in w.items()}
            if lvl > 0:
                self.frelax(lvl, w, {})
        u.update(w)

    def c_points(self) -> list[int]:
        """Level-0 C-points whose values this rank holds (excluding point 0)."""
        pts = [a for a, _ in self.intervals(0) if a != 0]
        if self.me == self.P - 1:
            pts.append(self.levels[0].n_steps)
        return pts

    # ---- driver --------------------------------------------------------------------------
    def solve(
        self,
        u0: torch.Tensor | None,
        like: torch.Tensor,
        max_iter: int,
        tol: float | None = None,
        start: str = "coarse",
        guess: dict[int, torch.Tensor] | None = None,
    ) -> tuple[dict[int, torch.Tensor], SolveInfo]:
        """Iterate on level 0; returns the owned C-point values (F-points not yet relaxed:
        call :meth:`frelax` with level 0 or sweep them yourself) and a :class:`SolveInfo`.

        Args:
            u0: the state at point 0 (used on rank 0 only).
            like: any tensor of the states' dtype and device (for receives).
            max_iter: cycles after the start (a cap when ``tol`` is given). With F-relaxation
                the solve is exact after as many cycles as there are level-1 intervals.
            tol: stop when the relative C-point residual is ``<= tol`` (``None``: never).
            start: ``"coarse"`` (nested iteration), ``"zero"``, or ``"guess"`` (use ``guess``
                for the C-points).
        """
        self.like = like
        u: dict[int, torch.Tensor] = {0: u0} if self.me == 0 else {}
        if len(self.levels) == 1:  # nothing to coarsen: one exact pipelined sweep
            self.sequential(0, u, {})
            return u, SolveInfo(1, [])
        its = 0
        if start == "coarse":
            self.nested_start(u)
        else:
            for p in self.c_points():
                if start == "guess" and guess is not None and p in guess:
                    u[p] = guess[p]
                else:
                    u[p] = torch.zeros(self._shape(0, p), dtype=like.dtype, device=like.device)
        res: list[float] = []
        while its < max_iter:
            self._relax(0, u, {})
            v, G, rsq, usq = self._restrict(0, u, {})
            rsq, usq = self.comm.all_reduce_sum([rsq, usq])
            res.append((rsq ** 0.5) / max(usq ** 0.5, 1e-30))
            if tol is not None and res[-1] <= tol:
                break
            self._cycle(1, v, G)
            self._correct(0, u, v)
            its += 1
        return u, SolveInfo(its, res)
