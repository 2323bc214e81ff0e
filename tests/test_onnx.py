"""ONNX export: onnxruntime equivalence, graph op types, corrupt and mismatching files.

Tolerances: the export check and these tests require max |onnxruntime − torch| <= 1e-4 on
the logits (fp32) and the same top-1 class; random BN statistics (``randomize_``) make the
fusion non-trivial.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

import resprune as rp
from helpers import randomize_
from resprune.onnx import OnnxVerificationError, export_onnx, sidecar_path, verify_onnx

ATOL = 1e-4
# A fused CIFAR ResNet: Conv (BN and ResConv shortcuts folded in), Relu, Add (block
# shortcuts), ReduceMean (global average pool), Reshape (flatten), Gemm; each option-A block
# shortcut is exported as MaxPool(kernel 1, stride 2) + Pad (zero channels), see resprune/onnx.py.
CIFAR_OPS = {"Conv", "Relu", "Add", "ReduceMean", "GlobalAveragePool", "Reshape", "Flatten", "Gemm",
             "MaxPool", "Pad"}


def ort_run(path, x: np.ndarray) -> np.ndarray:
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return s.run(None, {s.get_inputs()[0].name: x})[0]


def assert_equivalent(path, model, shape, batches=(1, 7), seed=0):
    g = torch.Generator().manual_seed(seed)
    model.eval()
    for b in batches:
        x = torch.randn((b, *shape), generator=g)
        with torch.no_grad():
            ref = model(x).numpy()
        got = ort_run(path, x.numpy())
        assert got.shape == ref.shape
        assert np.abs(got - ref).max() <= ATOL
        assert (got.argmax(1) == ref.argmax(1)).all()


@pytest.fixture(scope="module")
def r20(tmp_path_factory):
    """A pruned (two whole branches incl. a transition block, one first conv), fused resnet20."""
    torch.manual_seed(0)
    m = randomize_(rp.create_model("resnet20"), seed=11).eval()
    with torch.no_grad():
        for _, rc in rp.sparsity.removable_scales(m):
            rc.scale.copy_(rc.scale.abs().clamp(min=0.1))
        for n in ("layer2.0.conv2", "layer3.2.conv2", "layer1.1.conv1"):
            m.get_submodule(n).scale.zero_()
    rp.prune_(m, rp.PruneConfig(threshold=1e-2))
    fused = rp.fuse(m)
    d = tmp_path_factory.mktemp("onnx")
    src = d / "fused.pt"
    rp.save(fused, src)
    info = export_onnx(fused, d / "r20.onnx", (1, 3, 32, 32), source=src)
    return fused, d / "r20.onnx", info


def test_pruned_fused_resnet20_matches_onnxruntime(r20):
    fused, path, info = r20
    assert_equivalent(path, fused, (3, 32, 32))
    assert info["check"]["max_abs_diff"] <= ATOL and info["check"]["batch_sizes"] == [1, 5]
    assert (info["check"]["atol"], info["check"]["rtol"]) == (1e-4, 1e-6)  # the defaults
    assert (rp.onnx.DEFAULT_ATOL, rp.onnx.DEFAULT_RTOL) == (1e-4, 1e-6)
    assert info["macs_per_sample"] == rp.profile(fused).macs
    assert info["params"] == sum(p.numel() for p in fused.parameters())
    assert info["input_shape"] == ["batch", 3, 32, 32] and info["opset"] >= 18
    assert {"torch", "onnx", "onnxruntime"} <= set(info["versions"])
    assert info["source"]["sha256"] == rp.onnx.sha256_file(path.parent / "fused.pt")
    assert json.loads(sidecar_path(path).read_text()) == info


def test_single_self_contained_file(r20):
    _, path, _ = r20
    assert sorted(p.name for p in path.parent.iterdir()) == ["fused.pt", "r20.json", "r20.onnx"]
    proto = onnx.load(str(path), load_external_data=False)
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)


def test_fused_cifar_resnet_graph_ops(r20):
    fused, path, info = r20
    ops = Counter(n.op_type for n in onnx.load(str(path)).graph.node)
    assert set(ops) <= CIFAR_OPS, f"unexpected ops {set(ops) - CIFAR_OPS}"
    assert "BatchNormalization" not in ops
    n_convs = sum(isinstance(m, nn.Conv2d) for m in fused.modules())
    assert ops["Conv"] == n_convs  # every ResConv shortcut folded into its Conv, no extra ops
    # option-A block shortcuts: layer2.0 (branch pruned, block = shortcut) and layer3.0
    n_opt_a = sum(isinstance(m, rp.OptionAShortcut) for m in fused.modules())
    assert n_opt_a == 2 and ops["MaxPool"] == n_opt_a and ops["Pad"] == n_opt_a
    assert ops["Add"] == 9 - 2 and ops["Gemm"] == 1  # 9 blocks, 2 branches removed
    assert dict(ops) == info["op_types"]


def test_converted_torchvision_resnet18(tmp_path):
    """Converted (ResConv), unfused, in train mode: exported from a fused eval copy."""
    m = randomize_(rp.convert_(rp.create_model("tv_resnet18")), seed=5).train()
    n_resconv = sum(isinstance(x, rp.ResConv2d) for x in m.modules())
    info = export_onnx(m, tmp_path / "tv.onnx", (1, 3, 32, 32))
    assert m.training and sum(isinstance(x, rp.ResConv2d) for x in m.modules()) == n_resconv  # untouched
    assert info["check"]["max_abs_diff"] <= ATOL and info["check"]["max_abs_logit"] > 1.0
    assert "BatchNormalization" not in info["op_types"] and info["op_types"]["Conv"] == 20
    assert_equivalent(tmp_path / "tv.onnx", m, (3, 32, 32), batches=(1, 3))


def test_export_refuses_a_graph_that_disagrees(tmp_path, monkeypatch):
    """A wrong deploy copy (one weight perturbed) fails the check and leaves no file behind."""
    import resprune.onnx as ro

    real = ro._deploy_copy

    def broken(model):
        d = real(model)
        with torch.no_grad():
            next(x for x in d.modules() if isinstance(x, nn.Conv2d)).weight.mul_(1.05)
        return d

    monkeypatch.setattr(ro, "_deploy_copy", broken)
    m = randomize_(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5)), seed=2).eval()
    with pytest.raises(OnnxVerificationError, match="disagrees"):
        export_onnx(m, tmp_path / "bad.onnx", (2, 3, 16, 16), dynamic_batch=False)
    assert list(tmp_path.iterdir()) == []


def test_verify_accepts_good_file(r20):
    fused, path, _ = r20
    res = verify_onnx(path, fused)
    assert res["functional"] and res["sidecar"]["fingerprint_max_abs_diff"] <= ATOL
    assert res["model_check"]["max_abs_diff"] <= ATOL


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_file_is_rejected(r20, tmp_path, damage):
    _, path, _ = r20
    data = path.read_bytes()
    bad = tmp_path / "bad.onnx"
    bad.write_bytes({"truncate": data[: len(data) // 2], "garbage": bytes(range(256)) * 64,
                     "empty": b""}[damage])
    with pytest.raises(OnnxVerificationError, match="not a readable ONNX|invalid ONNX|cannot load"):
        verify_onnx(bad)


def _altered_copy(path, tmp_path, factor=1.01):
    """Copy of the ONNX file with the first conv weight scaled (a valid graph, wrong weights)."""
    proto = onnx.load(str(path))
    w = next(t for t in proto.graph.initializer if len(t.dims) == 4)
    arr = onnx.numpy_helper.to_array(w) * np.float32(factor)
    w.CopyFrom(onnx.numpy_helper.from_array(arr, w.name))
    out = tmp_path / "altered.onnx"
    onnx.save(proto, str(out))
    onnx.checker.check_model(str(out))  # still a valid model
    return out


def test_mismatching_weights_are_detected(r20, tmp_path):
    fused, path, _ = r20
    bad = _altered_copy(path, tmp_path)
    shutil.copy(sidecar_path(path), sidecar_path(bad))
    # 1. the sidecar's hash no longer matches
    with pytest.raises(OnnxVerificationError, match="sha256 .* differs"):
        verify_onnx(bad)
    # 2. a sidecar re-hashed by hand: the recorded fingerprint logits still catch it
    side = json.loads(sidecar_path(bad).read_text())
    side["onnx_sha256"] = rp.onnx.sha256_file(bad)
    sidecar_path(bad).write_text(json.dumps(side))
    with pytest.raises(OnnxVerificationError, match="fingerprint"):
        verify_onnx(bad)
    # 3. no sidecar: against the model it claims to be
    sidecar_path(bad).unlink()
    with pytest.raises(OnnxVerificationError, match="disagrees"):
        verify_onnx(bad, fused)
    # without sidecar or model only the structure can be checked, and the result says so
    assert verify_onnx(bad)["functional"] is False


def test_option_a_export_module_is_exact():
    from resprune.onnx import _OptionAExport

    x = torch.randn(3, 16, 9, 9)
    for cin, cout, s in ((16, 32, 2), (16, 16, 2), (16, 8, 1), (16, 32, 3)):
        ref = rp.OptionAShortcut(cin, cout, s)(x)
        assert torch.equal(_OptionAExport(cin, cout, s)(x), ref)
