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

__all__ = ["LayerScaleL1", "removable_scales", "scale_stats", "ScaleStats"]


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


def scale_stats(model: nn.Module, threshold: float = 1e-2) -> ScaleStats:
    """Layer-scale values of the removable layers and how many fall under ``threshold``."""
    items = removable_scales(model)
    vals = [float(m.scale.detach()) for _, m in items]
    return ScaleStats([n for n, _ in items], vals, threshold, sum(abs(v) < threshold for v in vals))
