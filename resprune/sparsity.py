"""L1 penalty on layer scales and layer-scale statistics.

Example:
    >>> import torch, resprune as rp
    >>> m = rp.create_model("resnet20")
    >>> round(float(rp.LayerScaleL1(1e-4)(m).detach()), 6)  # 16 removable scales at 1.0
    0.0016
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .layers import ResConv2d

#: The default pruning rule, ``|scale| < 1e-2``; also the threshold that the "scales below the
#: threshold" statistics of training and of a MACs-budget run are counted against.
DEFAULT_THRESHOLD = 1e-2

__all__ = ["LayerScaleL1", "LayerSmoothness", "RegularizerSum", "same_structure", "removable_scales",
           "scale_stats", "ScaleStats"]


def removable_scales(model: nn.Module) -> list[tuple[str, ResConv2d]]:
    """(name, layer) of every ResConv2d whose zero scale lets it be removed."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, ResConv2d) and m.removable]


class LayerScaleL1(nn.Module):
    """``λ · Σ |s|`` over the removable ResConv layers of a model.

    Weight decay should not also act on the scales (the training loop excludes them), so that
    this term alone decides which scales go to zero.
    """

    def __init__(self, lam: float) -> None:
        super().__init__()
        if not (lam >= 0.0) or lam != lam:
            raise ValueError(f"L1 coefficient must be a number >= 0, got {lam}")
        self.lam = float(lam)

    def forward(self, model: nn.Module) -> torch.Tensor:
        scales = [m.scale for _, m in removable_scales(model)]
        if not scales or self.lam == 0.0:
            ref = next(model.parameters())
            return torch.zeros((), device=ref.device, dtype=ref.dtype)
        return self.lam * torch.stack([s.abs() for s in scales]).sum()

    @torch.no_grad()
    def prox_(self, model: nn.Module | list[torch.Tensor], optimizer: torch.optim.Optimizer, *,
              reset_momentum: bool = False) -> None:
        """The proximal (soft-threshold) step of ``λ·Σ|s|``: call it right after
        ``optimizer.step()``, instead of adding this term to the loss. Each removable scale
        becomes ``sign(s)·max(|s| − lr·λ/(1−β), 0)`` with the ``lr`` and momentum ``β`` of its
        parameter group (the ``1/(1−β)`` is the step a constant gradient ``λ`` takes under
        momentum, so ``λ`` means the same as in the loss). Scales whose task gradient stays
        below ``λ`` reach exactly 0, so removing their layers changes nothing.

        ``model``: the model (its removable scales) or a list of scale tensors.
        ``reset_momentum``: clear the momentum buffer of every scale at 0, so that momentum
        gathered on the way down cannot revive it (only a task gradient above ``λ`` can).

        Example (your own loop)::

            reg = rp.LayerScaleL1(1e-3)
            for x, y in loader:
                opt.zero_grad(); F.cross_entropy(model(x), y).backward(); opt.step()
                reg.prox_(model, opt)
        """
        scales = [m.scale for _, m in removable_scales(model)] if isinstance(model, nn.Module) else list(model)
        group = {id(p): g for g in optimizer.param_groups for p in g["params"]}
        for s in scales:
            g = group.get(id(s))
            if g is None:
                raise ValueError("prox_: a layer scale is not among the optimizer's parameters")
            beta = g.get("momentum", 0.0) or 0.0
            if self.lam > 0:
                shrink = g["lr"] * self.lam / (1.0 - beta)
                s.copy_(torch.sign(s) * (s.abs() - shrink).clamp_min(0.0))
            buf = optimizer.state.get(s, {}).get("momentum_buffer") if reset_momentum else None
            if buf is not None:  # without a device sync: multiply by (s != 0)
                buf.mul_((s != 0).to(buf.dtype))


def _layers_in_order(model: nn.Module) -> list[nn.Module]:
    if hasattr(model, "layer_sequence"):
        return [m for _, m in model.layer_sequence()]
    return list(model.children())


def same_structure(a: nn.Module, b: nn.Module) -> bool:
    """Whether two layers have the same type and the same parameter names and shapes (the
    pairs :class:`LayerSmoothness` couples)."""
    if type(a) is not type(b):
        return False
    pa, pb = list(a.named_parameters()), list(b.named_parameters())
    return bool(pa) and [(n, p.shape) for n, p in pa] == [(n, p.shape) for n, p in pb]


class LayerSmoothness(nn.Module):
    """``γ · Σₙ ‖θₙ₊₁ − θₙ‖²`` over consecutive layers of the same structure (every parameter
    of the pair, e.g. kernel, BN affine and scale of two ResConv2d): the smoothness across
    layers that keeps a coarse layer-parallel step a good model of the fine ones.

    Layers are ``model.layer_sequence()`` when the model has one, else its children (an
    ``nn.ModuleList`` of a rank's layers). Layer-parallel engines pass the neighbours of their
    range as detached parameter lists: ``before`` (the previous rank's last layer: its pair is
    counted here) and ``after`` (the next rank's first layer: gradient only, its value is
    counted on the next rank), so the ranks' values add up to the model's.
    """

    neighbours = True  # engines pass before=/after= (see MGRITEngine)

    def __init__(self, gamma: float) -> None:
        super().__init__()
        if not (gamma >= 0.0):
            raise ValueError(f"smoothness coefficient must be a number >= 0, got {gamma}")
        self.gamma = float(gamma)

    @staticmethod
    def _pair(a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
        return sum((x - y).pow(2).sum() for x, y in zip(a, b))

    def forward(self, model: nn.Module, before: list[torch.Tensor] | None = None,
                after: list[torch.Tensor] | None = None) -> torch.Tensor:
        layers = _layers_in_order(model)
        ref = next(model.parameters())
        total = torch.zeros((), device=ref.device, dtype=ref.dtype)
        if self.gamma == 0.0 or not layers:
            return total
        params = [[p for p in m.parameters()] for m in layers]
        for i in range(len(layers) - 1):
            if same_structure(layers[i], layers[i + 1]):
                total = total + self._pair(params[i + 1], params[i])
        if before is not None:
            total = total + self._pair(params[0], before)
        if after is not None:  # the gradient of the next rank's pair; value 0 here
            t = self._pair(after, params[-1])
            total = total + (t - t.detach())
        return self.gamma * total


class RegularizerSum(nn.Module):
    """The sum of regularizers; ``before``/``after`` go to those that take neighbours."""

    def __init__(self, *terms: nn.Module) -> None:
        super().__init__()
        self.terms = nn.ModuleList(terms)
        self.neighbours = any(getattr(t, "neighbours", False) for t in terms)

    def smoothness(self) -> "LayerSmoothness | None":
        return next((t for t in self.terms if isinstance(t, LayerSmoothness)), None)

    def forward(self, model: nn.Module, **kw) -> torch.Tensor:
        return sum(t(model, **kw) if getattr(t, "neighbours", False) else t(model) for t in self.terms)


@dataclass
class ScaleStats:
    names: list[str]
    values: list[float]
    threshold: float
    below: int

    @property
    def count(self) -> int:
        return len(self.values)

    def summary(self) -> str:
        if not self.values:
            return "no removable layer scales"
        v = sorted(abs(x) for x in self.values)
        return (
            f"{self.count} removable scales: |s| min {v[0]:.3g}, median {v[len(v) // 2]:.3g}, "
            f"max {v[-1]:.3g}; {self.below} below threshold {self.threshold:g}"
        )


def scale_stats(model: nn.Module, threshold: float = DEFAULT_THRESHOLD) -> ScaleStats:
    """Layer-scale values of the removable layers and how many fall under ``threshold``."""
    items = removable_scales(model)
    vals = [float(m.scale.detach()) for _, m in items]
    return ScaleStats([n for n, _ in items], vals, threshold, sum(abs(v) < threshold for v in vals))
