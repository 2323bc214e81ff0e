"""MACs and parameters, per layer and total (DESIGN.md §7).

The headline figure is the MACs of conv and linear layers, the convention of the published
CIFAR tables (ResNet-56: 125.49 M, ResNet-110: 252.89 M). A conv's bias is not counted, so a
fused model (whose convs carry the folded BN as a bias) counts the same MACs as the baseline
net with the same layers. Everything else thop counts (BatchNorm, pooling, activations) is
reported separately as ``other_ops``.

thop attaches ``total_ops``/``total_params`` buffers to the modules it profiles and leaves
some of them behind, which breaks a later strict ``load_state_dict``; we profile a deep copy
so that the caller's model is never touched.

Example:
    >>> import resprune as rp
    >>> p = rp.profile(rp.create_model("resnet56", resconv=False), (1, 3, 32, 32))
    >>> round(p.macs / 1e6, 2), round(p.params / 1e6, 2)
    (125.49, 0.85)
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

__all__ = ["LayerProfile", "Profile", "profile"]

#: The input size every API defaults to: one CIFAR-sized RGB image.
DEFAULT_INPUT_SIZE: tuple[int, ...] = (1, 3, 32, 32)


@dataclass
class LayerProfile:
    name: str
    kind: str
    out_shape: tuple[int, ...]
    macs: int
    params: int


@dataclass
class Profile:
    """MACs (conv + linear, per forward of ``input_size``), params and the per-layer rows."""

    macs: int
    params: int
    other_ops: int
    input_size: tuple[int, ...]
    layers: list[LayerProfile] = field(default_factory=list)

    def table(self) -> str:
        """Fixed-width per-layer table with a total line."""
        w = max([len(r.name) for r in self.layers] + [5])
        lines = [f"{'layer':<{w}}  {'type':<8} {'output':<16} {'MACs':>12} {'params':>9}"]
        for r in self.layers:
            shape = "x".join(map(str, r.out_shape[1:]))
            lines.append(f"{r.name:<{w}}  {r.kind:<8} {shape:<16} {r.macs:>12,} {r.params:>9,}")
        lines.append(f"{'total (conv+linear MACs, all params)':<{w + 26}} {self.macs:>12,} {self.params:>9,}")
        lines.append(f"other ops counted by thop (BN, pooling, activations): {self.other_ops:,}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return asdict(self)


def profile(
    model: nn.Module, input_size: tuple[int, ...] = DEFAULT_INPUT_SIZE, device: str | None = None
) -> Profile:
    """Count MACs and parameters of ``model`` for one forward pass of ``input_size``.

    Args:
        model: any nn.Module; it is deep-copied, never modified.
        input_size: input shape including the batch dimension (MACs are for the whole batch).
        device: where to run the copy (default: where the model's parameters are).
    """
    import thop  # imported here: its import prints nothing but is slow-ish

    rows: list[LayerProfile] = []
    names: dict[int, str] = {}

    def conv_rule(m: nn.Conv2d, x, y) -> None:
        k = m.weight[0].numel()  # (C_in / groups) · kh · kw; bias not counted
        macs = int(y.numel() * k)
        m.total_ops += torch.tensor([macs], dtype=torch.float64)
        rows.append(LayerProfile(names[id(m)], "conv", tuple(y.shape), macs, m.weight.numel()))

    def linear_rule(m: nn.Linear, x, y) -> None:
        macs = int(y.numel() * m.in_features)
        m.total_ops += torch.tensor([macs], dtype=torch.float64)
        rows.append(LayerProfile(names[id(m)], "linear", tuple(y.shape), macs, m.weight.numel()))

    params = sum(p.numel() for p in model.parameters())
    ref = next(model.parameters(), None)
    dev = torch.device(device) if device else (ref.device if ref is not None else torch.device("cpu"))
    dtype = ref.dtype if ref is not None and ref.is_floating_point() else torch.float32
    clone = copy.deepcopy(model).to(dev).eval()
    names.update({id(m): n for n, m in clone.named_modules()})
    x = torch.zeros(input_size, device=dev, dtype=dtype)
    total, _ = thop.profile(
        clone, inputs=(x,), custom_ops={nn.Conv2d: conv_rule, nn.Linear: linear_rule}, verbose=False
    )
    # per-layer rows also get the layer's own bias params, so the table adds up
    for r in rows:
        bias = getattr(clone.get_submodule(r.name), "bias", None)
        r.params += bias.numel() if bias is not None else 0
    macs = sum(r.macs for r in rows)
    return Profile(macs, params, int(round(total)) - macs, tuple(input_size), rows)
