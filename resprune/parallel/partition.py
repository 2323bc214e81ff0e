"""Layer analysis and balanced contiguous partitions of a model's layer sequence.

Every layer-parallel engine splits ``model.layer_sequence()`` (stem, every block, head) into
contiguous stages, one per rank, balanced by a counted cost: the conv and linear MACs of the
layer for one sample of ``input_size`` plus a small charge per output element (ReLU, BN,
additions). :func:`analyze_layers` runs the model once on a zero batch of one sample, in eval
mode and without gradients (no BN statistics change), to record each layer's input and
output shape, whether it keeps the shape (a *residual* step that MGRIT may coarsen) and its
cost.

Example:
    >>> import resprune as rp
    >>> from resprune.parallel.partition import analyze_layers, balanced_bounds
    >>> info = analyze_layers(rp.create_model("resnet20"), (1, 3, 32, 32))
    >>> len(info.names), info.residual[:3]
    (11, [False, True, True])
    >>> balanced_bounds(info.costs, 2)
    [0, 5, 11]
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["LayerInfo", "layer_sequence", "analyze_layers", "balanced_bounds"]

# per output element, in MAC-equivalents: BN, ReLU, shortcut add (memory-bound work)
ELEMENTWISE_COST = 4


def layer_sequence(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``model.layer_sequence()``, checked: names are unique module paths of ``model`` and the
    layers cover every parameter and buffer of the model exactly once."""
    if not hasattr(model, "layer_sequence"):
        raise TypeError(
            f"{type(model).__name__} has no layer_sequence(); layer-parallel engines need the "
            "model as a flat list of (name, module) (resprune CIFAR nets provide it)"
        )
    seq = list(model.layer_sequence())
    if len(seq) < 2:
        raise ValueError("layer_sequence() must have at least two layers")
    mods = dict(model.named_modules())
    seen: set[int] = set()
    for name, m in seq:
        if mods.get(name) is not m:
            raise ValueError(f"layer_sequence() name {name!r} is not the module's path in the model")
        for t in list(m.parameters()) + list(m.buffers()):
            if id(t) in seen:
                raise ValueError(f"layer {name!r} shares a tensor with an earlier layer")
            seen.add(id(t))
    missing = [n for n, t in list(model.named_parameters()) + list(model.named_buffers())
               if id(t) not in seen]
    if missing:
        raise ValueError(f"layer_sequence() does not cover {missing[:5]} ...")
    return seq


@dataclass
class LayerInfo:
    """Per-layer shapes (one sample), residual flags and costs of a layer sequence."""

    names: list[str]
    in_shapes: list[tuple[int, ...]]
    out_shapes: list[tuple[int, ...]]
    residual: list[bool]
    costs: list[float]

    def point_shape(self, point: int, batch: int) -> tuple[int, ...]:
        """Shape of state ``point`` (0 = input, n = output of layer n−1) for a batch."""
        s = self.in_shapes[0] if point == 0 else self.out_shapes[point - 1]
        return (batch, *s)


@torch.no_grad()
def analyze_layers(model: nn.Module, input_size: tuple[int, ...]) -> LayerInfo:
    """Shapes, residual flags and costs of every layer for inputs shaped like ``input_size``.

    A layer is *residual* when its input and output have the same shape (a block of equal
    width and resolution); the stem, stride-2 transitions and the head are not. A model some
    of whose layers were released to the meta device (a rank of an engine) is analysed on a
    meta copy: shapes and counts need no numbers.
    """
    if any(t.is_meta for t in itertools.chain(model.parameters(), model.buffers())):
        model = copy.deepcopy(model).to("meta")
    seq = layer_sequence(model)
    p = next(model.parameters())
    x = torch.zeros((1, *input_size[1:]), device=p.device, dtype=p.dtype)
    macs = [0]

    def hook(m: nn.Module, inp, out) -> None:
        if isinstance(m, nn.Conv2d):
            k = m.kernel_size[0] * m.kernel_size[1] * m.in_channels // m.groups
            macs[0] += out.numel() * k
        elif isinstance(m, nn.Linear):
            macs[0] += out.numel() * m.in_features

    was = {m: m.training for m in model.modules()}
    model.eval()
    info = LayerInfo([], [], [], [], [])
    try:
        for name, layer in seq:
            hooks = [mm.register_forward_hook(hook) for mm in layer.modules()
                     if isinstance(mm, (nn.Conv2d, nn.Linear))]
            macs[0] = 0
            y = layer(x)
            for h in hooks:
                h.remove()
            info.names.append(name)
            info.in_shapes.append(tuple(x.shape[1:]))
            info.out_shapes.append(tuple(y.shape[1:]))
            info.residual.append(tuple(x.shape) == tuple(y.shape))
            info.costs.append(float(macs[0] + ELEMENTWISE_COST * y.numel()))
            x = y
    finally:
        for m, t in was.items():
            m.train(t)
    return info


def balanced_bounds(costs: list[float], parts: int) -> list[int]:
    """Split ``costs`` into ``parts`` contiguous non-empty ranges with near-equal sums.

    Returns ``bounds`` of length ``parts + 1``: part ``r`` is ``[bounds[r], bounds[r+1])``.
    Minimises the largest part exactly (binary search over the bottleneck, greedy fill), then
    hands out single layers so that no part is empty.
    """
    n = len(costs)
    if parts < 1 or parts > n:
        raise ValueError(f"cannot split {n} layers into {parts} non-empty parts")

    def greedy(cap: float) -> list[int] | None:
        b, acc = [0], 0.0
        for i, c in enumerate(costs):
            if acc + c > cap and acc > 0:
                b.append(i)
                acc = 0.0
            acc += c
        b.append(n)
        return b if len(b) - 1 <= parts else None

    lo, hi = max(costs), sum(costs)
    for _ in range(60):
        mid = (lo + hi) / 2
        if greedy(mid) is None:
            lo = mid
        else:
            hi = mid
    b = greedy(hi)
    assert b is not None
    # too few parts: split the largest (by layer count) ranges until there are enough
    while len(b) - 1 < parts:
        sizes = [(b[i + 1] - b[i], i) for i in range(len(b) - 1)]
        size, i = max(sizes)
        b.insert(i + 1, b[i] + size // 2)
    return b
