"""The training loop: learns, resumes bit-for-bit (momentum included), stops on NaN without losing the last
checkpoint, prox L1 gives exact zeros, weight decay never touches the layer scales."""

import pytest
import torch

import resprune as rp
from resprune.config import TrainConfig
from resprune.data import DeviceLoader, load_arrays
from resprune.train import Trainer, TrainingDiverged, param_groups


@pytest.fixture(scope="module")
def digits():
    tr, te = load_arrays("digits")
    return tr, te


def _trainer(digits, tmp_path, epochs=3, **kw):
    torch.manual_seed(0)
    tr, te = digits
    train = DeviceLoader(tr, 128, train=True, augment=True, pad=2, flip=False, seed=0)
    test = DeviceLoader(te, 512, mean=tuple(train.mean.flatten().tolist()), std=tuple(train.std.flatten().tolist()))
    model = rp.create_model("resnet20", num_classes=10, in_chans=1)
    cfg = TrainConfig(epochs=epochs, lr=0.1, warmup_epochs=0.5, device="cpu", **kw)
    return Trainer(model, train, test, cfg, tmp_path, "sparse", threshold=0.02, log=lambda s: None)


def test_learns_and_resumes_exactly(digits, tmp_path):
    torch.set_num_threads(1)  # bitwise determinism of the comparison
    full = _trainer(digits, tmp_path / "a", l1=0.01)
    hist = full.fit()
    assert hist[-1].test_acc > 80 and hist[-1].train_loss < hist[0].train_loss

    part = _trainer(digits, tmp_path / "b", l1=0.01)
    orig = part.save_checkpoint

    def stop_after_2(epoch):
        orig(epoch)
        if epoch == 2:
            raise KeyboardInterrupt

    part.save_checkpoint = stop_after_2
    with pytest.raises(KeyboardInterrupt):
        part.fit()
    again = _trainer(digits, tmp_path / "b", l1=0.01)
    h2 = again.fit(resume=True)
    assert [h.epoch for h in h2] == [1, 2, 3]
    for (n, a), (_, b) in zip(full.model.state_dict().items(), again.model.state_dict().items()):
        assert torch.equal(a, b), n
    assert_same_momentum(full, again)


def assert_same_momentum(a: Trainer, b: Trainer) -> None:
    for (n, p), (_, q) in zip(a.model.named_parameters(), b.model.named_parameters()):
        assert torch.equal(a.optimizer.state[p]["momentum_buffer"], b.optimizer.state[q]["momentum_buffer"]), n
    assert a.optimizer.param_groups[0]["lr"] == b.optimizer.param_groups[0]["lr"]


def test_resumes_a_checkpoint_with_the_optimizer_state_in_torch_form(digits, tmp_path):
    """Serial checkpoints hold torch's own optimizer state_dict (by index) before it was keyed
    by parameter name; they still resume with their momentum."""
    t = _trainer(digits, tmp_path, epochs=1)
    t.fit()
    state = torch.load(t.ckpt_path, weights_only=True)
    state["optimizer"] = t.optimizer.state_dict()
    torch.save(state, t.ckpt_path)
    again = _trainer(digits, tmp_path, epochs=2)
    assert again.resume()
    assert_same_momentum(t, again)


def test_nan_loss_stops_and_keeps_last_checkpoint(digits, tmp_path):
    t = _trainer(digits, tmp_path, epochs=1)
    t.fit()
    ckpt = t.ckpt_path.read_bytes()
    t2 = _trainer(digits, tmp_path, epochs=2)
    t2.resume()
    with torch.no_grad():
        t2.model.head.fc.weight.fill_(float("nan"))
    with pytest.raises(TrainingDiverged, match="at epoch 2, step"):
        t2.fit()
    assert t2.ckpt_path.read_bytes() == ckpt


def test_prox_l1_gives_exact_zeros(digits, tmp_path):
    t = _trainer(digits, tmp_path, epochs=4, l1=0.1)
    t.fit()
    vals = rp.scale_stats(t.model).values
    assert sum(v == 0.0 for v in vals) >= 3


def test_weight_decay_groups():
    m = rp.create_model("resnet20")
    decay, rest = param_groups(m, 5e-4)
    ids = {id(p) for p in decay["params"]}
    assert all(id(rc.scale) not in ids for _, rc in rp.sparsity.removable_scales(m))
    assert id(m.layer1[0].conv1.bn.weight) in ids  # ResConv BN: decayed (no rescaling escape)
    assert id(m.stem.bn.weight) not in ids and id(m.head.fc.bias) not in ids
    assert rest["weight_decay"] == 0.0
