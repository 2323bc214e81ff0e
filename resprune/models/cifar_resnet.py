"""CIFAR ResNets (He et al. 2016, option-A shortcuts) and plain ResConv chains.

``resnet{20,32,44,56,110,1202}``: a 3×3 stem (16 channels), three stages of ``n`` basic
blocks with 16/32/64 channels (``depth = 6n + 2``), global average pooling, a linear head.
With ``resconv=True`` (the default) each block is built as in DESIGN.md §3::

    h = ReLU(s₁·BN₁(W₁∗x) + P(x))        conv1: ResConv2d with its own shortcut
    y = ReLU(s₂·BN₂(W₂∗h) + S(x))        conv2: ResConv2d branch gate (no own shortcut)

With ``resconv=False`` the same net is built from plain conv+BN layers: the baseline that
counts exactly as the published tables (ResNet-56: 125.49 M MACs, 0.85 M params).

``plainres{20,32,44,56,110}``: the same depth without block shortcuts; every conv after the
stem is a ResConv2d (``resconv=False`` gives the classic plain net that degrades with depth).

The stem stays a plain conv+BN+ReLU in both variants: its input is the normalised image,
not a post-ReLU activation, so a shortcut there could never be removed.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import ConvBN2d, OptionAShortcut, ResConv2d
from .registry import register_model

__all__ = ["BasicBlock", "CifarResNet", "PlainResNet", "ResConvChain"]

STAGE_CHANNELS = (16, 32, 64)


def _shortcut(in_ch: int, out_ch: int, stride: int) -> nn.Module:
    if stride == 1 and in_ch == out_ch:
        return nn.Identity()
    return OptionAShortcut(in_ch, out_ch, stride)


class BasicBlock(nn.Module):
    """``y = ReLU(conv2(conv1(x)) + S(x))``; conv1 may be removed (→ Identity) and the whole
    residual branch may be removed (the block becomes ``S``) by :func:`resprune.prune_`."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1, resconv: bool = True) -> None:
        super().__init__()
        if resconv:
            self.conv1: nn.Module = ResConv2d(in_ch, out_ch, 3, stride, act=True)
            self.conv2: nn.Module = ResConv2d(out_ch, out_ch, 3, 1, act=False, shortcut=False)
        else:
            self.conv1 = ConvBN2d(in_ch, out_ch, 3, stride, act=True)
            self.conv2 = ConvBN2d(out_ch, out_ch, 3, 1, act=False)
        self.shortcut = _shortcut(in_ch, out_ch, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv2(self.conv1(x)) + self.shortcut(x))

    def residual_form(self):
        """Layer-parallel protocol (``resprune.parallel.residual``): ``y = ReLU(x + r(x))`` with
        ``r = conv2∘conv1`` when the shortcut is the identity, else None (a generic step)."""
        if not isinstance(self.shortcut, nn.Identity):
            return None
        return (lambda x: self.conv2(self.conv1(x))), True

    def without_branch(self) -> nn.Module | None:
        """What the block computes once its branch is gone: ``S`` (None when identity)."""
        return None if isinstance(self.shortcut, nn.Identity) else self.shortcut


class _Head(nn.Module):
    """Average pooling to a ``pool × pool`` grid, then a linear classifier."""

    def __init__(self, in_ch: int, num_classes: int, pool: int = 1) -> None:
        super().__init__()
        self.pool = pool
        self.fc = nn.Linear(in_ch * pool * pool, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, self.pool), 1))


class _CifarNet(nn.Module):
    """Shared skeleton: ``stem → layer1 → layer2 → layer3 → head``."""

    def __init__(self, stages: list[nn.Sequential], num_classes: int, in_chans: int) -> None:
        super().__init__()
        self.stem = ConvBN2d(in_chans, STAGE_CHANNELS[0], 3, 1, act=True)
        self.layer1, self.layer2, self.layer3 = stages
        self.head = _Head(STAGE_CHANNELS[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layer3(self.layer2(self.layer1(self.stem(x)))))

    def layer_sequence(self) -> list[tuple[str, nn.Module]]:
        """The model as a flat list of (name, module) run one after the other.

        This is what layer-parallel engines partition: the stem, every block (or layer) of
        every stage in order, and the head.
        """
        seq: list[tuple[str, nn.Module]] = [("stem", self.stem)]
        for sname in ("layer1", "layer2", "layer3"):
            seq += [(f"{sname}.{k}", m) for k, m in getattr(self, sname).named_children()]
        seq.append(("head", self.head))
        return seq


def _stages(depth: int, kind: str, per_n: int, unit: Callable[[int, int, int], nn.Module]) -> list[nn.Sequential]:
    """The three stages of a ``depth = 6n + 2`` CIFAR net: ``per_n · n`` units each, built by
    ``unit(in_ch, out_ch, stride)``; the first unit of stages 2 and 3 has stride 2."""
    if (depth - 2) % 6:
        raise ValueError(f"{kind} depth must be 6n+2, got {depth}")
    n = (depth - 2) // 6
    stages, in_ch = [], STAGE_CHANNELS[0]
    for i, ch in enumerate(STAGE_CHANNELS):
        units: list[nn.Module] = []
        for b in range(per_n * n):
            units.append(unit(in_ch, ch, 2 if (i > 0 and b == 0) else 1))
            in_ch = ch
        stages.append(nn.Sequential(*units))
    return stages


class CifarResNet(_CifarNet):
    def __init__(self, depth: int, num_classes: int = 10, resconv: bool = True, in_chans: int = 3):
        blocks = _stages(depth, "CIFAR ResNet", 1, lambda i, o, stride: BasicBlock(i, o, stride, resconv))
        super().__init__(blocks, num_classes, in_chans)


class PlainResNet(_CifarNet):
    def __init__(self, depth: int, num_classes: int = 10, resconv: bool = True, in_chans: int = 3):
        layer = ResConv2d if resconv else ConvBN2d
        super().__init__(_stages(depth, "plain CIFAR net", 2, lambda i, o, stride: layer(i, o, 3, stride)),
                         num_classes, in_chans)


def _register(cls: type[_CifarNet], depth: int, name: str, doc: str) -> None:
    def factory(num_classes: int = 10, resconv: bool = True, in_chans: int = 3) -> nn.Module:
        return cls(depth, num_classes, resconv, in_chans)

    factory.__name__, factory.__doc__ = name, doc
    register_model(factory)


for _d in (20, 32, 44, 56, 110, 1202):
    _register(CifarResNet, _d, f"resnet{_d}", f"CIFAR ResNet-{_d} (option A); ``resconv=False`` gives the baseline.")
for _d in (20, 32, 44, 56, 110):
    _register(PlainResNet, _d, f"plainres{_d}",
              f"Plain {_d}-layer CIFAR net, every conv after the stem a ResConv2d.")


class ResConvChain(nn.Module):
    """A deep chain of identity-shortcut ResConv2d layers of one width: the ODE-like net of
    layer-parallel training (``u[n+1] = ReLU(u[n] + s·BN(W∗u[n]))``, step size ``s``).

    Args:
        depth: number of ResConv2d layers (the fine grid of MGRIT).
        width: channels of every layer.
        horizon: when given, every layer scale starts at ``horizon / depth`` (the time step
            of an ODE on [0, horizon]); default 1 per layer, like every ResConv2d.
        gate: ``"tanh"`` or ``"clamp"``: the ODE regime of layer-parallel training. Each
            layer's scale is the fixed step ``h = horizon / depth`` (horizon default 1) times a
            bounded trainable gate, ``h·tanh(g/h)`` or ``clamp(g, −h, h)``
            (:meth:`ResConv2d.set_gate`); ``g`` (the ``scale`` parameter, which L1 and
            pruning thresholds act on) starts at ``h``.
        stem_stride: stride of the stem conv; 2 runs the chain at half the resolution (a
            quarter of the MACs), which is what makes a 256-layer chain trainable on a CPU.
        head_pool: the head averages the last states to a ``head_pool × head_pool`` grid
            (default 1: global pooling) before its linear layer. A grid keeps where features
            are, as the flattening close layer of the layer-parallel references does; it must
            divide the chain's resolution for ONNX export.
    """

    def __init__(self, depth: int = 256, width: int = 16, num_classes: int = 10, in_chans: int = 3,
                 horizon: float | None = None, gate: str | None = None, stem_stride: int = 1,
                 head_pool: int = 1) -> None:
        super().__init__()
        if depth < 1 or width < 1 or head_pool < 1:
            raise ValueError(f"depth, width and head_pool must be >= 1, got {depth}, {width}, {head_pool}")
        self.stem = ConvBN2d(in_chans, width, 3, stride=stem_stride)
        self.blocks = nn.Sequential(*[ResConv2d(width, width) for _ in range(depth)])
        self.head = _Head(width, num_classes, head_pool)
        if gate is not None:
            h = (1.0 if horizon is None else horizon) / depth
            with torch.no_grad():
                for m in self.blocks:
                    m.set_gate(h, gate).scale.fill_(h)
        elif horizon is not None:
            with torch.no_grad():
                for m in self.blocks:
                    m.scale.fill_(horizon / depth)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))

    def layer_sequence(self) -> list[tuple[str, nn.Module]]:
        return [("stem", self.stem), *[(f"blocks.{k}", m) for k, m in self.blocks.named_children()],
                ("head", self.head)]


@register_model
def resconv_chain(num_classes: int = 10, depth: int = 256, width: int = 16, in_chans: int = 3,
                  horizon: float | None = None, gate: str | None = None, stem_stride: int = 1,
                  head_pool: int = 1) -> nn.Module:
    """Deep ResConv chain (``depth`` layers of ``width`` channels); see :class:`ResConvChain`."""
    return ResConvChain(depth, width, num_classes, in_chans, horizon, gate, stem_stride, head_pool)
