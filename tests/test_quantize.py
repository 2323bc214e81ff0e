"""The quantize stage (resprune.quantize, resprune.stages.quantize, `resprune quantize`): INT8
models of a small run directory built here, their sidecars and checks, export/eval_onnx.py on
them, bench and report with fp32 and INT8 side by side, and bad input refused with one line
(exit status 2) before anything is written.

The run directory holds a ResConv ResNet-20 trained for 3 epochs on the built-in digits (so
that the INT8 model has predictions worth agreeing with) and a pruned copy of it; calibration
uses 64 training images.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import resprune as rp
from resprune.cli import main
from resprune.config import ExportConfig, QuantizeConfig, RecipeError, load_recipe, recipe_from_dict
from resprune.data import DeviceLoader, load_arrays
from resprune.onnx import sha256_file, verify_onnx
from resprune.quantize import QuantizeError, calibration_subset, int8_path, quantize_onnx
from resprune.stages import stage_bench, stage_export, stage_report
from resprune.train.loop import evaluate
from resprune.train.pipeline import deploy_info

ROOT = Path(__file__).resolve().parents[1]
EVAL = ROOT / "export" / "eval_onnx.py"
FAST = ["--set", "quantize.images=64", "--set", "quantize.min_agreement=0.95"]  # a small net: low margins


def _train(model, loader, epochs: int = 3):
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny batches: a second thread only spins (10x the CPU time on a busy machine)
    try:
        for _ in range(epochs):
            for x, y in loader:
                opt.zero_grad()
                F.cross_entropy(model(x), y).backward()
                opt.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """recipe.json (digits), fused_unpruned.pt and fused.pt with their deploy metadata, exported;
    prune.json and metrics.json for the report."""
    d = tmp_path_factory.mktemp("q") / "run"
    d.mkdir()
    tr, te = load_arrays("digits")
    train = DeviceLoader(tr, 64, train=True)
    test = DeviceLoader(te, 512, mean=train.mean_std[0], std=train.mean_std[1])
    torch.manual_seed(0)
    model = _train(rp.create_model("resnet20", num_classes=10, in_chans=1), train)
    recipe = load_recipe("quickstart")
    (d / "recipe.json").write_text(recipe.to_json())
    size = [1, 1, 16, 16]
    accs = [evaluate(model, test)[1]]
    rp.save(rp.fuse(model), d / "fused_unpruned.pt",
            extra={"input_size": size, "deploy": {**deploy_info(recipe, test), "test_accuracy": accs[0]}})
    with torch.no_grad():
        for name in ("layer1.1.conv1", "layer2.2.conv1"):
            model.get_submodule(name).scale.zero_()
    rep = rp.prune_(model, rp.PruneConfig(threshold=1e-2, input_size=tuple(size)))
    accs.append(evaluate(model, test)[1])
    rp.save(rp.fuse(model), d / "fused.pt",
            extra={"input_size": size, "deploy": {**deploy_info(recipe, test), "test_accuracy": accs[1]}})
    (d / "prune.json").write_text(json.dumps(rep.to_dict()))
    (d / "metrics.json").write_text(json.dumps({"stages": {
        "sparse": {"test_acc": accs[0], "macs": rep.macs_before, "params": rep.params_before},
        "pruned": {"test_acc": accs[1], "macs": rep.macs_after, "params": rep.params_after}}}))
    stage_export(d)
    return d


@pytest.fixture(scope="module")
def quantized(run_dir):
    assert main(["-q", "quantize", str(run_dir), *FAST]) == 0
    return run_dir


def _copy(run_dir, tmp_path) -> Path:
    d = tmp_path / "run"
    shutil.copytree(run_dir, d, ignore=shutil.ignore_patterns("int8", "bench.json", "report*", "plots"))
    prov = json.loads((d / "provenance.json").read_text())
    prov["stages"] = {k: v for k, v in prov["stages"].items() if k == "export"}
    (d / "provenance.json").write_text(json.dumps(prov))
    return d


def test_stage_writes_checked_int8_models_with_sidecars(quantized):
    d = quantized
    for key in ("unpruned", "pruned"):
        fp32, q = d / "onnx" / f"{key}.onnx", d / "int8" / f"{key}.int8.onnx"
        side = json.loads(q.with_suffix(".json").read_text())
        assert side["precision"] == "int8" and side["onnx_sha256"] == sha256_file(q)
        assert side["source"] == {"path": str(fp32), "sha256": sha256_file(fp32), "onnx_bytes": fp32.stat().st_size,
                                  "test_accuracy": json.loads(fp32.with_suffix(".json").read_text())["test_accuracy"]}
        quant = side["quantization"]
        assert quant["format"] == "QDQ" and quant["per_channel"] and quant["method"] == QuantizeConfig().method
        assert quant["activations"] == QuantizeConfig().activations and quant["fp32_nodes"] == []
        assert quant["calibration"] | {"images": 64, "split": "train", "dataset": "digits"} == quant["calibration"]
        c = side["check"]
        assert c["images"] == c["split_images"] == 360 and c["top1_agreement"] >= c["min_agreement"] == 0.95
        assert side["test_accuracy"] == c["int8_accuracy"]  # the whole test split: eval_onnx.py reproduces it
        assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= set(side["op_types"])
        assert side["onnx_bytes"] < 0.5 * fp32.stat().st_size  # int8 weights
        for k in ("input_shape", "preprocess", "classes", "macs_per_sample", "dynamic_batch"):
            assert side[k] == json.loads(fp32.with_suffix(".json").read_text())[k]
        assert verify_onnx(q)["functional"]  # sha256 and fingerprint, like an fp32 file
        fp = json.loads(fp32.with_suffix(".json").read_text())["fingerprint"]["logits"]
        assert not np.array_equal(side["fingerprint"]["logits"], fp)  # INT8 rounds: agreement, not bit equality
    rec = json.loads((d / "provenance.json").read_text())["stages"]["quantize"]
    assert rec["state"] == "done" and rec["config"]["images"] == 64
    assert set(rec["inputs"]) == {"onnx/unpruned.onnx", "onnx/pruned.onnx"}
    assert json.loads((d / "recipe.json").read_text())["quantize"]["images"] == 64  # the --set is recorded


def test_eval_onnx_reads_the_int8_model_unchanged(quantized, tmp_path):
    from PIL import Image

    _, te = load_arrays("digits")
    for i, (img, y) in enumerate(zip(te.images, te.labels)):
        (tmp_path / "test" / te.classes[int(y)]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(img[..., 0]).save(tmp_path / "test" / te.classes[int(y)] / f"{i:04d}.png")
    r = subprocess.run([sys.executable, str(EVAL), str(quantized / "int8" / "pruned.int8.onnx"), str(tmp_path),
                        "--tol", "0.005"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    side = json.loads((quantized / "int8" / "pruned.int8.json").read_text())
    assert f"top-1 {side['test_accuracy']:.2f}% (" in r.stdout and "(within ±0.005)" in r.stdout


def test_bench_and_report_show_int8_beside_fp32(quantized):
    d = quantized
    stage_bench(d, ExportConfig(bench_batches=(1, 4), bench_runs=3, bench_warmup=1, bench_threads=1),
                memory=False, quiet=True)
    bench = json.loads((d / "bench.json").read_text())
    assert [m["name"] for m in bench["models"]] == ["unpruned", "pruned", "unpruned_int8", "pruned_int8"]
    rep = stage_report([d], d)["runs"][0]
    prec = {r["model"]: r for r in rep["precision"]}
    assert prec["pruned_int8"]["precision"] == "int8" and prec["pruned"]["precision"] == "fp32"
    assert set(prec["pruned_int8"]["latency"]) == {"1", "4"} and prec["pruned_int8"]["bytes"] < prec["pruned"]["bytes"]
    md = (d / "report.md").read_text()
    assert "| pruned_int8 | int8 |" in md and "× unpruned fp32" in md


def test_agreement_threshold_refuses_a_badly_calibrated_model(run_dir, tmp_path):
    """Calibrated on blank images the activation ranges are far too narrow: the INT8 model
    disagrees with fp32 and is refused; nothing is written."""
    tr, te = load_arrays("digits")
    dst = tmp_path / "m.int8.onnx"
    with pytest.raises(QuantizeError, match="agree on the top-1 class of only"):
        quantize_onnx(run_dir / "onnx" / "pruned.onnx", dst, np.zeros_like(tr.images[:32]), te.images, te.labels)
    assert not list(tmp_path.iterdir())
    info = quantize_onnx(run_dir / "onnx" / "pruned.onnx", dst, tr.images[calibration_subset(len(tr.labels), 32)],
                         te.images[:100], min_agreement=0.5, keep_fp32=("first", "last"))
    assert len(info["quantization"]["fp32_nodes"]) == 2 and info["check"]["images"] == 100
    assert "test_accuracy" not in info and int8_path("a/pruned.onnx") == Path("a/pruned.int8.onnx")


def _png_tree(root: Path, size: int, images: bool = True) -> Path:
    from PIL import Image

    for split in ("train", "test"):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
            if images:
                for i in range(3):
                    Image.fromarray(np.full((size, size, 3), 40 * i, np.uint8)).save(root / split / c / f"{i}.png")
    return root


def _opset_11(d: Path) -> None:
    import onnx

    p = d / "onnx" / "pruned.onnx"
    proto = onnx.load(str(p))
    next(o for o in proto.opset_import if o.domain in ("", "ai.onnx")).version = 11
    onnx.save(proto, str(p))
    side = json.loads(p.with_suffix(".json").read_text())
    (p.with_suffix(".json")).write_text(json.dumps({**side, "onnx_sha256": sha256_file(p)}))


BAD = {
    "no data folder": (lambda d, t: ["--set", "data.dataset=cifar10", "--data-dir", str(t / "nowhere")],
                       "does not exist"),
    "no calibration images": (lambda d, t: ["--set", "data.dataset=imagefolder", "--data-dir",
                                            str(_png_tree(t / "empty", 16, images=False))], "no images in"),
    "no calibration count": (lambda d, t: ["--set", "quantize.images=0"], "quantize.images must be an int >= 1"),
    "wrong image size": (lambda d, t: ["--set", "data.dataset=imagefolder", "--data-dir", str(_png_tree(t / "i8", 8))],
                         "calibration images are 8x8 with 3 channel(s), but the model takes 16x16 with 1"),
    "sidecar missing": (lambda d, t: (d / "onnx" / "pruned.json").unlink() or [], "its sidecar pruned.json is missing"),
    "hash mismatch": (lambda d, t: (d / "onnx" / "pruned.json").write_text(json.dumps(
        {**json.loads((d / "onnx" / "pruned.json").read_text()), "onnx_sha256": "0" * 64})) and [],
        "differs from the one recorded at export in pruned.json"),
    "opset refused": (lambda d, t: _opset_11(d) or [], "opset 11: the INT8 quantizer takes opset 13"),
    "unknown fp32 node": (lambda d, t: ["--set", 'quantize.keep_fp32=["no_such_node"]'],
                          "'no_such_node' is neither first, last nor a node"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_and_writes_nothing(run_dir, tmp_path, capsys, monkeypatch, case):
    monkeypatch.setenv("RESPRUNE_CACHE", str(tmp_path / "cache"))  # decoded ImageFolder trees go here
    d = _copy(run_dir, tmp_path)
    make, match = BAD[case]
    argv = make(d, tmp_path)
    before = {p: p.read_bytes() for p in d.rglob("*") if p.is_file()}
    assert main(["quantize", str(d), *argv]) == 2
    err = capsys.readouterr().err
    assert match in err and err.count("\n") == 1, err  # one line, no traceback
    after = {p: p.read_bytes() for p in d.rglob("*") if p.is_file()}
    assert after == before  # nothing written (provenance, recipe.json and the fp32 files included)
    assert not (d / "int8").exists()


def test_quantize_config_is_validated_and_off_by_default():
    assert load_recipe("quickstart").quantize == QuantizeConfig() and not QuantizeConfig().enabled
    assert QuantizeConfig(keep_fp32=["first"]).keep_fp32 == ("first",)
    for bad in ({"method": "kl"}, {"images": 0}, {"images": True}, {"activations": "int4"}, {"min_agreement": 0},
                {"min_agreement": 1.5}, {"keep_fp32": "first"}, {"check_images": 0}, {"enabled": "yes"}):
        with pytest.raises(RecipeError, match="quantize."):
            QuantizeConfig(**bad)
    with pytest.raises(RecipeError, match="quantize.enabled needs the ONNX export"):
        recipe_from_dict({"quantize": {"enabled": True}, "export": {"onnx": False}})
    assert load_recipe("quickstart", ["quantize.method=entropy"]).quantize.method == "entropy"


def test_run_quantizes_after_export_only_when_enabled(monkeypatch, tmp_path):
    import resprune.stages as stages

    calls = []
    for name in ("train", "prune", "finetune", "fuse", "export", "quantize", "bench", "report"):
        monkeypatch.setattr(stages, f"stage_{name}", lambda *a, _n=name, **k: calls.append(_n))
    from resprune.rundir import RunDir

    run = RunDir(tmp_path)
    stages.run_all(load_recipe("quickstart"), run)
    assert "quantize" not in calls
    calls.clear()
    stages.run_all(load_recipe("quickstart", ["quantize.enabled=true"]), run)
    assert calls == ["train", "prune", "finetune", "fuse", "export", "quantize", "bench", "report"]
