"""The `resprune` command: the quickstart pipeline end to end (shortened), the stage
sub-commands on its run directory, and clear errors with a non-zero exit."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import resprune as rp
from resprune.cli import main

FAST = ["--set", "train.epochs=2", "--set", "finetune.epochs=1", "--set", "export.bench_runs=3",
        "--set", "export.bench_warmup=1", "--set", "export.bench_batches=[1]"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "qs"
    assert main(["-q", "run", "quickstart", "--out", str(out), *FAST]) == 0
    return out


def test_run_writes_the_documented_files(run_dir, capsys):
    for f in ("recipe.json", "checkpoints/sparse.pt", "sparse.pt", "prune.json", "pruned.pt", "fused.pt",
              "fused_unpruned.pt", "onnx/unpruned.onnx", "onnx/pruned.onnx", "metrics.json", "bench.json",
              "report.md", "report.json"):
        assert (run_dir / f).is_file(), f
    m = json.loads((run_dir / "metrics.json").read_text())["stages"]
    assert {"sparse", "pruned", "finetuned", "fused", "unpruned_fused"} <= set(m)
    assert m["fused"]["test_acc"] == pytest.approx(m["finetuned"]["test_acc"], abs=0.3)
    assert json.loads((run_dir / "recipe.json").read_text())["train"]["epochs"] == 2
    # a pruned model reloads without the pruning code path
    assert rp.load(run_dir / "fused.pt") is not None


def test_resume_a_finished_run_does_not_retrain(run_dir, capsys):
    sparse = (run_dir / "checkpoints" / "sparse.pt").read_bytes()
    assert main(["-q", "run", "quickstart", "--out", str(run_dir), "--resume", *FAST]) == 0
    assert (run_dir / "checkpoints" / "sparse.pt").read_bytes() == sparse  # no epoch re-run
    assert main(["run", "quickstart", "--out", str(run_dir), "--resume", *FAST, "--set", "train.lr=0.5"]) == 2
    assert "recipe differs" in capsys.readouterr().err


def test_stage_commands_rerun_on_the_run_dir(run_dir):
    assert main(["-q", "prune", str(run_dir), "--set", "prune.target_macs=0.6"]) == 0
    p = json.loads((run_dir / "prune.json").read_text())
    assert p["macs_after"] <= 0.6 * p["macs_before"]
    assert main(["-q", "fuse", str(run_dir)]) == 0


def test_existing_run_dir_is_not_overwritten(run_dir, capsys):
    before = (run_dir / "sparse.pt").read_bytes()
    assert main(["run", "quickstart", "--out", str(run_dir)]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert (run_dir / "sparse.pt").read_bytes() == before


def test_threshold_that_would_delete_a_stage(run_dir, capsys):
    assert main(["prune", str(run_dir), "--set", "prune.threshold=100"]) == 2
    assert "would leave stage" in capsys.readouterr().err


@pytest.mark.parametrize("argv,match", [
    (["train", "quickstart", "--set", "train.epoch=1"], "unknown recipe key 'train.epoch'"),
    (["train", "resnet20_mnist", "--data-dir", "/nonexistent/data"], "does not exist"),
    (["train", "no_such_recipe"], "no recipe"),
    (["train", "quickstart", "--engine", "mgrit", "--nproc", "2", "--set", "engine_options.coarse=average"],
     "unknown engine_options key(s) coarse"),
    (["train", "quickstart", "--engine", "mgrit", "--nproc", "2", "--set", "engine_options.cf=1"],
     "engine_options: cf (coarsening factor) must be an int >= 2"),
])
def test_errors(tmp_path, capsys, argv, match):
    assert main([*argv, "--out", str(tmp_path / "r")]) == 2
    assert match in capsys.readouterr().err
    assert not (tmp_path / "r").exists()  # nothing written, no process started


def test_missing_and_corrupt_inputs(tmp_path, capsys):
    run = tmp_path / "r"
    run.mkdir()
    assert main(["prune", str(run)]) == 2
    assert "recipe.json is missing" in capsys.readouterr().err
    (run / "recipe.json").write_text(rp.config.load_recipe("quickstart").to_json())
    assert main(["prune", str(run)]) == 2
    assert "sparse.pt is missing: run `resprune train" in capsys.readouterr().err
    (run / "sparse.pt").write_bytes(b"PK\x03\x04garbage")
    assert main(["prune", str(run)]) == 2
    assert "not a readable checkpoint" in capsys.readouterr().err


def test_console_script_help():
    exe = Path(sys.executable).with_name("resprune")
    out = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0
    for cmd in ("run", "train", "prune", "fuse", "export", "bench", "report"):
        assert cmd in out.stdout


@pytest.mark.dist
def test_train_layer_parallel_two_processes(tmp_path):
    """`resprune train ... --engine mgrit --nproc 2` (torchrun, gloo): converged mgrit, and the
    checkpoint written by the parallel run reloads in a serial process."""
    exe = Path(sys.executable).with_name("resprune")
    out = tmp_path / "mg"
    cmd = [str(exe), "-q", "train", "quickstart", "--engine", "mgrit", "--nproc", "2", "--out", str(out),
           "--set", "train.epochs=1", "--set", "engine_options.cf=2",
           "--set", "engine_options.mode=converged", "--set", "engine_options.fwd_iters=20",
           "--set", "engine_options.bwd_iters=20"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=env)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    m = rp.load(out / "sparse.pt")
    acc = json.loads((out / "metrics.json").read_text())["stages"]["sparse"]["test_acc"]
    from resprune.data import DeviceLoader, load_arrays
    from resprune.train import evaluate

    tr, te = load_arrays("digits")
    trl = DeviceLoader(tr, 64, train=True)
    tel = DeviceLoader(te, 512, mean=tuple(trl.mean.flatten().tolist()), std=tuple(trl.std.flatten().tolist()))
    assert evaluate(m.eval(), tel)[1] == pytest.approx(acc, abs=1e-6)
