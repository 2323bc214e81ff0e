"""ResConv2d and its fusion math (DESIGN.md §3).

A ResConv2d computes ``y = act(s · BN(W ∗ x) + P(x))`` where ``s`` is one trainable scalar
(the *layer scale*) and ``P`` is the parameter-free shortcut: the identity when the shape is
kept, otherwise "option A" (strided subsampling and zero channel padding). Every piece is
linear except ``act``, so the block fuses into one convolution::

    W' = s·t·W + D,   b' = s·(β + (c − μ)·t),   t = γ / sqrt(σ² + ε)

with ``c`` the conv bias (0 when absent) and ``D`` the (strided, channel-shifted) Dirac
kernel of ``P``.

Example:
    >>> import torch, resprune as rp
    >>> m = rp.ResConv2d(16, 32, 3, stride=2).eval()
    >>> x = torch.rand(2, 16, 8, 8)
    >>> deploy = m.fuse()  # Conv2d → ReLU, what rp.fuse puts in the layer's place
    >>> torch.allclose(deploy(x), m(x), atol=1e-5)
    True
    >>> conv = m.fused_conv()  # the conv alone, before the activation
    >>> torch.allclose(torch.relu(conv(x)), m(x), atol=1e-5)
    True
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ResConv2d", "ConvBN2d", "OptionAShortcut", "channel_offset", "dirac_kernel"]


def channel_offset(in_channels: int, out_channels: int) -> int:
    """Output channel ``o`` of an option-A shortcut reads input channel ``o - offset``.

    The padding (or cropping) is split evenly between both ends, as in the CIFAR ResNets of
    He et al. (16 → 32 channels puts the input in channels 8..23).
    """
    return (out_channels - in_channels) // 2


def option_a(x: torch.Tensor, out_channels: int, stride: int, pool: bool = False) -> torch.Tensor:
    """Strided subsampling plus zero channel padding (or symmetric cropping).

    ``pool=True`` subsamples with ``max_pool2d(kernel_size=1, stride=stride)`` instead of the
    strided slice: the same pixels ``(i·stride, j·stride)`` (a max over one element is that
    element), which the ONNX exporter writes as one ``MaxPool`` node (:mod:`resprune.onnx`).
    """
    if stride > 1:
        x = F.max_pool2d(x, kernel_size=1, stride=stride) if pool else x[:, :, ::stride, ::stride]
    c_in = x.shape[1]
    if c_in == out_channels:
        return x
    off = channel_offset(c_in, out_channels)
    if off >= 0:
        return F.pad(x, (0, 0, 0, 0, off, out_channels - c_in - off))
    return x[:, -off : -off + out_channels]


class OptionAShortcut(nn.Module):
    """The parameter-free option-A shortcut as a module (used for block shortcuts)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.in_channels, self.out_channels, self.stride = in_channels, out_channels, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return option_a(x, self.out_channels, self.stride)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, stride={self.stride}"


def dirac_kernel(
    in_channels: int,
    out_channels: int,
    kernel_size: int,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """The k×k kernel that computes the option-A shortcut (identity when shapes agree).

    With padding ``k // 2`` and the conv's stride, the centre tap reads input pixel
    ``(i·stride, j·stride)``, which is exactly the strided subsampling ``x[..., ::s, ::s]``.
    """
    d = torch.zeros(out_channels, in_channels, kernel_size, kernel_size, dtype=dtype, device=device)
    off = channel_offset(in_channels, out_channels)
    c = kernel_size // 2
    for o in range(out_channels):
        i = o - off
        if 0 <= i < in_channels:
            d[o, i, c, c] = 1.0
    return d


def _bn_factors(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (t, shift) with BN(z) = t·z + shift in eval mode."""
    var, mean = bn.running_var, bn.running_mean
    gamma = bn.weight if bn.weight is not None else torch.ones_like(var)
    beta = bn.bias if bn.bias is not None else torch.zeros_like(var)
    t = gamma / torch.sqrt(var + bn.eps)
    return t, beta - mean * t


def _scaled_batch_norm(bn: nn.BatchNorm2d, z: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``s · bn(z)`` in one pass: a batch norm whose affine parameters are ``(s·γ, s·β)``.

    Exact (the same normalisation and running-statistics update as ``bn.forward``), and it
    saves the full-tensor multiply by ``s``: on CPU that pass is a good part of what ResConv
    costs over a plain conv+BN in training.
    """
    if not bn.affine:
        return s * bn(z)
    momentum = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats:
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:  # cumulative moving average
            momentum = 1.0 / float(bn.num_batches_tracked)
    use_batch_stats = bn.training or bn.running_mean is None
    track = not bn.training or bn.track_running_stats
    return F.batch_norm(
        z, bn.running_mean if track else None, bn.running_var if track else None,
        s * bn.weight, s * bn.bias, use_batch_stats, momentum, bn.eps,
    )


def _check_conv_args(kernel_size: int, stride: int) -> None:
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be odd and >= 1 (1, 3, 5, ...), got {kernel_size}")
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")


class ConvBN2d(nn.Module):
    """Conv → BN (→ ReLU) without scale or shortcut: the baseline nets' layer.

    It fuses like a ResConv2d (BN folded into the conv), so baseline and ResConv nets share
    one code path for fusion, profiling and export.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        *,
        act: bool = True,
        bias: bool = False,
    ) -> None:
        super().__init__()
        _check_conv_args(kernel_size, stride)
        self.conv = nn.Conv2d(
            in_channels, out_channels, kernel_size, stride, kernel_size // 2, bias=bias
        )
        self.bn = nn.BatchNorm2d(out_channels)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x))
        return F.relu(y) if self.act else y

    def equivalent_kernel_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Differentiable (kernel, bias) of the eval-mode conv+BN."""
        t, shift = _bn_factors(self.bn)
        w = self.conv.weight * t.reshape(-1, 1, 1, 1)
        c = self.conv.bias if self.conv.bias is not None else 0.0
        return w, shift + c * t

    def fused_conv(self) -> nn.Conv2d:
        """One nn.Conv2d equal to the eval-mode layer before its activation."""
        return _make_conv(self.conv, *self.equivalent_kernel_bias())

    def fuse(self) -> nn.Module:
        """The deploy form that :func:`resprune.fuse` puts in this layer's place:
        :meth:`fused_conv`, followed by a ReLU when the layer has one (``act=True``)."""
        conv = self.fused_conv()
        return nn.Sequential(conv, nn.ReLU()) if self.act else conv


class ResConv2d(ConvBN2d):
    """A convolution with its own shortcut and a trainable layer scale.

    ``ConvBN2d`` plus the scale ``s`` and the shortcut ``P``:
    ``y = act(s · BN(W ∗ x) + P(x))``. ``act``, ``shortcut`` and ``bias`` are keyword-only.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        kernel_size: odd kernel size (1, 3, ...); padding is ``kernel_size // 2``.
        stride: convolution stride; the shortcut subsamples with the same stride.
        act: apply ReLU after the sum (``True``) or not.
        shortcut: ``True`` adds ``P(x)``. ``False`` makes this a *branch gate*: no shortcut of
            its own, the scale gates the residual branch of the enclosing block, whose own
            shortcut is added by the block (DESIGN.md §3, second conv of a basic block).
        bias: whether the inner conv has a bias (converted VGG convs do).

    Example:
        >>> m = ResConv2d(16, 16)
        >>> m.removable, m.scale.shape
        (True, torch.Size([]))
    """

    def __init__(self, *args: Any, shortcut: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.scale = nn.Parameter(torch.ones(()))
        self.shortcut = shortcut
        self.gate: str | None = None  # see set_gate: the scale is then h·tanh(g/h) or clamp(g, ±h)
        self.step = 1.0

    def set_gate(self, step: float, gate: str | None = "tanh") -> "ResConv2d":
        """ODE regime: the effective scale becomes ``h·tanh(g/h)`` (``gate="tanh"``) or
        ``clamp(g, −h, h)`` (``"clamp"``) with ``h = step`` fixed and ``g`` the trainable
        ``scale`` parameter: a fixed step times a bounded gate, ``|s| ≤ h``. For ``|g| ≪ h``
        the scale is ``g`` itself, so ``g`` trains at the rate the plain scale would and L1 /
        thresholds keep their units; ``g = 0`` is still a zero branch (an exact identity
        after ReLU), so L1/prox on ``g`` prunes and removal and fusion stay exact.
        ``gate=None`` restores the plain trainable scale."""
        if gate not in (None, "tanh", "clamp"):
            raise ValueError(f"gate must be None, 'tanh' or 'clamp', got {gate!r}")
        if not (step > 0):
            raise ValueError(f"step must be > 0, got {step!r}")
        self.gate, self.step = gate, float(step)
        return self

    @property
    def effective_scale(self) -> torch.Tensor:
        """The factor on the branch: ``scale``, or ``h·tanh(scale/h)`` / ``clamp(scale, ±h)``."""
        if self.gate is None:
            return self.scale
        h = self.step
        return h * torch.tanh(self.scale / h) if self.gate == "tanh" else self.scale.clamp(-h, h)

    @property
    def identity_shortcut(self) -> bool:
        """True when ``P`` is the identity (stride 1 and C_in = C_out)."""
        return self.conv.stride[0] == 1 and self.conv.in_channels == self.conv.out_channels

    @property
    def removable(self) -> bool:
        """Whether a zero scale lets the layer be removed exactly.

        Identity-shortcut layers become ``act(x) = x`` (inputs are post-ReLU, ``x ≥ 0``);
        branch gates remove their block's residual branch. Shape-changing layers are only
        ever fused.
        """
        return (not self.shortcut) or self.identity_shortcut

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        """The scaled residual branch ``s · BN(W ∗ x)`` (no shortcut, no activation)."""
        return _scaled_batch_norm(self.bn, self.conv(x), self.effective_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.branch(x)
        if self.shortcut:
            y = y + option_a(x, self.conv.out_channels, self.conv.stride[0])
        return F.relu(y) if self.act else y

    def residual_form(self):
        """Layer-parallel protocol (``resprune.parallel.residual``): ``(branch, act)`` when
        the layer is the residual step ``act(x + branch(x))`` (identity shortcut), else None."""
        return (self.branch, self.act) if self.shortcut and self.identity_shortcut else None

    def average_residual(self, layers: list[nn.Module], x: torch.Tensor) -> torch.Tensor | None:
        """One step for the run ``layers`` (this layer first) from their averaged parameters:
        ``act(x + Σᵢ sᵢ·BNᵢ(W̄∗x))`` with ``W̄`` the mean kernel, batch statistics of ``W̄∗x``
        and the summed affine ``Σ sᵢγᵢ, Σ sᵢβᵢ``; equal to the sum of the increments when the
        kernels agree. None unless every layer is an identity-shortcut ResConv2d like this
        one (MGRIT's ``coarse_params="average"``)."""
        if not all(isinstance(m, ResConv2d) and m.residual_form() is not None and m.bn.affine
                   and m.conv.weight.shape == self.conv.weight.shape and m.act == self.act
                   and m.conv.bias is None for m in layers):
            return None
        w = torch.stack([m.conv.weight for m in layers]).mean(0)
        gamma = sum(m.effective_scale * m.bn.weight for m in layers)
        beta = sum(m.effective_scale * m.bn.bias for m in layers)
        c = self.conv
        z = F.conv2d(x, w, None, c.stride, c.padding, c.dilation, c.groups)
        y = x + F.batch_norm(z, None, None, gamma, beta, True, 0.0, self.bn.eps)
        return F.relu(y) if self.act else y

    def equivalent_kernel_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Differentiable (kernel, bias) of one conv equal to the eval-mode block before act."""
        w, b = super().equivalent_kernel_bias()
        s = self.effective_scale
        w_eq, b_eq = s * w, s * b
        if self.shortcut:
            w_eq = w_eq + dirac_kernel(
                self.conv.in_channels, self.conv.out_channels, self.conv.kernel_size[0],
                dtype=w.dtype, device=w.device,
            )
        return w_eq, b_eq

    def extra_repr(self) -> str:
        gate = f", gate={self.gate}, step={self.step:g}" if self.gate else ""
        return f"act={self.act}, shortcut={self.shortcut}{gate}"


def _make_conv(like: nn.Conv2d, weight: torch.Tensor, bias: torch.Tensor) -> nn.Conv2d:
    conv = nn.Conv2d(
        like.in_channels, like.out_channels, like.kernel_size, like.stride, like.padding,
        dilation=like.dilation, groups=like.groups, bias=True,
        device=weight.device, dtype=weight.dtype,
    )
    with torch.no_grad():
        conv.weight.copy_(weight.detach())
        conv.bias.copy_(bias.detach())
    return conv
