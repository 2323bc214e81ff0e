"""Communication graphs of the ``consensus`` engine and their mixing matrices.

A graph over ``n`` agents gives, for every round ``k``, a mixing matrix ``W[k]`` (``n × n``,
float64, doubly stochastic: rows and columns sum to 1, non-negative). Agent ``i`` combines
what its in-neighbours sent, ``xᵢ ← Σⱼ Wᵢⱼ xⱼ``, so it receives from the ``j ≠ i`` with
``Wᵢⱼ > 0`` and sends to the ``j ≠ i`` with ``Wⱼᵢ > 0``. Every agent builds the same ``W[k]``
from the same seed, so no agent needs to be told the graph of a round.

- ``complete``: every pair connected; Metropolis weights give exact averaging ``W = 11ᵀ/n``.
- ``ring``: each agent talks to ``i ± 1``.
- ``torus``: a 2-D ``rows × cols`` grid with wrap-around (4 neighbours; fewer when a side is
  shorter than 3); the shape is ``torus_shape`` or the most square factorisation of ``n``.
- ``erdos_renyi``: each pair connected with probability ``p`` (seeded); a disconnected draw
  is refused with :class:`GraphError` (consensus is impossible on it).
- ``exponential`` (time-varying, one peer): in round ``k`` agent ``i`` sends to
  ``i + 2^(k mod ⌈log₂ n⌉)`` and keeps half, ``W = (I + P)/2``: doubly stochastic, not
  symmetric, one message per agent per round.
- ``random_matching`` (time-varying): a random matching of the agents per round (seeded),
  weights ½ on each matched pair.

Fixed undirected graphs use Metropolis–Hastings weights ``Wᵢⱼ = 1/(1 + max(dᵢ, dⱼ))`` on
edges, ``Wᵢᵢ = 1 − Σⱼ≠ᵢ Wᵢⱼ``: symmetric and doubly stochastic for any degrees.

Example:
    >>> W = make_graph("ring", 4).weights(0)
    >>> W.sum(0).tolist(), W.sum(1).tolist()
    ([1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0])
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import ResPruneError

__all__ = ["GraphError", "Graph", "GRAPHS", "make_graph", "metropolis_weights", "is_connected"]

GRAPHS = ("complete", "ring", "torus", "erdos_renyi", "exponential", "random_matching")
TIME_VARYING = ("exponential", "random_matching")


class GraphError(ResPruneError, ValueError):
    """A graph that cannot be built for these agents (unknown name, disconnected, bad shape)."""


def metropolis_weights(adj: torch.Tensor) -> torch.Tensor:
    """Metropolis–Hastings mixing matrix of the undirected graph with 0/1 adjacency ``adj``."""
    a = adj.to(torch.float64).clone()
    a.fill_diagonal_(0)
    deg = a.sum(1)
    w = a / (1 + torch.maximum(deg[:, None], deg[None, :]))
    w += torch.diag(1 - w.sum(1))
    return w


def is_connected(adj: torch.Tensor) -> bool:
    """Whether the undirected graph with adjacency ``adj`` is connected (breadth-first search)."""
    n = adj.shape[0]
    seen, todo = {0}, [0]
    while todo:
        i = todo.pop()
        for j in torch.nonzero(adj[i] > 0).flatten().tolist():
            if j not in seen:
                seen.add(j)
                todo.append(j)
    return len(seen) == n


def _torus_shape(n: int, shape: tuple[int, int] | None) -> tuple[int, int]:
    if shape is not None:
        r, c = shape
        if r * c != n:
            raise GraphError(f"torus_shape {r}x{c} needs {r * c} agents, but there are {n}")
        return r, c
    r = max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)
    return r, n // r


def _fixed_adjacency(name: str, n: int, p: float, seed: int, shape) -> torch.Tensor:
    adj = torch.zeros(n, n, dtype=torch.int64)
    if name == "complete":
        adj[:] = 1
    elif name == "ring":
        for i in range(n):
            adj[i, (i + 1) % n] = adj[(i + 1) % n, i] = 1
    elif name == "torus":
        r, c = _torus_shape(n, shape)
        for i in range(n):
            a, b = divmod(i, c)
            for j in (((a + 1) % r) * c + b, a * c + (b + 1) % c):
                adj[i, j] = adj[j, i] = 1
    else:  # erdos_renyi
        g = torch.Generator().manual_seed(seed)
        upper = torch.triu((torch.rand(n, n, generator=g) < p).to(torch.int64), 1)
        adj = upper + upper.T
        if not is_connected(adj):
            raise GraphError(f"erdos_renyi graph over {n} agents with p={p} (seed {seed}) is disconnected: "
                             "consensus is impossible on it; raise graph_p or change graph_seed")
    adj.fill_diagonal_(0)
    return adj


@dataclass(frozen=True)
class Graph:
    """The graph of ``n`` agents: :meth:`weights` of round ``k``, neighbours of an agent."""

    name: str
    n: int
    p: float = 0.5
    seed: int = 0
    shape: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if self.name not in GRAPHS:
            raise GraphError(f"unknown graph {self.name!r}; available: {', '.join(GRAPHS)}")
        if self.n < 1:
            raise GraphError(f"a graph needs at least one agent, got {self.n}")
        if self.name not in TIME_VARYING:
            object.__setattr__(self, "_w", metropolis_weights(
                _fixed_adjacency(self.name, self.n, self.p, self.seed, self.shape)))

    @property
    def time_varying(self) -> bool:
        return self.name in TIME_VARYING

    def weights(self, k: int = 0) -> torch.Tensor:
        """The doubly stochastic mixing matrix of round ``k`` (float64, ``n × n``)."""
        if not self.time_varying:
            return self._w  # type: ignore[attr-defined]
        n = self.n
        w = torch.zeros(n, n, dtype=torch.float64)
        if n == 1:
            return w + 1
        if self.name == "exponential":
            hop = 2 ** (k % max(1, math.ceil(math.log2(n))))
            for i in range(n):
                w[(i + hop) % n, i] += 0.5  # i sends to i + hop
                w[i, i] += 0.5
            return w
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + k)
        order = torch.randperm(n, generator=g).tolist()
        w += torch.eye(n, dtype=torch.float64)
        for a, b in zip(order[0::2], order[1::2]):
            w[a, a] = w[b, b] = w[a, b] = w[b, a] = 0.5
        return w

    def in_neighbours(self, i: int, k: int = 0) -> list[int]:
        """The agents ``i`` receives from in round ``k`` (``Wᵢⱼ > 0``, ``j ≠ i``)."""
        w = self.weights(k)
        return [j for j in range(self.n) if j != i and w[i, j] > 0]

    def out_neighbours(self, i: int, k: int = 0) -> list[int]:
        """The agents ``i`` sends to in round ``k`` (``Wⱼᵢ > 0``, ``j ≠ i``)."""
        w = self.weights(k)
        return [j for j in range(self.n) if j != i and w[j, i] > 0]

    def spectral_gap(self, k: int = 0) -> float:
        """``1 − σ₂(W[k])``: how fast one round of mixing contracts disagreement (1: exact)."""
        s = torch.linalg.svdvals(self.weights(k) - 1.0 / self.n)
        return float(1 - s[0]) if self.n > 1 else 1.0


def make_graph(name: str, n: int, p: float = 0.5, seed: int = 0,
               shape: tuple[int, int] | None = None) -> Graph:
    """Graph ``name`` (:data:`GRAPHS`) over ``n`` agents; :class:`GraphError` on bad input."""
    return Graph(name, n, p, seed, None if shape is None else tuple(shape))
