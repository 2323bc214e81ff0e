"""The ODE-regime options of layer-parallel training (single process): the gated ResConv
step ``h·tanh(g/h)`` keeps fusion and removal exact, the smoothness penalty, class-mean
storage, config parsing, the adaptive controller, and every converged-equivalence check of
tests/ode_checks.py on two simulated ranks (threads; torchrun at 2 and 4 processes:
tests/test_parallel_dist.py)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import resprune as rp
from ode_checks import IN, N_CHECKS, batches, gated_chain, run_checks, sgd
from resprune.parallel import MGRITConfig, create_engine
from resprune.parallel.rebalance import ClassMeanStore, load_imbalance
from resprune.sparsity import LayerSmoothness
from test_parallel_mgrit import run_threads


@pytest.mark.parametrize("gate", ["tanh", "clamp"])
def test_gate_is_bounded_and_zero_gate_is_exact(gate):
    m = rp.create_model("resconv_chain", depth=8, width=4, horizon=1.0, gate=gate)
    h = 1.0 / 8
    with torch.no_grad():
        for i, b in enumerate(m.blocks):
            b.scale.fill_(5.0 if i % 2 else 0.0)  # large gates (40 h): still |s| <= h
            b.bn.running_mean.uniform_(-0.5, 0.5)
            b.bn.running_var.uniform_(0.5, 2.0)
    assert all(abs(float(b.effective_scale.detach())) <= h + 1e-7 for b in m.blocks)
    assert "gate=" in repr(m.blocks[0])
    m.eval()
    x = torch.rand(2, 3, 8, 8)
    ref = m(x)
    fused = rp.fuse(m)  # the fused conv uses h·gate(g)
    assert torch.allclose(fused(x), ref, rtol=1e-5, atol=1e-6)
    rep = rp.prune_(m, rp.PruneConfig(threshold=1e-6, input_size=(1, 3, 8, 8)))
    assert len(rep.removed) == 4
    assert torch.equal(m(x), ref)  # zero gate: exact identity, removal changes nothing


def test_gate_survives_save_and_load(tmp_path):
    m = rp.create_model("resconv_chain", depth=4, width=4, gate="tanh", horizon=2.0).eval()
    rp.save(m, tmp_path / "m.pt")
    m2 = rp.load(tmp_path / "m.pt").eval()
    assert m2.blocks[0].gate == "tanh" and m2.blocks[0].step == 0.5 and float(m2.blocks[0].scale.detach()) == 0.5
    x = torch.rand(2, 3, 8, 8)
    assert torch.equal(m2(x), m(x))


def test_gate_validation():
    with pytest.raises(ValueError):
        rp.ResConv2d(4, 4).set_gate(0.1, "sigmoid")
    with pytest.raises(ValueError):
        rp.ResConv2d(4, 4).set_gate(0.0)


def test_smoothness_value_and_neighbours():
    m = gated_chain(5).float()
    sm = LayerSmoothness(0.5)
    blocks = list(m.blocks)
    want = 0.5 * sum(sum((p - q).pow(2).sum() for p, q in zip(b.parameters(), a.parameters()))
                     for a, b in zip(blocks, blocks[1:]))
    assert torch.allclose(sm(m), want)  # stem and head pair with nothing
    # split in two: the halves' values add up; the "after" term adds gradient, no value
    part1, part2 = torch.nn.ModuleList(blocks[:2]), torch.nn.ModuleList(blocks[2:])
    after = [p.detach() for p in blocks[2].parameters()]
    before = [p.detach() for p in blocks[1].parameters()]
    v = sm(part1, after=after) + sm(part2, before=before)
    assert torch.allclose(v, want)
    assert LayerSmoothness(0.0)(m) == 0


def test_class_mean_store():
    st = ClassMeanStore()
    y = torch.tensor([0, 1, 1])
    assert st.guess(y) == (None, None)
    st.update(y, {3: torch.tensor([[1.0], [2.0], [4.0]])}, {5: torch.ones(3, 1)})
    u, lam = st.guess(torch.tensor([1, 0]))
    assert u[3].tolist() == [[3.0], [1.0]] and lam[5].shape == (2, 1)
    assert st.guess(torch.tensor([2])) == (None, None)  # class 2 never seen
    st.update(torch.tensor([2]), {3: torch.tensor([[7.0]])}, {5: torch.zeros(1, 1)})
    assert st.guess(torch.tensor([2, 1]))[0][3].tolist() == [[7.0], [3.0]]
    assert st.numel() == 6


def test_config_options():
    c = MGRITConfig(relax=["F", "FCF"], levels=3, mode="adaptive", warm_start="class_mean")
    assert c.relax == "F,FCF" and c.fwd_iters == 4 and MGRITConfig(**c.to_dict()) == c
    for bad in (dict(relax="F,C"), dict(warm_start="yes"), dict(min_iters=0), dict(mode="auto")):
        with pytest.raises(ValueError):
            MGRITConfig(**bad)
    assert load_imbalance([1.0, 1.0]) == 0.0 and load_imbalance([3.0, 1.0]) == pytest.approx(0.5)


def test_adaptive_mode_moves_the_cycle_count():
    base = gated_chain(12)
    data = batches(4)

    def fn(r, comm):
        e = create_engine("mgrit", copy.deepcopy(base), F.cross_entropy, sgd,
                          MGRITConfig(mode="adaptive", cf=2, fwd_iters=3, bwd_iters=3, tol=0.5, input_size=IN),
                          comm=comm)
        its = []
        for x, y in data:
            e.step(x, y)
            its.append((e.stats["fwd_iters"], e._iters[0]))
        return its

    its = run_threads(2, fn)
    assert its[0] == its[1]
    assert its[0][0][0] == 3 and its[0][-1][1] < 3, its  # starts at the cap, drops on a low defect


def test_converged_equivalence_two_threads():
    base, data = gated_chain(), batches(3)

    def fn(r, comm):
        out = []
        run_checks(comm, lambda name, ok, detail: out.append((name, ok, detail)), base, data)
        return out

    for out in run_threads(2, fn):
        assert len(out) == N_CHECKS
        assert all(ok for _, ok, _ in out), [o for o in out if not o[1]]


def test_serial_trainer_adds_smoothness():
    from resprune.config import TrainConfig
    from resprune.data import DeviceLoader, load_arrays
    from resprune.train import Trainer

    tr, te = load_arrays("digits")
    train = DeviceLoader(tr, 32, train=True, seed=0)
    x, y = next(iter(train))

    def first_step(smooth: float):
        torch.manual_seed(0)
        m = rp.create_model("resconv_chain", depth=4, width=4, in_chans=1, gate="tanh")
        value = float(LayerSmoothness(1.0)(m).detach())
        t = Trainer(m, train, train, TrainConfig(epochs=1, lr=0.1, device="cpu", smooth=smooth), None, "sparse",
                    log=lambda s: None)
        return float(t._step(x, y)[0]), value

    (l0, v), (l1, _) = first_step(0.0), first_step(0.5)
    assert v > 0 and l1 - l0 == pytest.approx(0.5 * v, rel=1e-4)
