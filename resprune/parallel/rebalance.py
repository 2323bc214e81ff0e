"""Helpers of the stage engines that outlive one step: class-mean warm starts, the layer
parameters exchanged at rank boundaries (smoothness penalty), and the re-partition after
pruning (docs/parallel.md, "ODE regime and re-partition").

- :class:`ClassMeanStore`: per owned C-point, the mean state (and adjoint) of each class over
  the latest step in which the class occurred; a step whose classes were all seen starts every
  sample from its class's mean. Memory per rank: classes × (Σ over the owned C-points of one
  sample's state) × 2 (states and adjoints).
- :func:`neighbour_params`: the detached parameters of the layer just before and just after a
  rank's range, when they have the same structure as the rank's first/last layer (one message
  each way per boundary and step).
- :func:`repartition_engine`: gather the weights and the optimiser state by parameter name,
  rebalance the stages by measured per-layer time, rebuild the grids and the optimiser.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from typing import TYPE_CHECKING

import torch

from ..sparsity import same_structure
from .partition import analyze_layers, balanced_bounds, layer_sequence

if TYPE_CHECKING:  # pragma: no cover
    from .stage import StagedEngine

__all__ = ["ClassMeanStore", "neighbour_params", "repartition_engine", "gather_layer_time", "load_imbalance"]


class ClassMeanStore:
    """Class-mean C-point states and adjoints across steps (TorchBraid-style warm start)."""

    def __init__(self) -> None:
        self.u: dict[int, torch.Tensor] = {}
        self.lam: dict[int, torch.Tensor] = {}
        self.seen: torch.Tensor | None = None  # bool per class

    def guess(self, y: torch.Tensor):
        """``(states, adjoints)`` per owned C-point, one row per sample, or ``(None, None)``
        when some class of ``y`` has no stored mean yet (the same answer on every rank)."""
        if self.seen is None or int(y.max()) >= len(self.seen) or not bool(self.seen[y.cpu()].all()):
            return None, None
        idx = y.to(next(iter(self.u.values())).device) if self.u else y
        return ({p: m[idx] for p, m in self.u.items()},
                {p: m[y.to(m.device)] for p, m in self.lam.items()})

    @staticmethod
    def _means(y: torch.Tensor, v: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        yy = y.to(v.device)
        sums = torch.zeros((k, *v.shape[1:]), dtype=v.dtype, device=v.device).index_add_(0, yy, v)
        counts = torch.bincount(yy, minlength=k)
        present = counts > 0
        shape = (-1,) + (1,) * (v.dim() - 1)
        return sums / counts.clamp_min(1).to(v.dtype).reshape(shape), present

    def update(self, y: torch.Tensor, u: dict[int, torch.Tensor], lam: dict[int, torch.Tensor]) -> None:
        k = max(int(y.max()) + 1, 0 if self.seen is None else len(self.seen))
        for store, vals in ((self.u, u), (self.lam, lam)):
            for p, v in vals.items():
                v = v.detach()
                mean, present = self._means(y, v, k)
                old = store.get(p)
                if old is None or old.shape[1:] != v.shape[1:]:
                    store[p] = mean
                    continue
                if old.shape[0] < k:
                    old = torch.cat([old, torch.zeros((k - old.shape[0], *old.shape[1:]), dtype=old.dtype,
                                                      device=old.device)])
                old[present] = mean[present]
                store[p] = old
        present = torch.bincount(y.cpu(), minlength=k) > 0
        if self.seen is None:
            self.seen = present
        else:
            seen = torch.zeros(k, dtype=torch.bool)
            seen[: len(self.seen)] = self.seen
            self.seen = seen | present

    def numel(self) -> int:
        """Stored numbers on this rank (states plus adjoints)."""
        return sum(t.numel() for t in (*self.u.values(), *self.lam.values()))


def _flat(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()])


def _unflat(vec: torch.Tensor, like: torch.nn.Module) -> list[torch.Tensor]:
    out, i = [], 0
    for p in like.parameters():
        out.append(vec[i:i + p.numel()].view_as(p))
        i += p.numel()
    return out


def neighbour_params(eng: "StagedEngine") -> dict:
    """``{"before": [...], "after": [...]}``: detached parameters of the layers next to this
    rank's range that pair with its first/last layer (collective between neighbours)."""
    seq, lo, hi, me, P, comm = eng.seq, eng.lo, eng.hi, eng.rank, eng.world_size, eng.comm
    first, last = seq[lo][1], seq[hi - 1][1]
    has_before = me > 0 and same_structure(seq[lo - 1][1], first)
    has_after = me < P - 1 and same_structure(last, seq[hi][1])
    if not (has_before or has_after):
        return {}
    if has_before:
        comm.isend(_flat(first), me - 1)  # the previous rank's "after"
    if has_after:
        comm.isend(_flat(last), me + 1)  # the next rank's "before"
    out = {}
    if has_after:
        like = _flat(last)
        out["after"] = _unflat(comm.recv(tuple(like.shape), me + 1, like), last)
    if has_before:
        like = _flat(first)
        out["before"] = _unflat(comm.recv(tuple(like.shape), me - 1, like), first)
    comm.wait()
    return out


def load_imbalance(loads: list[float]) -> float:
    """``max / mean − 1`` of per-rank loads (0 = perfectly balanced)."""
    mean = sum(loads) / len(loads)
    return max(loads) / mean - 1.0 if mean > 0 else 0.0


def _loads(names: list[str], bounds: list[int], times: dict[str, float]) -> list[float]:
    return [sum(times.get(names[i], 0.0) for i in range(bounds[r], bounds[r + 1]))
            for r in range(len(bounds) - 1)]


def _allgather(comm, obj):
    return comm.broadcast_object(comm.gather_object(obj), 0)


def gather_layer_time(eng: "StagedEngine") -> dict[str, float]:
    """Collective: every rank's measured seconds per layer, merged, on every rank."""
    measured: dict[str, float] = {}
    for d in _allgather(eng.comm, dict(eng.layer_time)):
        measured.update(d)
    return measured


def repartition_engine(eng: "StagedEngine", times: dict[str, float] | None = None) -> dict:
    """See :meth:`StagedEngine.repartition`."""
    comm, P = eng.comm, eng.world_size
    measured = gather_layer_time(eng)
    measured.update(times or {})
    names_before, bounds_before = [n for n, _ in eng.seq], list(eng.bounds)
    costs_before = dict(zip(eng.info.names, eng.info.costs))
    # optimiser state of the owned parameters, by name (old ownership), then the weights
    opt = eng.optimizer
    state = {}
    for name, p in eng.local_named_parameters():
        if p in opt.state:
            state[name] = {k: (v.detach().cpu().clone() if torch.is_tensor(v) else v)
                           for k, v in opt.state[p].items()}
    eng.sync_model()
    all_state: dict[str, dict] = {}
    for d in _allgather(comm, state):
        all_state.update(d)
    # measured seconds per layer; layers never timed: counted cost at the median rate
    seq = layer_sequence(eng.model)
    info = analyze_layers(eng.model, eng.input_size)
    costs = {**costs_before, **dict(zip(info.names, info.costs))}
    rates = [measured[n] / costs[n] for n in measured if costs.get(n)]
    rate = statistics.median(rates) if rates else 1.0
    tmap = {n: measured.get(n, rate * costs[n]) for n in costs}
    names_after = [n for n, _ in seq]
    bounds = balanced_bounds([tmap[n] for n in names_after], P)
    eng._setup_partition(bounds)
    eng.layer_time = {n: t for n, t in eng.layer_time.items() if n in set(names_after[eng.lo:eng.hi])}
    # the optimiser: same object (scheduler binding, hyper-parameters) when groups line up
    named = list(eng.local_named_parameters())
    new = eng.optimizer_factory(named)
    if len(new.param_groups) == len(opt.param_groups):
        for g_old, g_new in zip(opt.param_groups, new.param_groups):
            g_old["params"] = g_new["params"]
            if "param_names" in g_new:
                g_old["param_names"] = g_new["param_names"]
        opt.state = defaultdict(dict)
        target = opt
    else:  # pragma: no cover - a factory whose groups depend on the layers
        for g_old, g_new in zip(opt.param_groups, new.param_groups):
            g_new.update({k: v for k, v in g_old.items() if k not in ("params", "param_names")})
        target = eng.optimizer = new
    kept = 0
    for name, p in named:
        if name in all_state:
            target.state[p] = {k: (v.to(p.device) if torch.is_tensor(v) and v.dim() > 0 else v)
                               for k, v in all_state[name].items()}
            kept += 1
    alive = set(names_after)
    lu = _loads(names_before, bounds_before, tmap)
    lb = _loads(names_before, bounds_before, {n: t for n, t in tmap.items() if n in alive})
    la = _loads(names_after, bounds, tmap)
    return {"layers_before": len(names_before), "layers_after": len(names_after),
            "bounds_before": bounds_before, "bounds_after": list(bounds),
            # before: the old stages with the removed layers gone (what not re-partitioning
            # leaves); unpruned: the old stages of the whole sequence; after: the new stages
            "loads_before_s": lb, "loads_after_s": la, "imbalance_unpruned": load_imbalance(lu),
            "imbalance_before": load_imbalance(lb), "imbalance_after": load_imbalance(la),
            "optimizer_states_kept": kept, "timed_layers": len(measured)}
