"""Surrogate training of resprune.qmc: configs, loss weights, fitting, ensemble."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from resprune.qmc.surrogate import (
    SurrogateConfig,
    build_mlp,
    loss_weights,
    normalised_rmse,
    relative_l2_error,
    train_ensemble,
    train_surrogate,
)

torch.set_num_threads(1)
FAST = SurrogateConfig(width=8, depth=2, adam_epochs=100, lbfgs_iters=150, weight_decay=1e-8)


def _data(n: int, d: int = 2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    y = np.random.default_rng(seed).random((n, d)) - 0.5
    return y, np.sin(2 * y[:, 0]) + 0.5 * y[:, 1] ** 2


@pytest.mark.parametrize("bad", [dict(width=0), dict(activation="gelu"), dict(loss="l1"),
                                 dict(adam_epochs=0, lbfgs_iters=0), dict(lr=0.0), dict(dtype="half")])
def test_config_validation(bad: dict) -> None:
    with pytest.raises(ValueError):
        SurrogateConfig(**bad)


def test_architecture_and_init() -> None:
    m = build_mlp(5, SurrogateConfig(width=7, depth=3))
    lins = [l for l in m if isinstance(l, torch.nn.Linear)]
    assert [l.weight.shape for l in lins] == [(7, 5), (7, 7), (7, 7), (1, 7)]
    assert all(l.weight.dtype == torch.float64 and torch.all(l.bias == 0) for l in lins)
    assert sum(isinstance(l, torch.nn.Tanh) for l in m) == 3
    assert sum(isinstance(l, torch.nn.ReLU) for l in build_mlp(5, SurrogateConfig(activation="relu"))) == 2


def test_extrapolated_weights_are_richardson_on_nested_sets() -> None:
    r2 = np.random.default_rng(0).random(16)
    w = loss_weights(16, "extrapolated")
    assert w @ r2 == pytest.approx(2 * r2.mean() - r2[:8].mean(), rel=1e-14)
    assert np.all(w[:8] == 0)  # on nested sets: the MSE over the second half
    assert loss_weights(16) @ r2 == pytest.approx(r2.mean(), rel=1e-14)
    with pytest.raises(ValueError):
        loss_weights(15, "extrapolated")


def test_fits_smooth_function_and_is_deterministic() -> None:
    y, g = _data(128)
    yt, gt = _data(1024, seed=1)
    s = train_surrogate(y, g, FAST)
    err = normalised_rmse(s.predict(yt), gt)
    assert err < 2e-2, err  # measured ~2e-3; a constant predictor gives 1
    assert relative_l2_error(s.predict(yt), gt) < err  # |G| > std(G) here
    s2 = train_surrogate(y, g, FAST)
    np.testing.assert_array_equal(s.predict(yt), s2.predict(yt))


def test_extrapolated_loss_ignores_first_half_labels() -> None:
    """With nested sets, 2 L(P_N) - L(P_N/2) is the MSE over the second half only: shuffling
    the first half's labels (which keeps the label mean and std used for scaling) leaves the
    trained surrogate unchanged up to round-off, while it changes an MSE-trained one."""
    y, g = _data(64)
    bad = g.copy()
    bad[:32] = bad[:32][::-1]
    yt, _ = _data(256, seed=2)
    for loss, agree in (("extrapolated", True), ("mse", False)):
        cfg = SurrogateConfig(width=8, depth=2, adam_epochs=50, lbfgs_iters=50, loss=loss)
        d = normalised_rmse(train_surrogate(y, bad, cfg).predict(yt), train_surrogate(y, g, cfg).predict(yt))
        assert (d < 1e-6) if agree else (d > 1e-2), (loss, d)


def test_weight_decay_shrinks_weights() -> None:
    y, g = _data(64)
    norms = []
    for wd in (0.0, 1e-2):
        s = train_surrogate(y, g, SurrogateConfig(width=8, depth=2, adam_epochs=100, lbfgs_iters=50, weight_decay=wd))
        norms.append(sum(float((m.weight.detach()**2).sum()) for m in s.model if isinstance(m, torch.nn.Linear)))
    assert norms[1] < 0.7 * norms[0], norms


def test_ensemble_selects_lowest_training_loss() -> None:
    y, g = _data(32)
    cfg = SurrogateConfig(width=4, depth=1, adam_epochs=30, lbfgs_iters=20)
    ens = train_ensemble(y, g, cfg, seeds=(0, 1), widths=(4, 8))
    assert len(ens.members) == 4
    assert ens.best.train_loss == min(m.train_loss for m in ens.members)
    assert {(m.config.seed, m.config.width) for m in ens.members} == {(0, 4), (0, 8), (1, 4), (1, 8)}
