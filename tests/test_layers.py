"""ResConv2d: shapes, shortcut, fusion exactness (float32 ≤ 1e-5, float64 ≤ 1e-10 relative),
including Conv → BatchNorm2d pairs folded by ``fuse`` outside any ResConv2d."""

import pytest
import torch
from torch import nn

import resprune as rp
from helpers import randomize_, rel_err

CASES = [  # (c_in, c_out, k, stride)
    (16, 16, 3, 1), (16, 32, 3, 2), (32, 16, 3, 1), (8, 8, 1, 1), (8, 12, 1, 2),
    (3, 16, 3, 1), (16, 16, 3, 2), (5, 9, 5, 2),
]


@pytest.mark.parametrize("c_in,c_out,k,stride", CASES)
@pytest.mark.parametrize("act,shortcut,bias", [(True, True, False), (False, True, True), (False, False, False)])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
def test_resconv_fuses_exactly(c_in, c_out, k, stride, act, shortcut, bias, dtype, tol):
    torch.manual_seed(0)
    m = randomize_(rp.ResConv2d(c_in, c_out, k, stride, act=act, shortcut=shortcut, bias=bias)).to(dtype).eval()
    x = torch.rand(3, c_in, 11, 10, dtype=dtype)  # odd sizes exercise strided alignment
    y = m(x)
    conv = m.fused_conv()
    assert isinstance(conv, nn.Conv2d)
    z = conv(x)
    z = torch.relu(z) if act else z
    assert y.shape == z.shape
    assert rel_err(z, y) <= tol
    deploy = m.fuse()  # the drop-in replacement rp.fuse puts in the layer's place
    assert isinstance(deploy, nn.Sequential if act else nn.Conv2d)
    assert not any(isinstance(t, (nn.BatchNorm2d, rp.ResConv2d)) for t in deploy.modules())
    assert rel_err(deploy(x), y) <= tol


def test_option_a_shortcut_at_zero_scale():
    m = rp.ResConv2d(16, 32, 3, 2, act=False).eval()
    with torch.no_grad():
        m.scale.zero_()
    x = torch.rand(2, 16, 8, 8)
    y = m(x)
    assert torch.equal(y[:, 8:24], x[:, :, ::2, ::2])
    assert torch.count_nonzero(y[:, :8]) == 0 and torch.count_nonzero(y[:, 24:]) == 0


def test_identity_resconv_is_identity_at_zero_scale():
    m = rp.ResConv2d(8, 8).eval()
    with torch.no_grad():
        m.scale.zero_()
    x = torch.rand(2, 8, 6, 6)  # x ≥ 0 (post-ReLU)
    assert torch.equal(m(x), x)


def test_removable_property():
    assert rp.ResConv2d(8, 8).removable
    assert not rp.ResConv2d(8, 16).removable
    assert not rp.ResConv2d(8, 8, stride=2).removable
    assert rp.ResConv2d(8, 16, shortcut=False).removable  # a branch gate


def test_equivalent_kernel_bias_is_differentiable():
    m = randomize_(rp.ResConv2d(4, 4)).eval()
    w, b = m.equivalent_kernel_bias()
    (w.sum() + b.sum()).backward()
    for p in (m.scale, m.conv.weight, m.bn.weight, m.bn.bias):
        assert p.grad is not None and torch.isfinite(p.grad).all()
    assert m.scale.grad != 0


@pytest.mark.parametrize("bad", [dict(kernel_size=2), dict(kernel_size=0), dict(stride=0)])
def test_bad_arguments(bad):
    with pytest.raises(ValueError):
        rp.ResConv2d(4, 4, **bad)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
def test_leftover_conv_bn_pairs_fold_exactly(bias, dtype, tol):
    """Conv → BN pairs that were never converted (random BN statistics) are folded into one
    conv each; the fused conv's parameters stay trainable, the bias included."""
    torch.manual_seed(0)
    m = randomize_(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=bias), nn.BatchNorm2d(8), nn.ReLU(),
                                 nn.Conv2d(8, 6, 1, stride=2, bias=bias), nn.BatchNorm2d(6)), seed=4).to(dtype).eval()
    x = torch.randn(2, 3, 9, 10, dtype=dtype)
    d = rp.fuse(m)
    assert not any(isinstance(t, nn.BatchNorm2d) for t in d.modules())
    assert sum(isinstance(t, nn.Conv2d) for t in d.modules()) == 2
    assert all(p.requires_grad and p.dtype == dtype for p in d.parameters())
    assert rel_err(d(x), m(x)) <= tol
