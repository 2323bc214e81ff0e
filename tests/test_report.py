"""export / bench / report stages (resprune.stages) and the report (resprune.report) on a small
run directory built here (nothing is trained).

The run directory holds the files of docs/run-dir.md for a resnet20 with some layer scales
set to 0 and made-up but plausible accuracies; latency comes from a short real benchmark
(batch 1 and 4, 5 runs, 1 thread), so only its structure is asserted, never its values.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

import resprune as rp
from helpers import randomize_
from resprune.cli import main
from resprune.config import ExportConfig
from resprune.onnx import sha256_file, verify_onnx
from resprune.rundir import RunDirError
from resprune.stages import stage_bench, stage_export, stage_report

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
    size = {"input_size": [1, 3, 32, 32]}  # every checkpoint of a run records its input size
    rp.save(rp.fuse(m), d / "fused_unpruned.pt", extra=size)
    st = rp.scale_stats(m, threshold=1e-2)
    rep = rp.prune_(m, rp.PruneConfig(threshold=1e-2))
    rp.save(m, d / "pruned.pt")
    rp.save(rp.fuse(m), d / "fused.pt", extra=size)
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
    stage_export(d)
    fast = ExportConfig(bench_batches=(1, 4), bench_runs=5, bench_warmup=1, bench_threads=1)
    stage_bench(d, fast, memory=False, quiet=True)  # memory: test_ort_bench
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
        assert r["runs"] == 5 and 0 < r["min_ms"] <= r["q25_ms"] <= r["median_ms"] <= r["q75_ms"] <= r["p90_ms"]
        assert (r["ratio_interval"] is None) == (r["model"] == "unpruned")
    assert b["settings"]["intra_op_threads"] == 1 and b["settings"]["inter_op_threads"] == 1


def test_report_files_plots_and_numbers(run_dir):
    d, rep = run_dir
    out = stage_report([d])
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
    for bs, l in run["latency"].items():  # median with its interquartile range, ratio with its noise interval
        lo, hi = l["ratio_interval"]
        assert l["before_iqr_ms"][0] <= l["before_ms"] <= l["before_iqr_ms"][1] and lo < l["ratio"] < hi
        row = next(x for x in md.splitlines() if x.startswith(f"| latency, batch {bs} (ms) |"))
        assert f"{l['before_ms']:.3f} ({l['before_iqr_ms'][0]:.3f}–{l['before_iqr_ms'][1]:.3f})" in row
        assert f"{l['ratio']:.3f} ({lo:.3f}–{hi:.3f}" in row and ("within noise" in row) == l["within_noise"]
    assert "1 intra-op, 1 inter-op" in md and "widened by 0.05" in md
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
        stage_report([d, d2])
    out = tmp_path / "cmp"
    rep = stage_report([d, d2], out)
    assert (out / "plots" / "acc_vs_macs.png").read_bytes()[:8] == PNG_MAGIC
    assert (out / "plots" / "r20-other_scales.png").is_file()
    assert "## Across runs" in (out / "report.md").read_text()
    assert [r["after"]["test_acc"] for r in rep["runs"]] == [91.5, 90.9]


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
    assert main([cmd, str(d2)]) == 2
    err = capsys.readouterr().err
    assert missing in err and stage in err and f"resprune {cmd}: error" in err and err.count("\n") == 1
    with pytest.raises(RunDirError):
        {"report": lambda: stage_report([d2]), "export": lambda: stage_export(d2),
         "bench": lambda: stage_bench(d2)}[cmd]()


def test_cli_report_handler(run_dir, tmp_path, capsys):
    d, _ = run_dir
    assert main(["report", str(d), "--out", str(tmp_path / "rep")]) == 0
    assert (tmp_path / "rep" / "report.md").is_file()
    assert "report.md" in capsys.readouterr().out


def test_report_baseline_column(run_dir, tmp_path):
    """A baseline run (same schedule, no L1): the report says what L1 cost and how far the
    pruned model is from the unpruned one trained as long; a figure works too."""
    d, rep = run_dir
    base = tmp_path / "r20-base"
    base.mkdir()
    stage = lambda a: {"test_acc": a, "macs": rep.macs_before, "params": rep.params_before, "epochs": 30}
    (base / "metrics.json").write_text(json.dumps({"stages": {
        "sparse": stage(92.3), "pruned": stage(92.3), "finetuned": stage(92.6) | {"epochs": 5}}}))
    out = tmp_path / "with-base"
    r = stage_report([d], out, baseline=str(base))["runs"][0]
    assert r["baseline"]["final_acc"] == 92.6 and r["baseline"]["epochs"] == 35
    assert r["vs_baseline_pt"] == pytest.approx(91.5 - 92.6)
    assert r["l1_cost_pt"] == pytest.approx(91.8 - 92.3)
    md = (out / "report.md").read_text()
    assert "baseline (run `r20-base`, 35 epochs, no L1, nothing pruned)" in md
    assert "| test accuracy (%) | 92.60 | 91.50 | -1.10 pt |" in md and "(-0.50 pt)" in md
    fig = stage_report([d], tmp_path / "fig", baseline=93.0)["runs"][0]
    assert fig["vs_baseline_pt"] == pytest.approx(-1.5) and fig["l1_cost_pt"] is None
    with pytest.raises(RunDirError, match="does not exist"):
        stage_report([d], tmp_path / "x", baseline=str(tmp_path / "nope"))
    assert not (tmp_path / "x").exists()  # nothing written on a bad baseline
    # no baseline: no column, as before
    assert stage_report([d], tmp_path / "none")["runs"][0]["baseline"] is None


def test_bench_refuses_an_onnx_without_its_sidecar(run_dir, tmp_path, capsys):
    """A modified ONNX whose sidecar was deleted cannot be checked: refused, not timed with a
    warning, unless --allow-unverified is given."""
    import onnx
    from onnx import numpy_helper

    d, _ = run_dir
    d2 = tmp_path / "tampered"
    shutil.copytree(d, d2, ignore=shutil.ignore_patterns("bench.json"))
    proto = onnx.load(str(d2 / "onnx" / "pruned.onnx"))
    init = proto.graph.initializer[0]
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 2, init.name))
    onnx.save(proto, str(d2 / "onnx" / "pruned.onnx"))
    (d2 / "onnx" / "pruned.json").unlink()
    fast = ["--batch", "1", "--runs", "2", "--warmup", "1", "--threads", "1", "--no-memory"]
    assert main(["bench", str(d2), *fast]) == 2
    err = capsys.readouterr().err
    assert "pruned.onnx: its sidecar pruned.json is missing" in err and "--allow-unverified" in err
    assert err.count("\n") == 1 and not (d2 / "bench.json").exists()
    assert main(["bench", str(d2), *fast, "--allow-unverified"]) == 0 and (d2 / "bench.json").is_file()
    assert json.loads((d2 / "bench.json").read_text())["settings"]["runs"] == 2  # the options reach the tool


def _onnx_set(d):
    return {p.name: p.read_bytes() for p in sorted((d / "onnx").iterdir())}


def test_export_that_fails_midway_keeps_the_previous_set(run_dir, tmp_path, monkeypatch):
    """An error while exporting the second model: the four files of the previous export are
    untouched, its record stands (bench still accepts them), no temporary file or folder is left."""
    import resprune.onnx as ronnx

    d, _ = run_dir
    d2 = tmp_path / "fails"
    shutil.copytree(d, d2)
    before, real = _onnx_set(d2), ronnx.export_onnx

    def fail_on_pruned(model, path, *a, **k):
        if path.name == "pruned.onnx":
            raise ronnx.OnnxVerificationError(f"{path}: injected failure")
        return real(model, path, *a, **k)

    monkeypatch.setattr(ronnx, "export_onnx", fail_on_pruned)
    with pytest.raises(ronnx.OnnxVerificationError, match="injected"):
        stage_export(d2)
    assert _onnx_set(d2) == before
    assert not [p for p in d2.rglob("*") if ".tmp-" in p.name]
    assert json.loads((d2 / "provenance.json").read_text())["stages"]["export"]["state"] == "done"
    assert verify_onnx(d2 / "onnx" / "pruned.onnx")["functional"]
    stage_report([d2])  # bench.json still matches the set


def test_export_killed_midway_is_refused_until_exported_again(run_dir, tmp_path, capsys):
    """SIGTERM while the second model is exported: onnx/ still holds the previous, matching set,
    the export is recorded as unfinished, so bench and report refuse with one line naming
    `resprune export`; the next export removes the temporary folder and writes a full set."""
    import os
    import subprocess
    import sys

    d, _ = run_dir
    d2 = tmp_path / "killed"
    shutil.copytree(d, d2)
    before = _onnx_set(d2)
    script = (
        "import os, signal, sys\n"
        "import onnx\n"
        "from resprune.stages import stage_export\n"
        "real = onnx.load\n"
        "def load_then_die(path, *a, **k):\n"
        "    if '/.pruned.onnx.tmp-' in str(path):  # the second file has just been written\n"
        "        os.kill(os.getpid(), signal.SIGTERM)\n"
        "    return real(path, *a, **k)\n"
        "onnx.load = load_then_die\n"
        "stage_export(sys.argv[1])\n"
    )
    res = subprocess.run([sys.executable, "-c", script, str(d2)], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == -15, res.stderr[-2000:]
    assert _onnx_set(d2) == before  # no mixed set
    assert [p.name.split(".tmp-")[0] for p in d2.glob(".*.tmp-*")] == [".onnx"]
    for argv in (["bench", str(d2)], ["report", str(d2)]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "`export` did not finish" in err and f"re-run `resprune export {d2}`" in err and err.count("\n") == 1
    stage_export(d2)
    assert not list(d2.glob(".*.tmp-*"))
    assert sorted(p.name for p in (d2 / "onnx").iterdir()) == ["pruned.json", "pruned.onnx", "unpruned.json",
                                                              "unpruned.onnx"]
    assert verify_onnx(d2 / "onnx" / "unpruned.onnx")["functional"]


def test_report_says_what_to_change_when_nothing_was_removed(run_dir, tmp_path):
    d, _ = run_dir
    d2 = tmp_path / "none-removed"
    shutil.copytree(d, d2, ignore=shutil.ignore_patterns("*.pt", "onnx", "plots", "report.*"))
    p = json.loads((d2 / "prune.json").read_text())
    p.update(removed=[], removed_per_stage={}, max_removed_scale=0.0, macs_after=p["macs_before"])
    (d2 / "prune.json").write_text(json.dumps(p))
    stage_report([d2], latency=False)
    md = (d2 / "report.md").read_text()
    assert "largest removed |s|" not in md
    assert "Nothing was removed (threshold |s| < 0.01). To remove layers, train with a larger L1 weight" in md
    assert "train.epochs" in md


def test_report_says_within_noise(run_dir, tmp_path):
    """A ratio whose noise interval contains 1 (as for two identical files) is reported as
    within noise; an older bench.json without spread fields is reported as before."""
    d, _ = run_dir
    d2 = tmp_path / "noise"
    shutil.copytree(d, d2, ignore=shutil.ignore_patterns("plots", "report.*"))
    b = json.loads((d2 / "bench.json").read_text())
    for r in b["results"]:
        if r["model"] == "pruned":
            r.update(ratio_interval=[0.93, 1.06], within_noise=True)
    (d2 / "bench.json").write_text(json.dumps(b))
    stage_report([d2])
    rows = [x for x in (d2 / "report.md").read_text().splitlines() if x.startswith("| latency, batch")]
    assert len(rows) == 2 and all("(0.930–1.060, *within noise*)" in x for x in rows)
    for r in b["results"]:
        for k in ("q25_ms", "q75_ms", "ratio_interval", "within_noise"):
            r.pop(k, None)
    (d2 / "bench.json").write_text(json.dumps(b))
    lat = stage_report([d2])["runs"][0]["latency"]["1"]
    assert lat["ratio_interval"] is None and lat["before_iqr_ms"] is None and lat["ratio"] > 0


def test_params_are_the_fused_models(run_dir, tmp_path):
    """The report's params row (and the baseline's) are those of the fused models, the ones
    exported, when metrics.json has them: README, report and terminal show one figure."""
    d, rep = run_dir
    run = tmp_path / "fused-params"
    shutil.copytree(d, run)
    m = json.loads((run / "metrics.json").read_text())
    m["stages"]["unpruned_fused"] = {"test_acc": 90.0, "macs": rep.macs_before, "params": 111_000}
    m["stages"]["fused"] = {"test_acc": 91.0, "macs": rep.macs_after, "params": 55_000}
    (run / "metrics.json").write_text(json.dumps(m))
    r = stage_report([run], tmp_path / "out", baseline=str(run))["runs"][0]
    assert (r["before"]["params"], r["after"]["params"], r["baseline"]["params"]) == (111_000, 55_000, 55_000)
    assert "| params (M, fused) | 0.111 | 0.055 |" in (tmp_path / "out" / "report.md").read_text()
