"""The reference protocol's networks, trained many at once.

The published study (Longo, Mishra, Rusch, Schwab, SISC 2021) trains a *grid* of small MLPs
per training-set size: width x depth x Adam weight decay x initialisation, each net plain
float32 ``tanh``, Xavier-normal weights (gain 1) and PyTorch's default uniform biases, full
batch Adam with L2 weight decay added to the gradient (``torch.optim.Adam(weight_decay=...)``,
biases included), no input or target scaling. ``depth`` counts the *linear layers* (depth 4 is
three hidden layers of ``width`` and the output layer), as in the reference.

Such nets are tiny (a few hundred to nine thousand weights), so on a CPU one training step
costs far more in per-operation overhead than in arithmetic. :func:`train_batched` stacks
``B`` members of the same shape and trains them with batched matrix products
(``torch.baddbmm``) and one Adam over the stacked tensors: member ``b`` has its own
parameters, data, per-point loss weights and weight decay, and because Adam is elementwise
and members never mix, the result is member ``b`` trained alone (up to the summation order of
the matrix products; ``tests/test_qmc_reference.py`` checks it against :func:`train_member`,
the plain ``nn.Sequential`` + ``torch.optim.Adam`` path).

The loss of the reference on the nested sets ``P_{N/2} subset P_N`` (first half = ``P_{N/2}``)
is ``2 MSE(P_N) + MSE(P_{N/2})`` (:func:`reference_loss_weights`); its training error is
``E_T = sqrt|2 MSE(P_N) - MSE(P_{N/2})|`` and its generalisation error ``E_G`` the test RMSE
(:func:`reference_errors`).

Example:
    >>> import torch
    >>> from resprune.qmc.ensemble import GridConfig, init_members, train_batched
    >>> g = GridConfig(widths=(4,), depths=(3,), weight_decays=(1e-5,), inits=2, epochs=5)
    >>> params = init_members(2, 4, 3, seeds=[0, 1], dtype=torch.float32)
    >>> x = torch.rand(2, 8, 2)
    >>> out = train_batched(params, x, x.sum(-1, keepdim=True), torch.full((2, 8, 1), 1 / 8),
    ...                     torch.tensor([1e-5, 1e-5]), g)
    >>> [tuple(w.shape) for w, b in out]
    [(2, 2, 4), (2, 4, 4), (2, 4, 1)]
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import nn

__all__ = [
    "GridConfig",
    "Layers",
    "init_members",
    "forward",
    "train_batched",
    "train_member",
    "reference_loss_weights",
    "reference_errors",
]

_ACTS = {"tanh": torch.tanh, "relu": torch.relu}
_DTYPES = {"float32": torch.float32, "float64": torch.float64}

#: stacked ``(weight (B, in, out), bias (B, 1, out))`` per linear layer
Layers = list[tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class GridConfig:
    """The ensemble grid and its training (defaults: the reference's).

    Args:
        widths: neurons per hidden layer.
        depths: number of linear layers (hidden layers + 1).
        weight_decays: Adam's L2 coefficients (added to the gradient, biases included).
        inits: initialisations per (width, depth, weight decay); member seed ``0..inits-1``.
        epochs: full-batch Adam steps.
        lr: Adam learning rate (constant: the reference's).
        lr_final: if set, the learning rate decays from ``lr`` to ``lr_final`` over the epochs
            (cosine); ``None`` keeps it constant.
        scale_targets: train on ``(G - mean) / std`` of each training set and scale the outputs
            back (errors are in the units of ``G`` either way); ``False`` is the reference's.
        activation: ``"tanh"`` or ``"relu"``.
        dtype: ``"float32"`` (the reference's) or ``"float64"``.
        version: schema version.
    """

    widths: tuple[int, ...] = (6, 12, 24)
    depths: tuple[int, ...] = (4, 8, 16)
    weight_decays: tuple[float, ...] = (1e-5, 1e-6, 1e-7)
    inits: int = 2
    epochs: int = 20000
    lr: float = 1e-4
    lr_final: float | None = None
    scale_targets: bool = False
    activation: str = "tanh"
    dtype: str = "float32"
    version: int = 1

    def __post_init__(self) -> None:
        if not self.widths or not self.depths or not self.weight_decays:
            raise ValueError("widths, depths and weight_decays must not be empty")
        if min(self.widths) < 1 or min(self.depths) < 2:
            raise ValueError(f"need widths >= 1 and depths >= 2 (linear layers), got {self.widths}, {self.depths}")
        if min(self.weight_decays) < 0 or self.inits < 1 or self.epochs < 1 or self.lr <= 0:
            raise ValueError("need weight decays >= 0, inits >= 1, epochs >= 1 and lr > 0")
        if self.lr_final is not None and not 0 <= self.lr_final <= self.lr:
            raise ValueError(f"need 0 <= lr_final <= lr, got {self.lr_final}")
        if self.activation not in _ACTS:
            raise ValueError(f"activation must be one of {list(_ACTS)}, got {self.activation!r}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {list(_DTYPES)}, got {self.dtype!r}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]

    def shapes(self) -> list[tuple[int, int]]:
        """``(width, depth)`` pairs; members of one shape are trained together."""
        return list(itertools.product(self.widths, self.depths))

    def members(self) -> list[tuple[int, int, float, int]]:
        """``(width, depth, weight decay, init)`` of every member, in report order."""
        return [(w, d, wd, i) for w, d in self.shapes() for wd in self.weight_decays for i in range(self.inits)]


def init_members(in_dim: int, width: int, depth: int, seeds: Sequence[int], dtype: torch.dtype) -> Layers:
    """Stacked initial parameters of ``len(seeds)`` members of one shape.

    Member ``b`` is drawn from ``torch.Generator().manual_seed(seeds[b])`` layer by layer:
    weight ``N(0, 2/(fan_in + fan_out))`` (Xavier normal, gain 1), then bias
    ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))`` (PyTorch's ``nn.Linear`` default), so equal seeds
    give equal nets whatever the weight decay or the batch they are trained in.
    """
    sizes = [in_dim] + [width] * (depth - 1) + [1]
    layers: Layers = []
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
        ws, bs = [], []
        for g in gens:
            std = math.sqrt(2.0 / (fan_in + fan_out))
            ws.append(torch.randn(fan_in, fan_out, generator=g, dtype=torch.float64) * std)
            bound = 1.0 / math.sqrt(fan_in)
            bs.append((torch.rand(1, fan_out, generator=g, dtype=torch.float64) * 2 - 1) * bound)
        layers.append((torch.stack(ws).to(dtype), torch.stack(bs).to(dtype)))
    return layers


def forward(layers: Layers, x: torch.Tensor, activation: str = "tanh") -> torch.Tensor:
    """Outputs ``(B, n, 1)`` of the stacked nets on inputs ``x`` of shape ``(B, n, d)``
    (or ``(n, d)``, shared by every member)."""
    act = _ACTS[activation]
    h = x if x.dim() == 3 else x.expand(layers[0][0].shape[0], *x.shape)
    for i, (w, b) in enumerate(layers):
        h = torch.baddbmm(b, h, w)
        if i < len(layers) - 1:
            h = act(h)
    return h


def train_batched(layers: Layers, x: torch.Tensor, t: torch.Tensor, weights: torch.Tensor,
                  weight_decay: torch.Tensor, config: GridConfig) -> Layers:
    """Full-batch Adam on ``B`` stacked members; returns the trained (detached) parameters.

    Args:
        layers: initial parameters from :func:`init_members` (not modified).
        x: inputs ``(B, n, d)`` or ``(n, d)``.
        t: targets ``(B, n, 1)`` or ``(n, 1)``.
        weights: per-point loss weights ``(B, n, 1)``: member ``b`` minimises
            ``sum_i weights[b, i] (net_b(x_i) - t_i)^2`` (zero weight = padding).
        weight_decay: ``(B,)`` L2 coefficient per member, added to the gradient as
            ``torch.optim.Adam(weight_decay=...)`` does.
        config: ``epochs``, ``lr``, ``lr_final``, ``activation``.
    """
    params = [p.detach().clone().requires_grad_(True) for wb in layers for p in wb]
    pairs = list(zip(params[0::2], params[1::2]))
    wd = weight_decay.to(params[0].dtype).view(-1, 1, 1)
    opt = torch.optim.Adam(params, lr=config.lr, foreach=True)
    sched = None
    if config.lr_final is not None:
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, config.epochs, config.lr_final)
    t = t if t.dim() == 3 else t.expand(len(wd), *t.shape)
    for _ in range(config.epochs):
        opt.zero_grad(set_to_none=False)
        r = forward(pairs, x, config.activation) - t
        (weights * r * r).sum().backward()
        with torch.no_grad():
            for p in params:
                p.grad.addcmul_(p, wd)
        opt.step()
        if sched is not None:
            sched.step()
    return [(w.detach(), b.detach()) for w, b in pairs]


def _sequential(layers: Layers, member: int, activation: str) -> nn.Sequential:
    """Member ``member`` of stacked parameters as an ``nn.Sequential`` of ``nn.Linear``."""
    mods: list[nn.Module] = []
    for i, (w, b) in enumerate(layers):
        lin = nn.Linear(w.shape[1], w.shape[2], dtype=w.dtype)
        with torch.no_grad():
            lin.weight.copy_(w[member].T)
            lin.bias.copy_(b[member, 0])
        mods.append(lin)
        if i < len(layers) - 1:
            mods.append(nn.Tanh() if activation == "tanh" else nn.ReLU())
    return nn.Sequential(*mods)


def train_member(layers: Layers, member: int, x: torch.Tensor, t: torch.Tensor, weights: torch.Tensor,
                 weight_decay: float, config: GridConfig) -> nn.Sequential:
    """One member trained the plain way (``nn.Sequential``, ``torch.optim.Adam(weight_decay)``):
    the reference path :func:`train_batched` is tested against. ``x (n, d)``, ``t, weights (n, 1)``."""
    model = _sequential(layers, member, config.activation)
    opt = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=weight_decay)
    for _ in range(config.epochs):
        opt.zero_grad()
        r = model(x) - t
        (weights * r * r).sum().backward()
        opt.step()
    return model


def reference_loss_weights(n: int) -> np.ndarray:
    """Weights ``w`` with ``sum_i w_i r_i^2 = 2 MSE(P_N) + MSE(P_{N/2})`` for ``P_{N/2}`` the
    first half of ``P_N``: ``4/N`` on the first half, ``2/N`` on the second."""
    if n < 2 or n % 2:
        raise ValueError(f"the reference loss needs an even number of points, got {n}")
    w = np.full(n, 2.0 / n)
    w[: n // 2] += 2.0 / n
    return w


def reference_errors(r_train: np.ndarray, r_test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(E_T, E_G)`` per member from residuals ``net - G``.

    Args:
        r_train: ``(B, N)`` residuals on ``P_N`` (first half ``P_{N/2}``).
        r_test: ``(B, M)`` residuals on the test set.

    Returns:
        ``E_T = sqrt|2 MSE(P_N) - MSE(P_{N/2})|`` and ``E_G = sqrt(MSE(test))``, each ``(B,)``.
    """
    r_train, r_test = np.atleast_2d(r_train), np.atleast_2d(r_test)
    n = r_train.shape[1]
    if n < 2 or n % 2:
        raise ValueError(f"need an even number of training points, got {n}")
    mse_n = np.mean(r_train**2, axis=1)
    mse_half = np.mean(r_train[:, : n // 2] ** 2, axis=1)
    return np.sqrt(np.abs(2 * mse_n - mse_half)), np.sqrt(np.mean(r_test**2, axis=1))
