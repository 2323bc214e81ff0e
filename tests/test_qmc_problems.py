"""Problems of resprune.qmc: definitions, affine structure, and measured convergence order."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.linalg import solve_banded

from resprune.qmc.problems import (
    EllipticDiffusion,
    HeatEquation,
    SmoothFunction,
    create_problem,
    list_problems,
    solve_tridiagonal,
)

PI = np.pi


def _order(hs: list[float], errs: list[float]) -> float:
    return float(np.polyfit(np.log(hs), np.log(errs), 1)[0])


def test_registry_dims_and_shapes() -> None:
    dims = {"smooth50": 50, "elliptic16": 16, "elliptic32": 32, "parabolic16": 16}
    assert set(list_problems()) == set(dims)
    rng = np.random.default_rng(0)
    for name, d in dims.items():
        p = create_problem(name, **({} if name == "smooth50" else {"n_grid": 8}))
        assert p.dim == d
        g = p(rng.random((3, d)) - 0.5)
        assert g.shape == (3,) and np.all(np.isfinite(g))
    with pytest.raises(ValueError):
        create_problem("nope")


def test_smooth_function_values() -> None:
    f = SmoothFunction()
    assert f(np.zeros((1, 50)))[0] == 1.0
    y = np.zeros((1, 50))
    y[0, 0], y[0, 3] = 0.5, -0.5  # 1 / (1 + 0.5 * (0.5 - 0.5 * 4^-2.5)) = 1 / (1 + 0.25 - 0.0078125)
    assert f(y)[0] == pytest.approx(1 / 1.2421875, rel=1e-14)
    with pytest.raises(ValueError):
        SmoothFunction(dim=3, scale=5.0)  # denominator could vanish


def test_uniform_ellipticity_checked() -> None:
    assert EllipticDiffusion(dim=32).a_min > 0.5
    with pytest.raises(ValueError):
        EllipticDiffusion(amplitude=2.0)
    with pytest.raises(ValueError):
        HeatEquation(amplitude=2.0)


def test_elliptic_matrix_is_affine_and_symmetric() -> None:
    p = EllipticDiffusion(dim=4, n_grid=8)
    rng = np.random.default_rng(1)
    y1, y2 = rng.random(4) - 0.5, rng.random(4) - 0.5
    a0 = p.matrix(np.zeros(4))
    lhs = (p.matrix(y1 + y2) - p.matrix(y1) - p.matrix(y2) + a0).toarray()
    assert np.abs(lhs).max() < 1e-10 * np.abs(a0.toarray()).max()
    a = p.matrix(y1).toarray()
    np.testing.assert_allclose(a, a.T, rtol=0, atol=1e-12)
    assert np.linalg.eigvalsh(a).min() > 0
    # batched solve equals one-by-one
    ys = rng.random((3, 4)) - 0.5
    np.testing.assert_allclose(p(ys), np.concatenate([p(y[None]) for y in ys]), rtol=1e-14)


def test_elliptic_second_order_convergence() -> None:
    """Manufactured u = sin(pi x1) sin(2 pi x2) exp(x1) with the parametric coefficient.

    Measured orders (h = 1/8 .. 1/64): 2.00 for the nodal max error and the observable.
    Tolerance: order > 1.9.
    """
    y = np.random.default_rng(0).random(16) - 0.5

    def u(x1, x2):
        return np.sin(PI * x1) * np.sin(2 * PI * x2) * np.exp(x1)

    def derivs(x1, x2):
        s1, c1, s2, c2, e = np.sin(PI * x1), np.cos(PI * x1), np.sin(2 * PI * x2), np.cos(2 * PI * x2), np.exp(x1)
        u1 = (PI * c1 + s1) * s2 * e
        u2 = s1 * 2 * PI * c2 * e
        lap = (-PI**2 * s1 + 2 * PI * c1 + s1) * s2 * e - 4 * PI**2 * s1 * s2 * e
        return u1, u2, lap

    g, w = np.polynomial.legendre.leggauss(30)
    g, w = 0.75 + 0.25 * g, 0.25 * w
    exact_obs = float((np.outer(w, w) * u(*np.meshgrid(g, g, indexing="ij"))).sum() / 0.25)
    hs, e_max, e_obs = [], [], []
    for n in (8, 16, 32, 64):
        p = EllipticDiffusion(dim=16, n_grid=n)

        def f(x1, x2, p=p):
            a, d1, d2 = p.coefficient(x1, x2, y)
            u1, u2, lap = derivs(x1, x2)
            return -(a * lap + d1 * u1 + d2 * u2)

        uh = p.solve(y[None], f)[0]
        hs.append(1 / n)
        e_max.append(np.abs(uh - u(*p.nodes())).max())
        e_obs.append(abs(p.observable(uh) - exact_obs))
    assert _order(hs, e_max) > 1.9, e_max
    assert _order(hs, e_obs) > 1.9, e_obs


def test_thomas_matches_banded_solver() -> None:
    rng = np.random.default_rng(2)
    b, m = 5, 12
    lo, up = -rng.random((b, m)), -rng.random((b, m))
    dg = 3 + rng.random((b, m))
    rhs = rng.random((b, m))
    x = solve_tridiagonal(lo, dg, up, rhs)
    for i in range(b):
        ab = np.zeros((3, m))
        ab[0, 1:], ab[1], ab[2, :-1] = up[i, :-1], dg[i], lo[i, 1:]
        np.testing.assert_allclose(x[i], solve_banded((1, 1), ab, rhs[i]), rtol=1e-12)


def test_heat_crank_nicolson_second_order() -> None:
    """Manufactured u = exp(-t) sin(pi x) (1 + x), dt = T / n_grid (Crank-Nicolson).

    Measured order (h = 1/16 .. 1/128): 2.00 in the max error at T. Tolerance: > 1.9.
    """
    y = np.random.default_rng(0).random((1, 16)) - 0.5
    T = 0.1

    def ue(x, t):
        return np.exp(-t) * np.sin(PI * x) * (1 + x)

    hs, errs = [], []
    for n in (16, 32, 64, 128):
        p = HeatEquation(dim=16, n_grid=n, n_steps=n, final_time=T)
        x = np.arange(1, n) / n
        a, ax = (v[0] for v in p.coefficient(x, y))

        def f(x, t, a=a, ax=ax):
            ux = np.exp(-t) * (PI * np.cos(PI * x) * (1 + x) + np.sin(PI * x))
            uxx = np.exp(-t) * (-(PI**2) * np.sin(PI * x) * (1 + x) + 2 * PI * np.cos(PI * x))
            return -ue(x, t) - (ax * ux + a * uxx)

        u = p.solve(y, f, initial=lambda x: ue(x, 0.0))[0]
        hs.append(1 / n)
        errs.append(np.abs(u - ue(x, T)).max())
    assert _order(hs, errs) > 1.9, errs


def test_heat_observable_constant_coefficient_exact() -> None:
    """a = 1 (amplitude 0): u = exp(-pi^2 t) sin(pi x); mean over [1/4, 3/4] known in closed form."""
    p = HeatEquation(dim=2, amplitude=0.0, n_grid=128, n_steps=128)
    exact = np.exp(-PI**2 * p.final_time) * (2 * np.cos(PI / 4) / PI) / 0.5
    assert p(np.zeros((1, 2)))[0] == pytest.approx(exact, rel=2e-4)  # O(h^2 + dt^2) ~ 1e-4
