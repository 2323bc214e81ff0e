"""Training point sets: Monte Carlo, Sobol' and order-2 interlaced Sobol' nets.

Contract of every generator in this module:

* ``generate_points(config, n)`` returns a ``float64`` array of shape ``(n, config.dim)``.
* With ``domain="unit"`` the points lie in ``[0, 1)^d``; with ``domain="centered"`` (the
  default, the parameter box of :mod:`resprune.qmc.problems`) they are shifted by ``-1/2``
  into ``[-1/2, 1/2)^d``. The shift is exact in floating point.
* The same ``(kind, dim, seed, bits)`` always gives the same points, and the first ``m``
  points of a set of size ``n > m`` are the set of size ``m`` (every kind is a *sequence*).
  For the Sobol' kinds a prefix of ``2^k`` points is itself a ``(t, k, s)``-net, so the
  nested pair ``(P_N, P_{N/2})`` used by the extrapolated loss comes for free.
* QMC kinds need ``n`` to be a power of two (base-2 nets); Monte Carlo takes any ``n``.

Kinds (see :func:`list_point_sets`):

``mc``
    i.i.d. uniform points from ``numpy.random.default_rng(seed)``.
``sobol`` / ``sobol-scrambled``
    SciPy's Sobol' sequence (Joe-Kuo direction numbers), unscrambled or with SciPy's
    linear matrix scrambling plus digital shift (a digital scrambling, so every net
    property is kept). ``seed`` only matters when scrambled.
``interlaced2`` / ``interlaced2-scrambled``
    An order-2 digital net (Dick 2008): a ``2d``-dimensional Sobol' net whose coordinates
    ``(x_{2j-1}, x_{2j})`` are merged digit by digit into output coordinate ``j``:
    ``x_{2j-1} = 0.a1 a2 a3...``, ``x_{2j} = 0.b1 b2 b3...`` (base 2) give
    ``y_j = 0.a1 b1 a2 b2 a3 b3...``. With ``bits`` input digits the output carries
    ``2 * bits`` digits (``bits <= 26`` keeps it exact in a ``float64``).

Example:
    >>> from resprune.qmc.points import PointSetConfig, generate_points
    >>> y = generate_points(PointSetConfig("interlaced2", dim=3), 8)
    >>> y.shape, float(y.min()) >= -0.5, float(y.max()) < 0.5
    ((8, 3), True, True)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import numpy as np
from scipy.stats import qmc

logger = logging.getLogger(__name__)

__all__ = [
    "PointSetConfig",
    "generate_points",
    "list_point_sets",
    "sobol_integers",
    "interlace_integers",
    "interlaced_sobol",
    "nested_pair",
    "is_power_of_two",
]

_MAX_FLOAT_BITS = 52  # digits of a float64 fraction in [0, 1) that are exact


def is_power_of_two(n: int) -> bool:
    """True for 1, 2, 4, 8, ..."""
    return n >= 1 and (n & (n - 1)) == 0


@dataclass(frozen=True)
class PointSetConfig:
    """Which point set to draw.

    Args:
        kind: one of :func:`list_point_sets`.
        dim: number of output coordinates ``d``.
        seed: RNG seed (Monte Carlo sample, or the Sobol' scrambling).
        domain: ``"unit"`` for ``[0, 1)^d``, ``"centered"`` for ``[-1/2, 1/2)^d``.
        bits: binary digits per Sobol' coordinate (``interlaced2`` outputs ``2 * bits``).
        version: schema version of this config.
    """

    kind: str = "sobol-scrambled"
    dim: int = 16
    seed: int = 0
    domain: str = "centered"
    bits: int = 26
    version: int = 1

    def __post_init__(self) -> None:
        if self.kind not in _REGISTRY:
            raise ValueError(f"unknown point set {self.kind!r}; choose from {list_point_sets()}")
        if self.dim < 1:
            raise ValueError(f"dim must be >= 1, got {self.dim}")
        if self.domain not in ("unit", "centered"):
            raise ValueError(f"domain must be 'unit' or 'centered', got {self.domain!r}")
        factor = 2 if self.kind.startswith("interlaced2") else 1
        if not 1 <= self.bits * factor <= _MAX_FLOAT_BITS:
            raise ValueError(
                f"bits={self.bits} gives {self.bits * factor} output digits; need 1..{_MAX_FLOAT_BITS}"
            )
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")


def sobol_integers(n: int, dim: int, *, bits: int, scramble: bool, seed: int = 0) -> np.ndarray:
    """The first ``n`` Sobol' points as integers ``k`` with coordinate ``k / 2**bits``.

    Uses :class:`scipy.stats.qmc.Sobol` (no hand-written direction numbers); SciPy returns
    ``k * 2**-bits`` exactly for ``bits <= 52``, so multiplying back recovers the digits.

    Args:
        n: number of points, a power of two.
        dim: dimension.
        bits: digits per coordinate.
        scramble: apply SciPy's linear matrix scrambling + digital shift.
        seed: seed of the scrambling.

    Returns:
        ``uint64`` array of shape ``(n, dim)``.
    """
    if not is_power_of_two(n):
        raise ValueError(f"Sobol' nets need n = 2^m points, got n={n}")
    if not 1 <= bits <= _MAX_FLOAT_BITS:
        raise ValueError(f"bits must be in 1..{_MAX_FLOAT_BITS}, got {bits}")
    engine = qmc.Sobol(dim, scramble=scramble, bits=bits, rng=np.random.default_rng(seed))
    x = engine.random_base2(int(n).bit_length() - 1)
    k = np.ldexp(x, bits)
    ki = k.astype(np.uint64)
    if not np.array_equal(ki.astype(np.float64), k):  # pragma: no cover - guards SciPy's contract
        raise RuntimeError("SciPy Sobol' output is not a multiple of 2**-bits")
    return ki


def _spread(v: np.ndarray, bits: int, factor: int) -> np.ndarray:
    """Move bit ``i`` of ``v`` (``i = 0`` least significant) to bit ``factor * i``."""
    out = np.zeros_like(v, dtype=np.uint64)
    one = np.uint64(1)
    for i in range(bits):
        out |= ((v >> np.uint64(i)) & one) << np.uint64(factor * i)
    return out


def interlace_integers(x: np.ndarray, bits: int, factor: int = 2) -> np.ndarray:
    """Digit interlacing of integer coordinates (the map of Dick's order-``factor`` nets).

    Coordinates ``factor*j, ..., factor*j + factor - 1`` of ``x`` (each a ``bits``-digit
    integer, most significant digit first) become output coordinate ``j`` with
    ``factor * bits`` digits ``a1 b1 ... a2 b2 ...``.

    Args:
        x: ``uint64`` array ``(n, factor * d)``.
        bits: digits per input coordinate.
        factor: interlacing factor (2 for order-2 nets).

    Returns:
        ``uint64`` array ``(n, d)``; divide by ``2**(factor*bits)`` for points in [0, 1).
    """
    x = np.asarray(x, dtype=np.uint64)
    if x.ndim != 2 or x.shape[1] % factor:
        raise ValueError(f"need (n, {factor}*d) integers, got shape {x.shape}")
    if factor * bits > 64:
        raise ValueError("interlaced digits do not fit in 64 bits")
    n, sd = x.shape
    out = np.zeros((n, sd // factor), dtype=np.uint64)
    for r in range(factor):
        # component r supplies digit r of every group of `factor` output digits,
        # i.e. the (factor-1-r)-th bit of each group counted from the least significant end
        out |= _spread(x[:, r::factor], bits, factor) << np.uint64(factor - 1 - r)
    return out


def interlaced_sobol(
    n: int, dim: int, *, bits: int = 26, scramble: bool = False, seed: int = 0
) -> np.ndarray:
    """Order-2 digital net in ``[0, 1)^dim`` from a ``2*dim``-dimensional Sobol' net."""
    ints = sobol_integers(n, 2 * dim, bits=bits, scramble=scramble, seed=seed)
    return np.ldexp(interlace_integers(ints, bits, 2).astype(np.float64), -2 * bits)


def _mc(n: int, c: PointSetConfig) -> np.ndarray:
    return np.random.default_rng(c.seed).random((n, c.dim))


def _sobol(scramble: bool) -> Callable[[int, PointSetConfig], np.ndarray]:
    def gen(n: int, c: PointSetConfig) -> np.ndarray:
        ints = sobol_integers(n, c.dim, bits=c.bits, scramble=scramble, seed=c.seed)
        return np.ldexp(ints.astype(np.float64), -c.bits)

    return gen


def _interlaced(scramble: bool) -> Callable[[int, PointSetConfig], np.ndarray]:
    def gen(n: int, c: PointSetConfig) -> np.ndarray:
        return interlaced_sobol(n, c.dim, bits=c.bits, scramble=scramble, seed=c.seed)

    return gen


_REGISTRY: dict[str, Callable[[int, PointSetConfig], np.ndarray]] = {
    "mc": _mc,
    "sobol": _sobol(False),
    "sobol-scrambled": _sobol(True),
    "interlaced2": _interlaced(False),
    "interlaced2-scrambled": _interlaced(True),
}

#: Short labels for tables and plots.
LABELS = {
    "mc": "MC",
    "sobol": "Sobol",
    "sobol-scrambled": "Sobol (scr.)",
    "interlaced2": "order-2 net",
    "interlaced2-scrambled": "order-2 net (scr.)",
}


def list_point_sets() -> list[str]:
    """Names accepted by :class:`PointSetConfig`."""
    return list(_REGISTRY)


def generate_points(config: PointSetConfig, n: int) -> np.ndarray:
    """Draw ``n`` points of the set described by ``config`` (see the module contract).

    Args:
        config: kind, dimension, seed and domain.
        n: number of points (a power of two for QMC kinds).

    Returns:
        ``float64`` array ``(n, config.dim)``.

    Example:
        >>> generate_points(PointSetConfig("sobol", dim=2, domain="unit"), 4).tolist()
        [[0.0, 0.0], [0.5, 0.5], [0.75, 0.25], [0.25, 0.75]]
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if config.kind != "mc" and not is_power_of_two(n):
        raise ValueError(f"{config.kind} needs n = 2^m points, got n={n}")
    x = _REGISTRY[config.kind](n, config)
    return x - 0.5 if config.domain == "centered" else x


def nested_pair(points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(P_N, P_{N/2})``: a set of ``N = 2^m`` points and its first half.

    For the Sobol' kinds both are nets (a base-2 Sobol' prefix of ``2^k`` points is a
    ``(t, k, s)``-net); for Monte Carlo both are i.i.d. samples.
    """
    n = len(points)
    if n < 2 or n % 2:
        raise ValueError(f"need an even number of points, got {n}")
    return points, points[: n // 2]
