"""``prune_``: pick removable layers by their layer scale and remove them structurally.

A *removal unit* is one decision the pruner can take, named by the ResConv2d whose scale
decides it:

* an identity-shortcut ResConv2d (``P = id``): the layer is deleted (from its Sequential,
  or replaced by ``nn.Identity`` when it is an attribute). With ``s = 0`` and ``x ≥ 0`` it
  computed ``act(x) = x``.
* a branch gate (``shortcut=False``, the second conv of a basic block): the whole residual
  branch goes, the block becomes its shortcut ``S`` (deleted when ``S`` is the identity, the
  parameter-free option-A module otherwise). With ``s₂ = 0`` it computed ``ReLU(S(x)) = S(x)``.

Selection:

* ``threshold``: every unit with ``|s| < threshold``.
* ``target_macs``: a float in (0, 1] keeps at most that fraction of the model's conv+linear
  MACs; an int is an absolute MACs budget. Units are removed greedily in increasing order of
  importance until the budget is met. Importance (``rank``) is ``|s|`` by default;
  ``"gain"``: the RMS of the scaled branch's output, ``|s|·√mean_c(γ_c² + β_c²)`` of its
  BatchNorm (what ``|s|`` alone misses: weight decay shrinks ``γ`` and ``β``, not ``s``);
  ``"taylor"``: the first-order (Taylor) estimate of the loss change when ``s`` goes to 0,
  ``mean_b (s·∂L_b/∂s)²`` over data batches (:func:`taylor_scores`, passed as ``scores``);
  or ``|s| / MACs`` of the unit (``rank="scale_per_mac"``), which prefers expensive layers.
* ``target_latency_ms`` with ``latency_table`` (a table made on the target device by
  ``export/latency_table.py``, see :mod:`resprune.latency`): the same greedy removal until
  the *predicted* latency at the table's batch size is at most the target; ``rank`` may
  also be ``"scale_per_ms"`` (``|s|`` per millisecond the unit saves).

With a ``latency_table`` (any rule), the report's ``latency`` holds the predicted latency
before and after, per stage, and the predicted (MACs, ms) of the candidate prunings along
each rank order (what the report plots).

No stage (top-level child of the model, e.g. ``layer2``) is left without a convolution
(``min_layers_per_stage``); a threshold that would do that, or a budget that cannot be met
without doing it, is an error and the model is left unchanged.

Example:
    >>> import torch, resprune as rp
    >>> m = rp.create_model("resnet20")
    >>> with torch.no_grad():
    ...     _ = m.layer1[1].conv2.scale.zero_()
    >>> rep = rp.prune_(m, rp.PruneConfig(threshold=1e-2))
    >>> rep.removed
    ['layer1.1.conv2']
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from .layers import ConvBN2d, ResConv2d
from .models.arch import ArchRecord
from .latency import LatencyTable, layer_signatures
from .importance import PruneError, gain as _gain, taylor_scores
from .profile import DEFAULT_INPUT_SIZE, profile

logger = logging.getLogger(__name__)

__all__ = ["PruneConfig", "PruneError", "PruneReport", "RemovalUnit", "RemovedLayer", "removal_units", "prune_",
           "remove_units_", "taylor_scores", "recalibrate_bn_"]

RANKS = ("scale", "gain", "taylor", "scale_per_mac", "scale_per_ms")


@dataclass(frozen=True)
class PruneConfig:
    """How to choose the layers to remove.

    Args:
        threshold: remove every removable layer with ``|scale| < threshold``.
        target_macs: float in (0, 1]: keep at most this fraction of MACs; int: MACs budget.
        target_latency_ms: predicted latency budget (ms) on the device of ``latency_table``.
        latency_table: path of a table from ``export/latency_table.py`` (needed by
            ``target_latency_ms`` and ``rank="scale_per_ms"``; with any rule, the report
            gains the predicted latency).
        rank: importance for budget mode: ``"scale"`` (|s|), ``"gain"``, ``"taylor"`` (needs
            ``scores`` from :func:`taylor_scores`), ``"scale_per_mac"`` or ``"scale_per_ms"``.
        min_layers_per_stage: convolutions every stage must keep.
        input_size: input shape used to count MACs.
    """

    threshold: float | None = None
    target_macs: float | int | None = None
    target_latency_ms: float | None = None
    latency_table: str | None = None
    rank: str = "scale"
    min_layers_per_stage: int = 1
    input_size: tuple[int, ...] = DEFAULT_INPUT_SIZE
    version: int = 1

    def __post_init__(self) -> None:
        rules = [k for k in ("threshold", "target_macs", "target_latency_ms") if getattr(self, k) is not None]
        if len(rules) != 1:
            raise PruneError(f"PruneConfig needs exactly one of threshold=, target_macs=, target_latency_ms=; "
                             f"got {rules or 'none'}")
        self._check_latency()
        if self.threshold is not None:
            t = self.threshold
            if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
                raise PruneError(f"threshold must be a finite number > 0, got {t!r}")
        if self.target_macs is not None:
            b = self.target_macs
            if isinstance(b, bool) or not isinstance(b, (int, float)):
                raise PruneError(f"target_macs must be a float in (0, 1] or an int > 0, got {b!r}")
            if isinstance(b, float) and not (0.0 < b <= 1.0):
                raise PruneError(
                    f"target_macs={b} as a fraction must lie in (0, 1]; pass an int for an absolute budget"
                )
            if isinstance(b, int) and b <= 0:
                raise PruneError(f"target_macs={b} as an absolute budget must be > 0")
        if self.rank not in RANKS:
            raise PruneError(f"rank must be one of {RANKS}, got {self.rank!r}")
        if self.min_layers_per_stage < 0:
            raise PruneError("min_layers_per_stage must be >= 0")
        object.__setattr__(self, "input_size", tuple(int(v) for v in self.input_size))

    def _check_latency(self) -> None:
        t = self.target_latency_ms
        if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0):
            raise PruneError(f"target_latency_ms must be a finite number of ms > 0, got {t!r}")
        needs = [k for k, on in (("target_latency_ms", t is not None), ("rank='scale_per_ms'",
                                                                          self.rank == "scale_per_ms")) if on]
        if needs and not self.latency_table:
            raise PruneError(f"{needs[0]} needs latency_table= (a table made on the target device by "
                             "export/latency_table.py MODEL.onnx --json TABLE.json)")
        if self.latency_table is not None and not isinstance(self.latency_table, (str, Path)):
            raise PruneError(f"latency_table must be a path, got {self.latency_table!r}")
        if self.latency_table is not None:
            object.__setattr__(self, "latency_table", str(self.latency_table))


@dataclass
class RemovalUnit:
    name: str  # the ResConv2d whose scale decides
    scale: float
    layers: list[str]  # conv-bearing modules that disappear with the unit
    stage: str
    macs: int = 0
    ms: float = 0.0  # predicted latency the unit saves (with a latency table)
    gain: float = 0.0  # |s|·RMS of its BatchNorm's (γ, β): the scaled branch's output RMS
    taylor: float | None = None  # first-order loss change when s → 0 (rank="taylor"; taylor_scores)


NOTHING_REMOVED_HINT = ("To remove layers, train with a larger L1 weight λ (train.l1) or for more epochs "
                        "(train.epochs), or prune with a larger prune.threshold or a prune.target_macs budget.")


@dataclass
class PruneReport:
    removed: list[str]
    macs_before: int
    macs_after: int
    params_before: int
    params_after: int
    removed_per_stage: dict[str, int]
    max_removed_scale: float
    config: dict = field(default_factory=dict)
    latency: dict | None = None  # with a latency table: predicted ms before/after, per stage, candidates

    @property
    def macs_reduction(self) -> float:
        return 1.0 - self.macs_after / self.macs_before if self.macs_before else 0.0

    @property
    def params_reduction(self) -> float:
        return 1.0 - self.params_after / self.params_before if self.params_before else 0.0

    def summary(self) -> str:
        if not self.removed:
            return (f"nothing was removed ({self.rule()}); MACs "
                    f"{self.macs_before / 1e6:.2f} M, params {self.params_before / 1e6:.3f} M unchanged. "
                    f"{NOTHING_REMOVED_HINT}")
        per = ", ".join(f"{k}: {v}" for k, v in self.removed_per_stage.items())
        lat = self.latency
        lat = (f"; predicted latency {lat['predicted_before_ms']:.3f} → {lat['predicted_after_ms']:.3f} ms "
               f"({lat['runtime']} {lat['precision']}, batch {lat['batch']}, {lat['threads']} thread(s), "
               f"{lat['device']})" if lat else "")
        return (
            f"removed {len(self.removed)} units ({per}); MACs {self.macs_before / 1e6:.2f} M → "
            f"{self.macs_after / 1e6:.2f} M (−{100 * self.macs_reduction:.1f}%), params "
            f"{self.params_before / 1e6:.3f} M → {self.params_after / 1e6:.3f} M "
            f"(−{100 * self.params_reduction:.1f}%); largest removed |scale| {self.max_removed_scale:.3g}{lat}"
        )

    def rule(self) -> str:
        c = self.config or {}
        if c.get("threshold") is not None:
            return f"|scale| < {c['threshold']:g}"
        if c.get("target_latency_ms") is not None:
            return f"latency budget {c['target_latency_ms']:g} ms"
        return f"MACs budget {c.get('target_macs')}" if c.get("target_macs") is not None else "unknown rule"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["macs_reduction"], d["params_reduction"] = self.macs_reduction, self.params_reduction
        return d


class RemovedLayer(nn.Identity):
    """What a removed layer leaves where it was an attribute: the identity, as a copy in
    training with autograd on, so that in-place operations after it in the enclosing forward
    (torchvision's ``ReLU(inplace=True)``, ``out += identity``) cannot overwrite a tensor
    autograd still needs. In eval mode (and in export) it returns its input itself."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clone() if self.training and torch.is_grad_enabled() else x


def _conv_layers(module: nn.Module, prefix: str) -> list[str]:
    """Names of the conv-bearing layers (ResConv2d, ConvBN2d, bare Conv2d) in ``module``."""
    out = []
    for n, m in module.named_modules(prefix=prefix):
        if isinstance(m, (ResConv2d, ConvBN2d)):
            out.append(n)
        elif isinstance(m, nn.Conv2d) and not any(n.startswith(o + ".") for o in out):
            out.append(n)
    return out


def removal_units(model: nn.Module) -> list[RemovalUnit]:
    """Every decision the pruner can take on ``model``, in module order."""
    units = []
    for name, m in model.named_modules():
        if not isinstance(m, ResConv2d) or not m.removable:
            continue
        stage = name.split(".")[0]
        scale, gain = float(m.scale.detach()), _gain(m)
        if m.shortcut:
            units.append(RemovalUnit(name, scale, [name], stage, gain=gain))
            continue
        pname = name.rpartition(".")[0]
        parent = model.get_submodule(pname)
        if not hasattr(parent, "without_branch") or not pname:
            continue  # a gate outside a known block cannot be removed on its own
        units.append(RemovalUnit(name, scale, _conv_layers(parent, pname), stage, gain=gain))
    return units


@torch.no_grad()
def recalibrate_bn_(model: nn.Module, batches, forward=None) -> nn.Module:
    """Re-estimate every BatchNorm's running statistics from ``batches`` of inputs (a
    cumulative average over all of them, no gradient, parameters untouched), in place: after
    pruning, the layers that remain see other inputs than those their statistics were
    gathered on. ``forward(x)``: how to run the model (default ``model(x)``)."""
    from torch.nn.modules.batchnorm import _BatchNorm

    bns = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    modes = {m: m.training for m in model.modules()}
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.eval()
    for m in bns:
        m.train()
    try:
        for x in batches:
            (forward or model)(x)
    finally:
        for m, mom in zip(bns, momenta):
            m.momentum = mom
        for m, t in modes.items():
            m.training = t
    return model


def remove_units_(model: nn.Module, names: list[str]) -> nn.Module:
    """Structurally remove the named units (as chosen by :func:`prune_`), in place.

    Names keep their meaning in the unpruned model: Sequential children keep their keys, so
    ``layer1.3`` is still ``layer1.3`` after ``layer1.2`` is gone and state-dict keys of the
    remaining layers do not move.
    """
    record = ArchRecord.of(model) if names else None
    edit = record.edit_before(model) if record is not None else None
    targets: list[tuple[str, nn.Module | None]] = []
    gates = [n for n in names if not model.get_submodule(n).shortcut]
    for n in gates:  # whole branches first
        block_name = n.rpartition(".")[0]
        targets.append((block_name, model.get_submodule(block_name).without_branch()))
    dead = {t for t, _ in targets}
    for n in names:
        if n not in gates and not any(n.startswith(d + ".") for d in dead):
            targets.append((n, None))
    by_parent: dict[str, dict[str, nn.Module | None]] = {}
    for tname, repl in targets:
        pname, _, child = tname.rpartition(".")
        by_parent.setdefault(pname, {})[child] = repl
    for pname, children in by_parent.items():
        parent = model.get_submodule(pname)
        if isinstance(parent, nn.Sequential):
            kept = [(k, children.get(k, v)) for k, v in parent.named_children()]
            new = nn.Sequential()
            for k, v in kept:
                if v is not None:
                    new.add_module(k, v)
            if pname:
                model.set_submodule(pname, new)
            else:
                raise PruneError("cannot remove layers from a model that is itself a Sequential")
        else:
            for child, repl in children.items():
                # resprune's own blocks (without_branch) have no in-place ops: no copy needed
                keep = nn.Identity() if hasattr(parent, "without_branch") else RemovedLayer()
                setattr(parent, child, repl if repl is not None else keep)
    if record is not None:
        record.append(model, ["remove", list(names)], edit)
    return model


def _check_stages(units: list[RemovalUnit], chosen: list[RemovalUnit], layers: dict[str, int], min_keep: int):
    gone = {l for u in chosen for l in u.layers}
    for stage in sorted({u.stage for u in chosen}):
        left = [l for l in layers if l.split(".")[0] == stage and l not in gone]
        if len(left) < min_keep:
            raise PruneError(
                f"pruning would leave stage {stage!r} with {len(left)} conv layers "
                f"(min_layers_per_stage={min_keep}); raise the threshold's selectivity "
                "(a smaller threshold) or the MACs budget. Nothing was removed."
            )


def prune_(model: nn.Module, config: PruneConfig, scores: dict[str, float] | None = None) -> PruneReport:
    """Remove layers of ``model`` in place according to ``config``; return a report.
    ``scores``: importance per unit name for ``rank="taylor"`` (:func:`taylor_scores`).

    Removal is exact when the removed scales are 0 (their layers then compute the identity
    on post-ReLU inputs); otherwise the output changes by terms of order ``|s|``, and the
    report's ``max_removed_scale`` says how large. The model is left unchanged on error.
    """
    before = profile(model, config.input_size)
    leaf_macs = {r.name: r.macs for r in before.layers}
    layers = {l: sum(v for k, v in leaf_macs.items() if k == l or k.startswith(l + "."))
              for l in _conv_layers(model, "")}
    units = _with_scores(removal_units(model), config, scores)
    table = LatencyTable.load(config.latency_table) if config.latency_table else None
    sigs = layer_signatures(model, config.input_size) if table else {}
    lat_ms, lat_bytes = (table.layer_ms(sigs), table.layer_bytes(sigs)) if table else ({}, {})
    above = table is not None and table.cache_ms(sum(lat_bytes.values())) > 0
    for u in units:
        u.macs = sum(layers[l] for l in u.layers)
        u.ms = sum(lat_ms[l] + (table.cache_ms(lat_bytes[l] + table.cache) if above else 0.0)
                   for l in u.layers) if table else 0.0

    if config.threshold is not None:
        chosen = [u for u in units if abs(u.scale) < config.threshold]
        _check_stages(units, chosen, layers, config.min_layers_per_stage)
    elif config.target_macs is not None:
        b = config.target_macs
        budget = int(b * before.macs) if isinstance(b, float) else int(b)
        chosen = _select_budget(units, layers, lambda gone: before.macs - sum(layers[l] for l in gone),
                                budget, config, lambda left: (
            f"target_macs={b} (budget {budget:,} MACs of {before.macs:,}) cannot be met: removing every "
            f"removable layer the stage rule allows leaves {left:,} MACs ({100 * left / before.macs:.1f}%)."))
    else:
        total = _predictor(table, lat_ms, lat_bytes)
        d = table.describe()
        chosen = _select_budget(units, layers, total, config.target_latency_ms, config, lambda left: (
            f"target_latency_ms={config.target_latency_ms:g} cannot be met on {d['device']} ({d['runtime']} "
            f"{d['precision']}, batch {d['batch']}, {d['threads']} thread(s), table {d['table']}): removing every "
            f"removable layer the stage rule allows leaves a predicted {left:.3f} ms (unpruned {total(set()):.3f} ms, "
            f"of which {table.fixed_ms:.3f} ms outside the convolutions)."))

    names = [u.name for u in chosen]
    latency = _latency_report(table, lat_ms, lat_bytes, units, chosen, layers, before.macs, config) if table else None
    remove_units_(model, names)
    after = profile(model, config.input_size)
    report = PruneReport(
        removed=names,
        macs_before=before.macs, macs_after=after.macs,
        params_before=before.params, params_after=after.params,
        removed_per_stage=dict(Counter(u.stage for u in chosen)),
        max_removed_scale=max((abs(u.scale) for u in chosen), default=0.0),
        config=asdict(config), latency=latency,
    )
    logger.debug("prune_: %s", report.summary())  # callers report it (the prune stage once, with accuracy)
    return report


def _with_scores(units: list[RemovalUnit], config: PruneConfig, scores: dict[str, float] | None) -> list[RemovalUnit]:
    """``units`` with their Taylor scores; every unit needs one when the budget ranks by them."""
    if config.rank == "taylor" and config.threshold is None:
        missing = [u.name for u in units if u.name not in (scores or {})]
        if missing:
            raise PruneError(f"rank='taylor' needs scores= for every unit (taylor_scores(model, batches)); "
                             f"{len(missing)} missing, e.g. {missing[0]}")
    for u in units:
        u.taylor = (scores or {}).get(u.name)
    return units


def _order(units: list[RemovalUnit], rank: str) -> list[RemovalUnit]:
    """Least important first."""
    if rank == "gain":
        return sorted(units, key=lambda u: u.gain)
    if rank == "taylor":
        return sorted(units, key=lambda u: u.taylor)
    if rank == "scale_per_mac":
        return sorted(units, key=lambda u: abs(u.scale) / max(u.macs, 1))
    if rank == "scale_per_ms":
        return sorted(units, key=lambda u: abs(u.scale) / max(u.ms, 1e-9))
    return sorted(units, key=lambda u: abs(u.scale))


def _removals(order: list[RemovalUnit], layers: dict[str, int], min_keep: int):
    """The units of ``order`` the stage rule lets go, one after the other, each with the
    layers it removes that earlier ones did not."""
    gone: set[str] = set()
    per_stage = Counter(l.split(".")[0] for l in layers)
    for u in order:
        new = [l for l in u.layers if l not in gone]
        left = per_stage[u.stage] - len(new)
        if left < min_keep:
            continue
        gone.update(new)
        per_stage[u.stage] = left
        yield u, new


def _select_budget(units, layers, measure, budget, config: PruneConfig, unmet) -> list[RemovalUnit]:
    """Greedy removal in rank order until ``measure(removed layers)`` (MACs or predicted ms of
    what is left) is at most ``budget``; ``unmet(left)`` words the error when it cannot be."""
    chosen: list[RemovalUnit] = []
    gone: set[str] = set()
    for u, new in _removals(_order(units, config.rank), layers, config.min_layers_per_stage):
        if measure(gone) <= budget:
            break
        chosen.append(u)
        gone.update(new)
    left = measure(gone)
    if left > budget:
        raise PruneError(f"{unmet(left)} Nothing was removed.")
    return [u for u in units if u in chosen]  # module order


def _predictor(table: LatencyTable, lat_ms: dict, lat_bytes: dict):
    """Predicted ms of the model without the given layers."""
    return lambda gone: table.total({l: v for l, v in lat_ms.items() if l not in gone},
                                    {l: v for l, v in lat_bytes.items() if l not in gone})


def _latency_report(table: LatencyTable, lat_ms: dict, lat_bytes: dict, units, chosen, layers, macs: int,
                    config: PruneConfig) -> dict:
    """Predicted latency before/after and per stage, and the predicted (MACs, ms) after each
    step of the greedy removal in every rank order (the candidate prunings)."""
    gone = {l for u in chosen for l in u.layers}
    kept = {l: v for l, v in lat_ms.items() if l not in gone}
    kept_bytes = {l: v for l, v in lat_bytes.items() if l not in gone}
    total = _predictor(table, lat_ms, lat_bytes)
    candidates = {}
    for rank in (r for r in RANKS if r != "taylor" or all(u.taylor is not None for u in units)):
        m, off, path = macs, set(), [[macs, total(set())]]
        for _u, new in _removals(_order(units, rank), layers, config.min_layers_per_stage):
            m -= sum(layers[l] for l in new)
            off.update(new)
            path.append([m, total(off)])
        candidates[rank] = path
    return {**table.describe(), "target_ms": config.target_latency_ms, "predicted_before_ms": total(set()),
            "predicted_after_ms": total(gone),
            "per_stage_before_ms": table.per_stage(lat_ms, lat_bytes),
            "per_stage_after_ms": table.per_stage(kept, kept_bytes), "candidates": candidates}
