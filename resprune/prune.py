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
  importance until the budget is met. Importance (``rank``) is ``|s|`` by default, or
  ``|s| / MACs`` of the unit (``rank="scale_per_mac"``), which prefers expensive layers.

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

import torch
from torch import nn

from .errors import ResPruneError
from .layers import ConvBN2d, ResConv2d
from .models.arch import ArchRecord
from .profile import DEFAULT_INPUT_SIZE, profile

logger = logging.getLogger(__name__)

__all__ = ["PruneConfig", "PruneError", "PruneReport", "RemovalUnit", "RemovedLayer", "removal_units", "prune_", "remove_units_"]

RANKS = ("scale", "scale_per_mac")


class PruneError(ResPruneError, ValueError):
    """A pruning request that cannot be met or makes no sense; nothing was removed."""


@dataclass(frozen=True)
class PruneConfig:
    """How to choose the layers to remove.

    Args:
        threshold: remove every removable layer with ``|scale| < threshold``.
        target_macs: float in (0, 1]: keep at most this fraction of MACs; int: MACs budget.
        rank: importance for budget mode: ``"scale"`` (|s|) or ``"scale_per_mac"``.
        min_layers_per_stage: convolutions every stage must keep.
        input_size: input shape used to count MACs.
    """

    threshold: float | None = None
    target_macs: float | int | None = None
    rank: str = "scale"
    min_layers_per_stage: int = 1
    input_size: tuple[int, ...] = DEFAULT_INPUT_SIZE
    version: int = 1

    def __post_init__(self) -> None:
        if (self.threshold is None) == (self.target_macs is None):
            raise PruneError("PruneConfig needs exactly one of threshold= or target_macs=")
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


@dataclass
class RemovalUnit:
    name: str  # the ResConv2d whose scale decides
    scale: float
    layers: list[str]  # conv-bearing modules that disappear with the unit
    stage: str
    macs: int = 0


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
        return (
            f"removed {len(self.removed)} units ({per}); MACs {self.macs_before / 1e6:.2f} M → "
            f"{self.macs_after / 1e6:.2f} M (−{100 * self.macs_reduction:.1f}%), params "
            f"{self.params_before / 1e6:.3f} M → {self.params_after / 1e6:.3f} M "
            f"(−{100 * self.params_reduction:.1f}%); largest removed |scale| {self.max_removed_scale:.3g}"
        )

    def rule(self) -> str:
        c = self.config or {}
        if c.get("threshold") is not None:
            return f"|scale| < {c['threshold']:g}"
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
        if m.shortcut:
            units.append(RemovalUnit(name, float(m.scale.detach()), [name], stage))
            continue
        pname = name.rpartition(".")[0]
        parent = model.get_submodule(pname)
        if not hasattr(parent, "without_branch") or not pname:
            continue  # a gate outside a known block cannot be removed on its own
        units.append(RemovalUnit(name, float(m.scale.detach()), _conv_layers(parent, pname), stage))
    return units


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


def prune_(model: nn.Module, config: PruneConfig) -> PruneReport:
    """Remove layers of ``model`` in place according to ``config``; return a report.

    Removal is exact when the removed scales are 0 (their layers then compute the identity
    on post-ReLU inputs); otherwise the output changes by terms of order ``|s|``, and the
    report's ``max_removed_scale`` says how large. The model is left unchanged on error.
    """
    before = profile(model, config.input_size)
    leaf_macs = {r.name: r.macs for r in before.layers}
    layers = {l: sum(v for k, v in leaf_macs.items() if k == l or k.startswith(l + "."))
              for l in _conv_layers(model, "")}
    units = removal_units(model)
    for u in units:
        u.macs = sum(layers[l] for l in u.layers)

    if config.threshold is not None:
        chosen = [u for u in units if abs(u.scale) < config.threshold]
        _check_stages(units, chosen, layers, config.min_layers_per_stage)
    else:
        chosen = _select_budget(units, layers, before.macs, config)

    names = [u.name for u in chosen]
    remove_units_(model, names)
    after = profile(model, config.input_size)
    report = PruneReport(
        removed=names,
        macs_before=before.macs, macs_after=after.macs,
        params_before=before.params, params_after=after.params,
        removed_per_stage=dict(Counter(u.stage for u in chosen)),
        max_removed_scale=max((abs(u.scale) for u in chosen), default=0.0),
        config=asdict(config),
    )
    logger.debug("prune_: %s", report.summary())  # callers report it (the prune stage once, with accuracy)
    return report


def _select_budget(units, layers, total, config: PruneConfig) -> list[RemovalUnit]:
    b = config.target_macs
    budget = int(b * total) if isinstance(b, float) else int(b)
    if config.rank == "scale":
        order = sorted(units, key=lambda u: abs(u.scale))
    else:
        order = sorted(units, key=lambda u: abs(u.scale) / max(u.macs, 1))
    gone: set[str] = set()
    chosen: list[RemovalUnit] = []
    macs = total
    per_stage = Counter(l.split(".")[0] for l in layers)
    for u in order:
        if macs <= budget:
            break
        new = [l for l in u.layers if l not in gone]
        stage_left = per_stage[u.stage] - len(new)
        if stage_left < config.min_layers_per_stage:
            continue
        chosen.append(u)
        gone.update(new)
        per_stage[u.stage] = stage_left
        macs -= sum(layers[l] for l in new)
    if macs > budget:
        raise PruneError(
            f"target_macs={b} (budget {budget:,} MACs of {total:,}) cannot be met: removing every "
            f"removable layer the stage rule allows leaves {macs:,} MACs "
            f"({100 * macs / total:.1f}%). Nothing was removed."
        )
    return [u for u in units if u in chosen]  # module order
