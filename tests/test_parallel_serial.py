"""The serial engine, the reference every parallel engine is compared with, is itself
exactly a plain PyTorch training step (parameters, BN buffers, eval outputs: bitwise)."""

import copy

import torch
import torch.nn.functional as F

import resprune as rp
from resprune.parallel import create_engine


def test_serial_engine_equals_plain_pytorch():
    torch.manual_seed(0)
    a = rp.create_model("plainres20", in_chans=1)
    b = copy.deepcopy(a)
    eng = create_engine("serial", a, F.cross_entropy,
                        lambda named: torch.optim.SGD([p for _, p in named], lr=0.1, momentum=0.9))
    opt = torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.9)
    for _ in range(3):
        x, y = torch.randn(16, 1, 16, 16), torch.randint(0, 10, (16,))
        eng.train()
        la = eng.step(x, y)
        b.train()
        opt.zero_grad()
        lb = F.cross_entropy(b(x), y)
        lb.backward()
        opt.step()
        assert la == float(lb.detach())
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)  # BN running stats included
    x = torch.randn(8, 1, 16, 16)
    eng.eval()
    b.eval()
    with torch.no_grad():
        assert torch.equal(eng.eval_forward(x), b(x))


def test_recalibrate_bn_serial_and_mgrit():
    """recalibrate_bn re-estimates BN statistics from exact forward passes (cumulative
    average), leaves parameters and momenta alone; single-rank mgrit equals serial."""
    from resprune.parallel import MGRITConfig

    torch.manual_seed(0)
    base = rp.create_model("resnet20")
    batches = [torch.randn(8, 3, 16, 16) for _ in range(3)]
    ref = copy.deepcopy(base)
    for m in ref.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    ref.train()
    with torch.no_grad():
        for x in batches:
            ref(x)
    sgd = lambda named: torch.optim.SGD([p for _, p in named], lr=0.1)  # noqa: E731
    ser = create_engine("serial", copy.deepcopy(base), F.cross_entropy, sgd)
    mg = create_engine("mgrit", copy.deepcopy(base), F.cross_entropy, sgd,
                       MGRITConfig(cf=2, input_size=(1, 3, 16, 16)))
    assert ser.exact_bn_stats and not mg.exact_bn_stats
    for eng in (ser, mg):
        eng.train()
        eng.recalibrate_bn(iter(batches))
        sd, rd = eng.full_state_dict(), ref.state_dict()
        for k in rd:
            assert torch.allclose(sd[k].double(), rd[k].double(), rtol=1e-5, atol=1e-6), k
        assert all(m.momentum == 0.1 for m in eng.model.modules() if isinstance(m, torch.nn.BatchNorm2d))
        assert eng.model.training  # modes restored
