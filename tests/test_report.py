"""export / bench / report stages on a small run directory built here (nothing is trained).

The run directory holds the files of docs/run-dir.md for a resnet20 with some layer scales
set to 0 and made-up but plausible accuracies; latency comes from a short real benchmark
(batch 1 and 4, 5 runs, 1 thread), so only its structure is asserted, never its values.
"""

from __future__ import annotations

import argparse
import json
import shutil

import numpy as np
import pytest
import torch

import resprune as rp
from helpers import randomize_
from resprune.onnx import sha256_file, verify_onnx
from resprune.report import (
    RunDirError, add_bench_parser, add_export_parser, add_report_parser, bench_run_dir,
    export_run_dir, write_report,
)

ZEROED = ["layer1.1.conv1", "layer2.0.conv2", "layer3.1.conv2", "layer3.2.conv1"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def make_run_dir(d, acc=(91.8, 91.5)):
    """Write recipe.json, sparse.pt, prune.json, pruned.pt, fused.pt, fused_unpruned.pt, metrics.json."""
    torch.manual_seed(0)
    m = randomize_(rp.create_model("resnet20"), seed=7).eval()
    with torch.no_grad():
        for _, rc in rp.sparsity.removable_scales(m):
            rc.scale.copy_(rc.scale.abs().clamp(min=0.05))
        for n in ZEROED:
            m.get_submodule(n).scale.zero_()
    d.mkdir(parents=True, exist_ok=True)
    (d / "recipe.json").write_text(json.dumps({"model": {"name": "resnet20"}, "data": {"dataset": "cifar10"},
                                              "prune": {"threshold": 1e-2}}))
    rp.save(m, d / "sparse.pt")
    rp.save(rp.fuse(m), d / "fused_unpruned.pt")
    st = rp.scale_stats(m, threshold=1e-2)
    rep = rp.prune_(m, rp.PruneConfig(threshold=1e-2))
    rp.save(m, d / "pruned.pt")
    rp.save(rp.fuse(m), d / "fused.pt")
    prune = rep.to_dict() | {"scales": {"names": st.names, "values": st.values, "threshold": 1e-2}}
    (d / "prune.json").write_text(json.dumps(prune))
    stage = lambda a, macs, params: {"test_acc": a, "test_loss": 0.3, "macs": macs, "params": params,
                                     "epochs": 30, "wall_s": 100.0}
    metrics = {"stages": {"sparse": stage(acc[0], rep.macs_before, rep.params_before),
                          "pruned": stage(acc[1] - 0.4, rep.macs_after, rep.params_after),
                          "finetuned": stage(acc[1], rep.macs_after, rep.params_after)},
               "hardware": "test"}
    (d / "metrics.json").write_text(json.dumps(metrics))
    return rep


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("runs") / "r20-test"
    rep = make_run_dir(d)
    export_run_dir(d)
    bench_run_dir(d, batches=(1, 4), runs=5, warmup=1, threads=1, memory=False, quiet=True)  # memory: test_ort_bench
    return d, rep


def test_export_run_dir_writes_verified_onnx_with_source_hash(run_dir):
    d, rep = run_dir
    for key, ckpt in (("unpruned", "fused_unpruned.pt"), ("pruned", "fused.pt")):
        onnx_path = d / "onnx" / f"{key}.onnx"
        side = json.loads((d / "onnx" / f"{key}.json").read_text())
        assert side["source"]["sha256"] == sha256_file(d / ckpt)
        assert side["check"]["max_abs_diff"] <= 1e-4  # tolerance of the export check
        assert verify_onnx(onnx_path, model=d / ckpt)["functional"]
    assert sorted(p.name for p in (d / "onnx").iterdir()) == ["pruned.json", "pruned.onnx", "unpruned.json",
                                                             "unpruned.onnx"]  # no .data side files
    side = json.loads((d / "onnx" / "pruned.json").read_text())
    assert side["macs_per_sample"] == rep.macs_after and side["input_shape"] == ["batch", 3, 32, 32]


def test_bench_json(run_dir):
    d, _ = run_dir
    b = json.loads((d / "bench.json").read_text())
    assert [m["name"] for m in b["models"]] == ["unpruned", "pruned"]
    assert {(r["model"], r["batch"]) for r in b["results"]} == {(m, bs) for m in ("unpruned", "pruned") for bs in (1, 4)}
    for r in b["results"]:
        assert r["runs"] == 5 and 0 < r["min_ms"] <= r["median_ms"] <= r["p90_ms"]


def test_report_files_plots_and_numbers(run_dir):
    d, rep = run_dir
    out = write_report([d])
    assert out["out"] == str(d)
    md = (d / "report.md").read_text()
    js = json.loads((d / "report.json").read_text())
    run = js["runs"][0]
    assert run["ratios"]["macs"] == pytest.approx(rep.macs_after / rep.macs_before, rel=1e-12)
    assert run["removed_per_stage"] == rep.removed_per_stage
    assert run["units_per_stage"] == {"layer1": 6, "layer2": 5, "layer3": 5}  # stride-2 conv1s are not removable
    assert set(run["latency"]) == {"1", "4"} and all(v["ratio"] > 0 for v in run["latency"].values())
    assert run["before"]["stage"] == "sparse" and run["after"]["stage"] == "finetuned"
    assert run["model"] == "resnet20"
    assert run["acc_delta_pt"] == pytest.approx(-0.3)
    assert "| MACs (M) |" in md and "latency, batch 4" in md
    pngs = sorted((d / "plots").glob("*.png"))
    assert [p.name for p in pngs] == ["before_after.png", "removed_per_stage.png", "scales.png"]
    import matplotlib.image as mpimg

    for p in pngs:
        assert p.read_bytes()[:8] == PNG_MAGIC
        img = mpimg.imread(p)
        assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 400
        assert float(np.std(img[..., :3])) > 0.01  # not a blank canvas
        assert f"plots/{p.name}" in md


def test_report_several_runs(run_dir, tmp_path):
    d, _ = run_dir
    d2 = tmp_path / "r20-other"
    shutil.copytree(d, d2, ignore=shutil.ignore_patterns("*.pt", "onnx", "plots", "report.*"))
    m = json.loads((d2 / "metrics.json").read_text())
    m["stages"]["finetuned"]["test_acc"] = 90.9
    (d2 / "metrics.json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match="--out"):
        write_report([d, d2])
    out = tmp_path / "cmp"
    rep = write_report([d, d2], out)
    assert (out / "plots" / "acc_vs_macs.png").read_bytes()[:8] == PNG_MAGIC
    assert (out / "plots" / "r20-other_scales.png").is_file()
    assert "## Across runs" in (out / "report.md").read_text()
    assert [r["after"]["test_acc"] for r in rep["runs"]] == [91.5, 90.9]


def _cli():
    p = argparse.ArgumentParser(prog="resprune")
    sub = p.add_subparsers(dest="cmd", required=True)
    add_export_parser(sub), add_bench_parser(sub), add_report_parser(sub)
    return p


@pytest.mark.parametrize("missing, cmd, stage", [
    ("bench.json", "report", "bench"),
    ("prune.json", "report", "prune"),
    ("metrics.json", "report", "every stage"),
    ("fused.pt", "export", "fuse"),
    ("onnx/pruned.onnx", "bench", "export"),
])
def test_missing_file_names_file_and_stage(run_dir, tmp_path, capsys, missing, cmd, stage):
    d, _ = run_dir
    d2 = tmp_path / "incomplete"
    shutil.copytree(d, d2)
    (d2 / missing).unlink()
    args = _cli().parse_args([cmd, str(d2)])
    assert args.func(args) == 2
    err = capsys.readouterr().err
    assert missing in err and stage in err and f"resprune {cmd}: error" in err
    with pytest.raises(RunDirError):
        {"report": lambda: write_report([d2]), "export": lambda: export_run_dir(d2),
         "bench": lambda: bench_run_dir(d2)}[cmd]()


def test_cli_report_handler(run_dir, tmp_path, capsys):
    d, _ = run_dir
    args = _cli().parse_args(["report", str(d), "--out", str(tmp_path / "rep")])
    assert args.func(args) == 0
    assert (tmp_path / "rep" / "report.md").is_file()
    assert "report.md" in capsys.readouterr().out
