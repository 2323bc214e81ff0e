"""MLP surrogates of ``y -> G(y)`` trained full batch: Adam, then optionally L-BFGS.

The loss is the mean squared error of standardised targets plus ``weight_decay`` times
the squared 2-norm of the weight matrices (biases are not penalised). The same penalised
loss is used by Adam and by L-BFGS, so weight decay means one thing in both phases.

``loss="extrapolated"`` trains on the Richardson-type combination of the nested sets
``P_N`` and its first half ``P_{N/2}`` (see :func:`resprune.qmc.points.nested_pair`)::

    L_extrap = 2 * L(P_N) - L(P_{N/2})

with ``L(P)`` the mean squared error over ``P``. Because ``P_{N/2}`` is a prefix of
``P_N`` this equals the mean squared error over the *second* half of ``P_N`` (which is
itself a digitally shifted net for Sobol' points) -- it is well posed (never negative),
but it uses only ``N/2`` of the ``N`` labelled points. It is offered as the nested-set
option the reference describes, not as the default.

Example:
    >>> import numpy as np
    >>> from resprune.qmc.surrogate import SurrogateConfig, train_surrogate
    >>> x = np.random.default_rng(0).random((32, 3)) - 0.5
    >>> s = train_surrogate(x, x.sum(1), SurrogateConfig(width=8, depth=2, adam_epochs=50, lbfgs_iters=0))
    >>> s.predict(x).shape
    (32,)
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field, replace
from typing import Sequence

import numpy as np
import torch
from torch import nn

logger = logging.getLogger(__name__)

__all__ = [
    "SurrogateConfig",
    "Surrogate",
    "build_mlp",
    "train_surrogate",
    "train_ensemble",
    "EnsembleResult",
    "relative_l2_error",
    "loss_weights",
    "normalised_rmse",
]

_ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU}
_DTYPES = {"float64": torch.float64, "float32": torch.float32}


@dataclass(frozen=True)
class SurrogateConfig:
    """How one surrogate is built and trained.

    Args:
        width: neurons per hidden layer.
        depth: number of hidden layers.
        activation: ``"tanh"`` (holomorphic; the method's choice) or ``"relu"`` (ablation).
        adam_epochs: full-batch Adam steps.
        lr: Adam learning rate.
        weight_decay: coefficient of the squared 2-norm of the weights in the loss.
        lbfgs_iters: L-BFGS iterations after Adam (0 to skip).
        loss: ``"mse"`` or ``"extrapolated"`` (nested ``N`` and ``N/2`` sets).
        seed: initialisation seed (Xavier-normal weights, zero biases).
        dtype: ``"float64"`` or ``"float32"``.
        version: schema version.
    """

    width: int = 12
    depth: int = 2
    activation: str = "tanh"
    adam_epochs: int = 200
    lr: float = 1e-2
    weight_decay: float = 1e-5
    lbfgs_iters: int = 600
    loss: str = "mse"
    seed: int = 0
    dtype: str = "float64"
    version: int = 1

    def __post_init__(self) -> None:
        if self.width < 1 or self.depth < 1:
            raise ValueError(f"width and depth must be >= 1, got {self.width}, {self.depth}")
        if self.activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of {list(_ACTIVATIONS)}, got {self.activation!r}")
        if self.adam_epochs < 0 or self.lbfgs_iters < 0:
            raise ValueError("adam_epochs and lbfgs_iters must be >= 0")
        if self.adam_epochs + self.lbfgs_iters == 0:
            raise ValueError("no training steps")
        if self.lr <= 0 or self.weight_decay < 0:
            raise ValueError("need lr > 0 and weight_decay >= 0")
        if self.loss not in ("mse", "extrapolated"):
            raise ValueError(f"loss must be 'mse' or 'extrapolated', got {self.loss!r}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {list(_DTYPES)}")


def build_mlp(in_dim: int, config: SurrogateConfig) -> nn.Sequential:
    """``depth`` hidden layers of ``width`` with the activation, then a linear output.

    Weights are Xavier-normal (gain 5/3 for tanh, sqrt(2) for ReLU), biases zero.
    """
    gen = torch.Generator().manual_seed(config.seed)
    act = _ACTIVATIONS[config.activation]
    gain = nn.init.calculate_gain(config.activation)
    layers: list[nn.Module] = []
    d = in_dim
    for _ in range(config.depth):
        layers += [nn.Linear(d, config.width), act()]
        d = config.width
    layers.append(nn.Linear(d, 1))
    model = nn.Sequential(*layers).to(_DTYPES[config.dtype])
    with torch.no_grad():
        for m in model:
            if isinstance(m, nn.Linear):
                std = (gain if m is not layers[-1] else 1.0) * math.sqrt(2.0 / (m.in_features + m.out_features))
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen, dtype=m.weight.dtype) * std)
                m.bias.zero_()
    return model


@dataclass
class Surrogate:
    """A trained network with the input/target scaling it was trained with.

    ``predict(y)`` maps parameters in ``[-1/2, 1/2]^d`` to the observable (inputs are
    scaled by 2 to ``[-1, 1]``; outputs un-standardised).
    """

    model: nn.Sequential
    config: SurrogateConfig
    target_mean: float
    target_std: float
    train_loss: float
    seconds: float
    history: list[float] = field(default_factory=list)

    def predict(self, y: np.ndarray, batch: int = 65536) -> np.ndarray:
        dtype = _DTYPES[self.config.dtype]
        out = []
        with torch.no_grad():
            for s in range(0, len(y), batch):
                xb = torch.as_tensor(2.0 * np.asarray(y[s : s + batch]), dtype=dtype)
                out.append(self.model(xb).squeeze(-1).double().numpy())
        return np.concatenate(out) * self.target_std + self.target_mean if out else np.empty(0)


def relative_l2_error(pred: np.ndarray, target: np.ndarray) -> float:
    """``||pred - target||_2 / ||target||_2`` over a test set (the reference's metric)."""
    return float(np.linalg.norm(pred - target) / np.linalg.norm(target))


def normalised_rmse(pred: np.ndarray, target: np.ndarray) -> float:
    """RMS error divided by the standard deviation of ``target`` (1 = predicting the mean)."""
    return float(np.sqrt(np.mean((pred - target) ** 2)) / np.std(target))


def loss_weights(n: int, loss: str = "mse") -> np.ndarray:
    """Per-point weights ``w`` with ``loss = sum_i w_i r_i^2`` for residuals ``r``.

    ``"mse"``: ``1/N`` each. ``"extrapolated"``: the weights of ``2 L(P_N) - L(P_{N/2})``
    with ``P_{N/2}`` the first half, i.e. ``0`` on the first half and ``2/N`` on the second.
    """
    if loss == "mse":
        return np.full(n, 1.0 / n)
    if loss == "extrapolated":
        if n % 2:
            raise ValueError("the extrapolated loss needs an even number of points")
        w = np.full(n, 2.0 / n)
        w[: n // 2] -= 2.0 / n  # 2 * (1/N) - (2/N) on the nested half
        return w
    raise ValueError(f"unknown loss {loss!r}")


def train_surrogate(y: np.ndarray, g: np.ndarray, config: SurrogateConfig) -> Surrogate:
    """Fit an MLP to samples ``g = G(y)``.

    Args:
        y: training parameters ``(N, d)`` in ``[-1/2, 1/2]^d``. With
            ``loss="extrapolated"`` the first ``N/2`` rows must be the nested half set
            (``N`` even), as produced by :func:`resprune.qmc.points.nested_pair`.
        g: targets ``(N,)``.
        config: network and optimiser settings.

    Returns:
        The trained :class:`Surrogate` (final penalised training loss in ``train_loss``).
    """
    y = np.asarray(y, dtype=np.float64)
    g = np.asarray(g, dtype=np.float64).reshape(-1)
    if y.ndim != 2 or len(y) != len(g) or len(g) < 2:
        raise ValueError(f"need y (N, d) and g (N,) with N >= 2, got {y.shape}, {g.shape}")
    if config.loss == "extrapolated" and len(g) % 2:
        raise ValueError("the extrapolated loss needs an even number of points")
    t0 = time.perf_counter()
    dtype = _DTYPES[config.dtype]
    mean, std = float(g.mean()), float(g.std()) or 1.0
    x = torch.as_tensor(2.0 * y, dtype=dtype)
    t = torch.as_tensor((g - mean) / std, dtype=dtype).unsqueeze(-1)
    n = len(g)
    w = torch.as_tensor(loss_weights(n, config.loss), dtype=dtype).unsqueeze(-1)
    model = build_mlp(y.shape[1], config)
    weights = [m.weight for m in model if isinstance(m, nn.Linear)]
    lam = config.weight_decay

    def loss_fn() -> torch.Tensor:
        r = model(x) - t
        loss = (w * r * r).sum()
        if lam:
            loss = loss + lam * sum((p * p).sum() for p in weights)
        return loss

    history: list[float] = []
    opt = torch.optim.Adam(model.parameters(), lr=config.lr)
    # cosine decay to lr/100 over the Adam phase
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(config.adam_epochs, 1), config.lr / 100)
    for epoch in range(config.adam_epochs):
        opt.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        opt.step()
        sched.step()
        if epoch % 100 == 0:
            history.append(float(loss.detach()))
    if config.lbfgs_iters:
        lbfgs = torch.optim.LBFGS(
            model.parameters(), lr=1.0, max_iter=config.lbfgs_iters, history_size=50,
            tolerance_grad=1e-12, tolerance_change=1e-16, line_search_fn="strong_wolfe",
        )

        def closure() -> torch.Tensor:
            lbfgs.zero_grad(set_to_none=True)
            loss = loss_fn()
            loss.backward()
            return loss

        lbfgs.step(closure)
    with torch.no_grad():
        final = float(loss_fn())
    history.append(final)
    if not math.isfinite(final):
        logger.warning("training diverged (loss %s)", final)
    return Surrogate(model, config, mean, std, final, time.perf_counter() - t0, history)


@dataclass
class EnsembleResult:
    """All members of an ensemble and the one picked by the lowest training loss."""

    members: list[Surrogate]
    best: Surrogate

    def predict(self, y: np.ndarray) -> np.ndarray:
        """Prediction of the selected member (selection never looks at test data)."""
        return self.best.predict(y)


def train_ensemble(
    y: np.ndarray,
    g: np.ndarray,
    config: SurrogateConfig,
    seeds: Sequence[int] = (0, 1, 2),
    widths: Sequence[int] | None = None,
    depths: Sequence[int] | None = None,
) -> EnsembleResult:
    """Train one surrogate per (seed, width, depth) and keep the lowest training loss.

    Args:
        y, g: training data as for :func:`train_surrogate`.
        config: base settings; ``seed``, ``width``, ``depth`` are overridden per member.
        seeds: initialisation seeds.
        widths: hidden widths (default: ``config.width`` only).
        depths: hidden depths (default: ``config.depth`` only).
    """
    members = [
        train_surrogate(y, g, replace(config, seed=s, width=wd, depth=dp))
        for s in seeds
        for wd in (widths or (config.width,))
        for dp in (depths or (config.depth,))
    ]
    if not members:
        raise ValueError("empty ensemble")
    best = min(members, key=lambda m: m.train_loss if math.isfinite(m.train_loss) else math.inf)
    return EnsembleResult(members, best)
