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
        assert la == float(lb)
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)  # BN running stats included
    x = torch.randn(8, 1, 16, 16)
    eng.eval()
    b.eval()
    with torch.no_grad():
        assert torch.equal(eng.eval_forward(x), b(x))
