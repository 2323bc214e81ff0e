"""export/eval_onnx.py: an exported model plus its sidecar classify raw images without torch.

The model is a randomly initialised ResConv ResNet-20 on the built-in digits (its accuracy is
whatever it is: the test compares two ways of computing it, torch on the loader's tensors
and onnxruntime on PNG files preprocessed from the sidecar alone, and they must agree
exactly, since PNG is lossless and the float32 logits agree to ~1e-6).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import resprune as rp
from helpers import randomize_
from resprune.config import load_recipe
from resprune.data import DeviceLoader, load_arrays
from resprune.onnx import export_onnx
from resprune.train.loop import evaluate
from resprune.train.pipeline import deploy_info

TOOL = Path(__file__).resolve().parents[1] / "export" / "eval_onnx.py"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    d = tmp_path_factory.mktemp("evalonnx")
    tr, te = load_arrays("digits")
    n = 300
    train = DeviceLoader(tr, 64, train=True)
    test = DeviceLoader(type(te)(te.images[:n], te.labels[:n], te.classes), 100,
                        mean=tuple(train.mean.flatten().tolist()), std=tuple(train.std.flatten().tolist()))
    torch.manual_seed(0)
    model = randomize_(rp.create_model("resnet20", num_classes=10, in_chans=1), seed=3).eval()
    _, acc = evaluate(model, test)
    recipe = load_recipe("quickstart")
    meta = {**deploy_info(recipe, test), "test_accuracy": acc}
    export_onnx(rp.fuse(model), d / "m.onnx", (1, 1, 16, 16), metadata=meta, rtol=1e-6)
    from PIL import Image

    for i, (img, y) in enumerate(zip(te.images[:n], te.labels[:n])):
        cdir = d / "test" / te.classes[int(y)]
        cdir.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img[..., 0]).save(cdir / f"{i:04d}.png")
    return d, acc


def run(*args):
    return subprocess.run([sys.executable, str(TOOL), *map(str, args)], capture_output=True, text=True, timeout=120)


def test_sidecar_carries_what_a_runtime_needs(exported):
    d, acc = exported
    side = json.loads((d / "m.json").read_text())
    assert side["preprocess"]["color"] == "L" and side["preprocess"]["layout"] == "NCHW"
    assert side["preprocess"]["scale"] == pytest.approx(1 / 255)
    assert side["classes"] == [str(i) for i in range(10)]
    assert side["test_accuracy"] == acc and side["dataset"]["name"] == "digits"


def test_torch_free_accuracy_equals_the_sidecar(exported, tmp_path):
    d, acc = exported
    p = run(d / "m.onnx", d / "test", "--tol", "0", "--json", tmp_path / "r.json")
    assert p.returncode == 0, p.stdout + p.stderr
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["images"] == 300 and r["accuracy"] == pytest.approx(acc, abs=1e-9)
    imported = {a.name.split(".")[0] for n in ast.walk(ast.parse(TOOL.read_text()))
                if isinstance(n, (ast.Import, ast.ImportFrom)) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(ast.parse(TOOL.read_text()))
                 if isinstance(n, ast.ImportFrom) and n.module}
    assert not imported & {"torch", "resprune", "torchvision"}, imported
    # the tool accepts the parent of test/ too
    assert run(d / "m.onnx", d, "--tol", "0").returncode == 0


def test_bad_inputs_are_named(exported, tmp_path):
    d, _ = exported
    p = run(tmp_path / "none.onnx", d / "test")
    assert p.returncode == 2 and "no such ONNX file" in p.stderr
    bad = tmp_path / "test" / "zebra"
    bad.mkdir(parents=True)
    p = run(d / "m.onnx", tmp_path / "test")
    assert p.returncode == 2 and "zebra" in p.stderr
    # a sidecar without preprocess
    (tmp_path / "m.onnx").write_bytes((d / "m.onnx").read_bytes())
    side = json.loads((d / "m.json").read_text())
    del side["preprocess"]
    (tmp_path / "m.json").write_text(json.dumps(side))
    p = run(tmp_path / "m.onnx", d / "test")
    assert p.returncode == 2 and "preprocess" in p.stderr
    # a swapped ONNX file
    side = json.loads((d / "m.json").read_text())
    (tmp_path / "m.json").write_text(json.dumps(side))
    (tmp_path / "m.onnx").write_bytes((d / "m.onnx").read_bytes() + b"\0")
    p = run(tmp_path / "m.onnx", d / "test")
    assert p.returncode == 2 and "sha256" in p.stderr


def test_accuracy_mismatch_exits_1(exported, tmp_path):
    d, acc = exported
    for f in ("m.onnx",):
        (tmp_path / f).write_bytes((d / f).read_bytes())
    side = json.loads((d / "m.json").read_text())
    side["test_accuracy"] = acc + 1.0
    (tmp_path / "m.json").write_text(json.dumps(side))
    p = run(tmp_path / "m.onnx", d / "test")
    assert p.returncode == 1 and "OUTSIDE" in p.stdout


def test_metadata_cannot_overwrite_sidecar_fields(tmp_path):
    model = rp.fuse(rp.create_model("resnet20", num_classes=10).eval())
    with pytest.raises(ValueError, match="onnx_sha256"):
        export_onnx(model, tmp_path / "x.onnx", metadata={"onnx_sha256": "0"})
    assert not (tmp_path / "x.onnx").exists()
