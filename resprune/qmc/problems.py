"""Parametric data-to-observable maps ``y -> G(y)`` used as surrogate targets.

Every problem is a frozen dataclass with a ``dim`` and a batched ``__call__``:
``problem(y)`` takes ``y`` of shape ``(n, dim)`` in the parameter box ``[-1/2, 1/2]^dim``
(the ``"centered"`` domain of :mod:`resprune.qmc.points`) and returns ``G(y)`` of shape
``(n,)``. Registered names (:func:`list_problems`, :func:`create_problem`):

``smooth50``
    ``f(y) = 1 / (1 + 1/2 * sum_j j^-2.5 y_j)``, ``d = 50`` (:class:`SmoothFunction`).
``elliptic16`` / ``elliptic32``
    ``-div(a(x, y) grad u) = 1`` on the unit square, ``u = 0`` on the boundary, affine
    coefficient ``a(x, y) = 1 + sum_j y_j psi_j(x)`` with
    ``psi_j(x) = c j^-2 sin(pi k1 x1) sin(pi k2 x2)``; observable the mean of ``u`` over
    ``[1/2, 1]^2``. Five-point finite differences, one sparse LU per sample
    (:class:`EllipticDiffusion`).
``parabolic16``
    ``u_t - (a(x, y) u_x)_x = 0`` on ``(0, 1) x (0, T]``, ``u(x, 0) = sin(pi x)``,
    ``u(0) = u(1) = 0``, ``a(x, y) = 1 + sum_j y_j c j^-2 cos(j pi x)``; observable the
    mean of ``u(., T)`` over ``[1/4, 3/4]``. Finite differences in space, Crank-Nicolson in
    time, tridiagonal solves batched over samples (:class:`HeatEquation`).

The solvers are second order in ``h`` (and ``dt``); ``tests/test_qmc_problems.py``
measures it on manufactured solutions.

Example:
    >>> import numpy as np
    >>> from resprune.qmc.problems import create_problem
    >>> g = create_problem("elliptic16", n_grid=16)
    >>> g(np.zeros((2, 16))).shape
    (2,)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Callable

import numpy as np
import scipy.sparse as sp
from scipy.sparse.linalg import splu

logger = logging.getLogger(__name__)

__all__ = [
    "SmoothFunction",
    "EllipticDiffusion",
    "HeatEquation",
    "create_problem",
    "list_problems",
    "solve_tridiagonal",
]

Source2D = Callable[[np.ndarray, np.ndarray], np.ndarray]
Source1D = Callable[[np.ndarray, float], np.ndarray]


def _check_y(y: np.ndarray, dim: int) -> np.ndarray:
    y = np.atleast_2d(np.asarray(y, dtype=np.float64))
    if y.shape[1] != dim:
        raise ValueError(f"expected parameters of shape (n, {dim}), got {y.shape}")
    return y


@dataclass(frozen=True)
class SmoothFunction:
    """``f(y) = 1 / (1 + scale * sum_j j^-decay y_j)`` on ``[-1/2, 1/2]^dim``.

    Holomorphic in every ``y_j``; with the defaults the denominator stays in
    ``[0.66, 1.34]``.
    """

    dim: int = 50
    decay: float = 2.5
    scale: float = 0.5
    version: int = 1

    def __post_init__(self) -> None:
        if self.dim < 1 or self.decay <= 0:
            raise ValueError("need dim >= 1 and decay > 0")
        bound = 0.5 * self.scale * float(np.sum(np.arange(1, self.dim + 1) ** -self.decay))
        if bound >= 1:
            raise ValueError(f"denominator may vanish on the box (bound {bound:.3f} >= 1)")

    def __call__(self, y: np.ndarray) -> np.ndarray:
        y = _check_y(y, self.dim)
        w = np.arange(1, self.dim + 1, dtype=np.float64) ** -self.decay
        return 1.0 / (1.0 + self.scale * (y @ w))


def _modes_2d(count: int) -> np.ndarray:
    """First ``count`` pairs ``(k1, k2) >= 1`` ordered by ``k1 + k2``, then ``k1``."""
    out: list[tuple[int, int]] = []
    s = 2
    while len(out) < count:
        out += [(k1, s - k1) for k1 in range(1, s)]
        s += 1
    return np.array(out[:count], dtype=np.float64)


def affine_coefficient_min(mean: float, amplitude: float, decay: float, dim: int) -> float:
    """``min a = mean − ½·amplitude·Σ_j j^−decay`` for ``a = mean + Σ_j y_j·amplitude·j^−decay·φ_j``
    with ``|y_j| ≤ ½`` and ``|φ_j| ≤ 1`` (the bound both PDE problems check)."""
    j = np.arange(1, dim + 1, dtype=np.float64)
    return mean - 0.5 * amplitude * float(np.sum(j**-decay))


@dataclass(frozen=True, kw_only=True)
class _AffinePDE:
    """What the PDE problems share: the parameters of their affine coefficient
    ``a(x, y) = mean + sum_j y_j amplitude j^-decay phi_j(x)`` with ``|phi_j| <= 1``, its
    positivity check, and ``G(y) = observable(solve(y))`` (subclasses define both)."""

    dim: int = 16
    amplitude: float = 0.6
    decay: float = 2.0
    mean: float = 1.0
    version: int = 1

    @property
    def a_min(self) -> float:
        """Lower bound of ``a`` over the domain and the parameter box."""
        return affine_coefficient_min(self.mean, self.amplitude, self.decay, self.dim)

    def _check_coefficient(self, kind: str) -> None:
        if self.a_min <= 0:
            raise ValueError(f"not uniformly {kind} on the box: a >= {self.a_min:.3f}")

    def __call__(self, y: np.ndarray) -> np.ndarray:
        return self.observable(self.solve(y))  # type: ignore[attr-defined]


@dataclass(frozen=True, kw_only=True)
class EllipticDiffusion(_AffinePDE):
    """Affine-parametric diffusion on the unit square, five-point finite differences.

    ``-div(a grad u) = f`` in ``(0, 1)^2``, ``u = 0`` on the boundary, with
    ``a(x, y) = mean + sum_j y_j psi_j(x)``,
    ``psi_j(x) = amplitude * j^-decay * sin(pi k1_j x1) sin(pi k2_j x2)``.
    Uniform ellipticity on the box is checked: ``a >= mean - amplitude/2 * sum j^-decay``.
    The matrix is affine in ``y`` too: ``A(y) = A_0 + sum_j y_j A_j``, assembled once as a
    linear map from edge-midpoint coefficients to the CSC data array.

    Args:
        dim: number of parameters ``d``.
        n_grid: intervals per side (``h = 1 / n_grid``, even so ``x = 1/2`` is a node).
        amplitude: ``c`` in ``psi_j``.
        decay: algebraic decay of ``psi_j``.
        mean: ``a_bar`` (constant).
        obs_box: observable region ``[lo, 1]^2`` (mean of ``u`` over it, trapezoidal rule).
    """

    n_grid: int = 32
    obs_lo: float = 0.5

    def __post_init__(self) -> None:
        if self.dim < 1:
            raise ValueError(f"dim must be >= 1, got {self.dim}")
        if self.n_grid < 4 or self.n_grid % 2:
            raise ValueError(f"n_grid must be even and >= 4, got {self.n_grid}")
        if not (self.obs_lo * self.n_grid).is_integer() or not 0 <= self.obs_lo < 1:
            raise ValueError("obs_lo must be a grid line in [0, 1)")
        self._check_coefficient("elliptic")

    # ---- coefficient -------------------------------------------------------------------
    def psi(self, x1: np.ndarray, x2: np.ndarray) -> np.ndarray:
        """``psi_j`` at points ``(x1, x2)``: array ``(*x1.shape, dim)``."""
        k = _modes_2d(self.dim)
        amp = self.amplitude * np.arange(1, self.dim + 1, dtype=np.float64) ** -self.decay
        x1, x2 = np.asarray(x1)[..., None], np.asarray(x2)[..., None]
        return amp * np.sin(np.pi * k[:, 0] * x1) * np.sin(np.pi * k[:, 1] * x2)

    def coefficient(self, x1: np.ndarray, x2: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, ...]:
        """``a, da/dx1, da/dx2`` at ``(x1, x2)`` for one parameter vector ``y``."""
        k = _modes_2d(self.dim)
        amp = self.amplitude * np.arange(1, self.dim + 1, dtype=np.float64) ** -self.decay * y
        x1, x2 = np.asarray(x1)[..., None], np.asarray(x2)[..., None]
        s1, s2 = np.sin(np.pi * k[:, 0] * x1), np.sin(np.pi * k[:, 1] * x2)
        c1, c2 = np.cos(np.pi * k[:, 0] * x1), np.cos(np.pi * k[:, 1] * x2)
        a = self.mean + np.sum(amp * s1 * s2, -1)
        d1 = np.sum(amp * np.pi * k[:, 0] * c1 * s2, -1)
        d2 = np.sum(amp * np.pi * k[:, 1] * s1 * c2, -1)
        return a, d1, d2

    # ---- discretisation ----------------------------------------------------------------
    @cached_property
    def _fd(self) -> dict[str, Any]:
        n, h = self.n_grid, 1.0 / self.n_grid
        m = n - 1
        idx = -np.ones((n + 1, n + 1), dtype=np.int64)  # node (i, j) -> unknown, -1 on boundary
        idx[1:n, 1:n] = np.arange(m * m).reshape(m, m)
        # edges between neighbours, at least one of which is interior
        i, j = np.meshgrid(np.arange(n), np.arange(1, n), indexing="ij")
        hp, hq = idx[i, j].ravel(), idx[i + 1, j].ravel()  # x1-direction edges
        hx1, hx2 = ((i + 0.5) * h).ravel(), (j * h).ravel()
        vp, vq = idx[j.T, i.T].ravel(), idx[j.T, i.T + 1].ravel()  # x2-direction edges
        vx1, vx2 = (j.T * h).ravel(), ((i.T + 0.5) * h).ravel()
        p, q = np.concatenate([hp, vp]), np.concatenate([hq, vq])
        ex1, ex2 = np.concatenate([hx1, vx1]), np.concatenate([hx2, vx2])
        e = np.arange(len(p))
        rows, cols, edges, vals = [], [], [], []
        for a_, b_ in ((p, q), (q, p)):
            ok = a_ >= 0
            rows.append(a_[ok]), cols.append(a_[ok]), edges.append(e[ok])
            vals.append(np.full(ok.sum(), 1 / h**2))
            ok = (a_ >= 0) & (b_ >= 0)
            rows.append(a_[ok]), cols.append(b_[ok]), edges.append(e[ok])
            vals.append(np.full(ok.sum(), -1 / h**2))
        r, c = np.concatenate(rows), np.concatenate(cols)
        keys = c * (m * m) + r  # CSC order: by column, then row
        uniq, inv = np.unique(keys, return_inverse=True)
        to_data = sp.csr_matrix(
            (np.concatenate(vals), (inv, np.concatenate(edges))), shape=(len(uniq), len(e))
        )
        indptr = np.concatenate([[0], np.cumsum(np.bincount(uniq // (m * m), minlength=m * m))])
        # trapezoidal weights of the observable (mean over [obs_lo, 1]^2)
        g = np.linspace(0, 1, n + 1)
        w1 = np.where(g >= self.obs_lo - 1e-12, h, 0.0)
        lo = int(round(self.obs_lo * n))
        w1[lo] *= 0.5
        w1[n] *= 0.5
        w1 /= w1.sum()
        w = np.outer(w1, w1)[1:n, 1:n].ravel()  # boundary nodes carry u = 0
        xi1, xi2 = np.meshgrid(g[1:n], g[1:n], indexing="ij")
        return {
            "to_data": to_data,
            "indices": (uniq % (m * m)).astype(np.int32),
            "indptr": indptr.astype(np.int32),
            "size": m * m,
            "a_bar_edges": np.full(len(e), self.mean),
            "psi_edges": self.psi(ex1, ex2),
            "weights": w,
            "nodes": (xi1.ravel(), xi2.ravel()),
        }

    def nodes(self) -> tuple[np.ndarray, np.ndarray]:
        """Coordinates ``(x1, x2)`` of the interior nodes, in unknown order."""
        return self._fd["nodes"]

    def matrix(self, y: np.ndarray) -> sp.csc_matrix:
        """The finite-difference matrix ``A(y)`` (CSC)."""
        fd = self._fd
        a_edges = fd["a_bar_edges"] + fd["psi_edges"] @ np.asarray(y, dtype=np.float64)
        data = fd["to_data"] @ a_edges
        return sp.csc_matrix((data, fd["indices"], fd["indptr"]), shape=(fd["size"],) * 2)

    def solve(self, y: np.ndarray, source: Source2D | None = None) -> np.ndarray:
        """Nodal solutions at the interior nodes, ``(n, (n_grid-1)^2)``.

        Args:
            y: parameters ``(n, dim)``.
            source: ``f(x1, x2)``; ``None`` means ``f = 1``.
        """
        y = _check_y(y, self.dim)
        x1, x2 = self.nodes()
        rhs = np.ones_like(x1) if source is None else np.asarray(source(x1, x2), dtype=np.float64)
        out = np.empty((len(y), self._fd["size"]))
        for s, ys in enumerate(y):
            out[s] = splu(self.matrix(ys)).solve(rhs)
        return out

    def observable(self, u: np.ndarray) -> np.ndarray:
        """Mean of ``u`` over ``[obs_lo, 1]^2`` (trapezoidal rule on the nodes)."""
        return u @ self._fd["weights"]


def solve_tridiagonal(lower: np.ndarray, diag: np.ndarray, upper: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """Thomas algorithm, batched over the leading axis.

    Args:
        lower: ``(B, m)`` sub-diagonal (``lower[:, 0]`` unused).
        diag: ``(B, m)`` diagonal.
        upper: ``(B, m)`` super-diagonal (``upper[:, -1]`` unused).
        rhs: ``(B, m)``.

    Returns:
        ``(B, m)`` solutions. No pivoting: meant for diagonally dominant systems.
    """
    m = diag.shape[1]
    c = np.empty_like(diag)
    d = np.empty_like(rhs)
    c[:, 0] = upper[:, 0] / diag[:, 0]
    d[:, 0] = rhs[:, 0] / diag[:, 0]
    for i in range(1, m):
        den = diag[:, i] - lower[:, i] * c[:, i - 1]
        c[:, i] = upper[:, i] / den
        d[:, i] = (rhs[:, i] - lower[:, i] * d[:, i - 1]) / den
    x = np.empty_like(rhs)
    x[:, -1] = d[:, -1]
    for i in range(m - 2, -1, -1):
        x[:, i] = d[:, i] - c[:, i] * x[:, i + 1]
    return x


@dataclass(frozen=True, kw_only=True)
class HeatEquation(_AffinePDE):
    """1D heat equation with an uncertain affine conductivity, Crank-Nicolson in time.

    ``u_t - (a(x, y) u_x)_x = f`` on ``(0, 1) x (0, T]``, ``u(0, t) = u(1, t) = 0``,
    ``u(x, 0) = sin(pi x)``, ``a(x, y) = mean + sum_j y_j amplitude j^-decay cos(j pi x)``
    (``a_x = 0`` at both ends, so data and boundary conditions are compatible).
    The observable is the mean of ``u(., T)`` over ``[obs_lo, obs_hi]`` (trapezoidal).

    Args:
        dim: number of parameters ``d``.
        n_grid: space intervals (``h = 1 / n_grid``).
        n_steps: time steps (``dt = T / n_steps``).
        final_time: ``T``.
        chunk: samples per batched solve.
    """

    n_grid: int = 64
    n_steps: int = 40
    final_time: float = 0.1
    obs_lo: float = 0.25
    obs_hi: float = 0.75
    chunk: int = 4096

    def __post_init__(self) -> None:
        if self.dim < 1 or self.n_grid < 4 or self.n_steps < 1 or self.final_time <= 0:
            raise ValueError("need dim >= 1, n_grid >= 4, n_steps >= 1, final_time > 0")
        for v in (self.obs_lo, self.obs_hi):
            if not (v * self.n_grid).is_integer():
                raise ValueError("obs_lo and obs_hi must be grid points")
        if not 0 <= self.obs_lo < self.obs_hi <= 1:
            raise ValueError("need 0 <= obs_lo < obs_hi <= 1")
        self._check_coefficient("parabolic")

    def coefficient(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``a`` and ``da/dx`` at ``x`` for parameters ``y`` (``(n, dim)`` -> ``(n, len(x))``)."""
        j = np.arange(1, self.dim + 1, dtype=np.float64)
        amp = np.atleast_2d(y) * self.amplitude * j**-self.decay
        arg = np.pi * np.outer(j, x)
        return self.mean + amp @ np.cos(arg), -(amp * np.pi * j) @ np.sin(arg)

    def solve(self, y: np.ndarray, source: Source1D | None = None,
              initial: Callable[[np.ndarray], np.ndarray] | None = None) -> np.ndarray:
        """Interior nodal values of ``u(., T)``, ``(n, n_grid - 1)``.

        Args:
            y: parameters ``(n, dim)``.
            source: ``f(x, t)`` evaluated on the interior nodes; ``None`` means ``0``.
            initial: ``u(x, 0)``; ``None`` means ``sin(pi x)``.
        """
        y = _check_y(y, self.dim)
        return np.concatenate(
            [self._solve_chunk(y[s : s + self.chunk], source, initial) for s in range(0, len(y), self.chunk)]
        ) if len(y) else np.empty((0, self.n_grid - 1))

    def _solve_chunk(self, y: np.ndarray, source: Source1D | None,
                     initial: Callable[[np.ndarray], np.ndarray] | None) -> np.ndarray:
        n, h = self.n_grid, 1.0 / self.n_grid
        dt = self.final_time / self.n_steps
        x = np.arange(1, n) * h
        a_mid, _ = self.coefficient((np.arange(n) + 0.5) * h, y)  # (B, n) at x_{i+1/2}
        diag = (a_mid[:, :-1] + a_mid[:, 1:]) / h**2  # operator A = -(a u_x)_x
        off_lo = -a_mid[:, :-1] / h**2  # A[i, i-1] for interior i = 1..n-1
        off_up = -a_mid[:, 1:] / h**2  # A[i, i+1]
        u = np.broadcast_to(np.sin(np.pi * x) if initial is None else initial(x), (len(y), n - 1)).copy()
        k = 0.5 * dt
        lo_i, dg_i, up_i = k * off_lo, 1.0 + k * diag, k * off_up
        f_old = None if source is None else source(x, 0.0)
        for step in range(1, self.n_steps + 1):
            au = diag * u
            au[:, 1:] += off_lo[:, 1:] * u[:, :-1]
            au[:, :-1] += off_up[:, :-1] * u[:, 1:]
            rhs = u - k * au
            if source is not None:
                f_new = source(x, step * dt)
                rhs += k * (f_old + f_new)
                f_old = f_new
            u = solve_tridiagonal(lo_i, dg_i, up_i, rhs)
        return u

    def observable(self, u: np.ndarray) -> np.ndarray:
        """Mean of ``u`` over ``[obs_lo, obs_hi]`` (trapezoidal rule on the nodes)."""
        n = self.n_grid
        lo, hi = round(self.obs_lo * n), round(self.obs_hi * n)
        w = np.zeros(n + 1)
        w[lo : hi + 1] = 1.0
        w[lo] = w[hi] = 0.5
        w /= w.sum()
        return u @ w[1:n]


_REGISTRY: dict[str, Callable[..., Any]] = {
    "smooth50": lambda **kw: SmoothFunction(**{"dim": 50, **kw}),
    "elliptic16": lambda **kw: EllipticDiffusion(**{"dim": 16, **kw}),
    "elliptic32": lambda **kw: EllipticDiffusion(**{"dim": 32, **kw}),
    "parabolic16": lambda **kw: HeatEquation(**{"dim": 16, **kw}),
}


def list_problems() -> list[str]:
    """Registered problem names."""
    return list(_REGISTRY)


def create_problem(name: str, **overrides: Any) -> SmoothFunction | EllipticDiffusion | HeatEquation:
    """Build a registered problem; keyword arguments override its dataclass fields."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown problem {name!r}; choose from {list_problems()}")
    return _REGISTRY[name](**overrides)
