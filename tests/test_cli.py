"""The `resprune` command: the quickstart pipeline end to end (shortened), the stage
sub-commands on its run directory, and clear errors with a non-zero exit."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch

import resprune as rp
from resprune.cli import main
from resprune.prune import removal_units

FAST = ["--set", "train.epochs=2", "--set", "finetune.epochs=1", "--set", "export.bench_runs=3",
        "--set", "export.bench_warmup=1", "--set", "export.bench_batches=[1]"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "qs"
    assert main(["-q", "run", "quickstart", "--out", str(out), *FAST]) == 0
    return out


def test_run_writes_the_documented_files(run_dir, capsys):
    for f in ("recipe.json", "checkpoints/sparse.pt", "sparse.pt", "prune.json", "pruned.pt", "finetuned.pt",
              "fused.pt", "fused_unpruned.pt", "onnx/unpruned.onnx", "onnx/pruned.onnx", "metrics.json",
              "bench.json", "report.md", "report.json", "provenance.json"):
        assert (run_dir / f).is_file(), f
    m = json.loads((run_dir / "metrics.json").read_text())["stages"]
    assert {"sparse", "pruned", "finetuned", "fused", "unpruned_fused"} <= set(m)
    assert m["fused"]["test_acc"] == pytest.approx(m["finetuned"]["test_acc"], abs=0.3)
    assert json.loads((run_dir / "recipe.json").read_text())["train"]["epochs"] == 2
    # a pruned model reloads without the pruning code path: the fused model the files describe
    payload = rp.serialization.load_payload(run_dir / "fused.pt")
    size, deploy = tuple(payload["extra"]["input_size"]), payload["extra"]["deploy"]
    fused = rp.load(run_dir / "fused.pt").eval()
    assert size == (1, 1, 16, 16) and deploy["classes"] == [str(c) for c in range(10)]  # digits, upsampled to 16×16
    assert not any(isinstance(x, (rp.ResConv2d, torch.nn.BatchNorm2d)) for x in fused.modules())
    assert fused(torch.zeros(2, *size[1:])).shape == (2, 10) and deploy["test_accuracy"] == m["fused"]["test_acc"]
    prune = json.loads((run_dir / "prune.json").read_text())
    assert rp.profile(fused, size).macs == m["fused"]["macs"] == m["pruned"]["macs"] == prune["macs_after"]
    assert prune["macs_after"] <= prune["macs_before"] == m["sparse"]["macs"] == m["unpruned_fused"]["macs"]
    sc = prune["scales"]
    assert sc["threshold"] == 0.02 and len(sc["names"]) == len(sc["values"]) > 0
    assert len(prune["removed"]) == m["pruned"]["removed"] == sum(prune["removed_per_stage"].values())
    assert all(abs(v) < 0.02 for n, v in zip(sc["names"], sc["values"]) if n in prune["removed"])
    assert m["fused"]["check"]["max_abs_diff"] <= 1e-4 * max(1.0, m["fused"]["check"]["max_abs_logit"])
    assert {"cpu", "cores", "torch", "python"} <= set(json.loads((run_dir / "metrics.json").read_text())["hardware"])
    side = json.loads((run_dir / "onnx" / "pruned.json").read_text())
    assert side["source"]["sha256"] == rp.onnx.sha256_file(run_dir / "fused.pt")
    assert side["macs_per_sample"] == m["fused"]["macs"] and side["test_accuracy"] == m["fused"]["test_acc"]
    bench = json.loads((run_dir / "bench.json").read_text())
    assert {b["name"]: b["sha256"] for b in bench["models"]} == {
        k: rp.onnx.sha256_file(run_dir / "onnx" / f"{k}.onnx") for k in ("unpruned", "pruned")}
    assert {(r["model"], r["batch"], r["runs"]) for r in bench["results"]} == {("unpruned", 1, 3), ("pruned", 1, 3)}
    rep = json.loads((run_dir / "report.json").read_text())["runs"][0]
    assert rep["after"]["stage"] == "finetuned" and rep["after"]["test_acc"] == m["finetuned"]["test_acc"]
    assert rep["after"]["macs"] == m["finetuned"]["macs"] and set(rep["latency"]) == {"1"}
    md = (run_dir / "report.md").read_text()
    assert f"| test accuracy (%) | {m['sparse']['test_acc']:.2f} | {m['finetuned']['test_acc']:.2f} |" in md
    recs = json.loads((run_dir / "provenance.json").read_text())["stages"]
    assert all(recs[s]["state"] == "done" for s in ("train", "prune", "finetune", "fuse", "export", "bench", "report"))
    assert recs["fuse"]["inputs"].keys() == {"sparse.pt", "finetuned.pt"}


def test_resume_a_finished_run_does_not_retrain(run_dir, capsys):
    sparse = (run_dir / "checkpoints" / "sparse.pt").read_bytes()
    done = {f: (run_dir / f).read_bytes() for f in ("finetuned.pt", "fused.pt", "onnx/pruned.onnx", "bench.json")}
    assert main(["-q", "run", "quickstart", "--out", str(run_dir), "--resume", *FAST]) == 0
    assert (run_dir / "checkpoints" / "sparse.pt").read_bytes() == sparse  # no epoch re-run
    assert all((run_dir / f).read_bytes() == b for f, b in done.items())  # current results: not made again
    assert main(["run", "quickstart", "--out", str(run_dir), "--resume", *FAST, "--set", "train.lr=0.5"]) == 2
    assert "recipe differs" in capsys.readouterr().err


def test_stage_commands_rerun_on_the_run_dir(run_dir):
    """A re-run prune invalidates the fine-tuned model; fuse then fuses the new pruned.pt."""
    assert main(["-q", "prune", str(run_dir), "--set", "prune.target_macs=0.6"]) == 0
    p = json.loads((run_dir / "prune.json").read_text())
    assert p["macs_after"] <= 0.6 * p["macs_before"]
    assert not (run_dir / "finetuned.pt").exists() and (run_dir / "stale" / "finetune" / "finetuned.pt").is_file()
    assert main(["-q", "fuse", str(run_dir)]) == 0
    size = tuple(rp.serialization.load_payload(run_dir / "fused.pt")["extra"]["input_size"])
    assert rp.profile(rp.load(run_dir / "fused.pt"), size).macs == p["macs_after"]
    assert json.loads((run_dir / "metrics.json").read_text())["stages"]["fused"]["macs"] == p["macs_after"]
    fuse = json.loads((run_dir / "provenance.json").read_text())["stages"]["fuse"]
    assert fuse["state"] == "done" and fuse["inputs"].keys() == {"sparse.pt", "pruned.pt"}


def test_existing_run_dir_is_not_overwritten(run_dir, capsys):
    before = (run_dir / "sparse.pt").read_bytes()
    assert main(["run", "quickstart", "--out", str(run_dir)]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert (run_dir / "sparse.pt").read_bytes() == before


def test_threshold_that_would_delete_a_stage(run_dir, capsys):
    before = {f: (run_dir / f).read_bytes() for f in ("prune.json", "pruned.pt", "provenance.json")}
    assert main(["prune", str(run_dir), "--set", "prune.threshold=100"]) == 2
    assert "would leave stage" in capsys.readouterr().err
    assert {f: (run_dir / f).read_bytes() for f in before} == before  # nothing written


@pytest.mark.parametrize("argv,match", [
    (["train", "quickstart", "--set", "train.epoch=1"], "unknown recipe key 'train.epoch'"),
    (["train", "resnet20_mnist", "--data-dir", "/nonexistent/data"], "does not exist"),
    (["train", "no_such_recipe"], "no recipe"),
    (["train", "quickstart", "--engine", "mgrit", "--nproc", "2", "--set", "engine_options.coarse=average"],
     "unknown engine_options key(s) coarse"),
    (["train", "quickstart", "--engine", "mgrit", "--nproc", "2", "--set", "engine_options.cf=1"],
     "engine_options: cf (coarsening factor) must be an int >= 2"),
    (["train", "quickstart", "--nproc", "0"], "nproc must be an int >= 1, got 0"),
    (["train", "quickstart", "--nproc", "2"], "nproc=2 needs a layer-parallel engine (--engine mgrit)"),
    (["run", "quickstart", "--nproc", "2"], "nproc=2 needs a layer-parallel engine"),
    (["train", "quickstart", "--set", "model.kwargs.no_such=1"],
     "model.kwargs {'no_such': 1}: resnet20 got an unexpected keyword argument 'no_such'"),
    (["run", "quickstart", "--set", "model.kwargs.num_classes=3"], "model.kwargs.num_classes"),
    (["run", "quickstart", "--set", 'model.remove=["layer1.1.conv7"]'],
     "model.remove: layer1.1.conv7 is not a removal unit of CifarResNet; units: layer1.0.conv1,"),
    (["run", "quickstart", "--set", "model.remove=/nonexistent/prune.json"],
     "model.remove='/nonexistent/prune.json': not a readable prune.json"),
])
def test_errors(tmp_path, capsys, argv, match):
    assert main([*argv, "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert match in err and err.count("\n") == 1  # one line, no traceback
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
    """The installed `resprune` script runs this package's parser: every sub-command is listed
    with its help line, in the parser's order."""
    from resprune.cli import build_parser

    exe = Path(sys.executable).with_name("resprune")
    out = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.startswith("usage: resprune ")
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    listed = re.findall(r"^    (\w+)(?: +(\S.*))?$", out.stdout, re.M)  # name, first line of its help
    assert [n for n, _ in listed] == [c.dest for c in sub._choices_actions]
    assert {n for n, _ in listed} >= {"run", "train", "prune", "finetune", "fuse", "export", "bench", "report",
                                       "models", "recipes", "qmc"}
    for (name, first), c in zip(listed, sub._choices_actions):
        assert first and " ".join(c.help.split()).startswith(first.strip()), name


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


def _rank_pids(token: str) -> dict[int, int]:
    """{rank: pid} of the torchrun ranks started with RESPRUNE_TEST_TOKEN=token in their environment."""
    pids = {}
    for d in Path("/proc").iterdir():
        try:
            env = dict(e.split(b"=", 1) for e in (d / "environ").read_bytes().split(b"\0") if b"=" in e)
        except (OSError, ValueError):
            continue
        if env.get(b"RESPRUNE_TEST_TOKEN") == token.encode() and b"LOCAL_RANK" in env:
            pids[int(env[b"RANK"])] = int(d.name)
    return pids


@pytest.mark.dist
@pytest.mark.skipif(not Path("/proc/self/environ").is_file(), reason="finds the ranks' processes in /proc")
def test_a_killed_rank_is_one_line_and_the_checkpoint_survives(tmp_path):
    """SIGKILL of rank 1 during `resprune train --engine mgrit --nproc 2`: a non-zero exit, one
    line on stderr that names the rank and the signal, no traceback, and the last checkpoint loads."""
    exe = Path(sys.executable).with_name("resprune")
    out, token = tmp_path / "killed", uuid.uuid4().hex
    cmd = [str(exe), "-q", "train", "quickstart", "--engine", "mgrit", "--nproc", "2", "--out", str(out),
           "--set", "model.name=resconv_chain", "--set", "model.kwargs.depth=8", "--set", "model.kwargs.width=8",
           "--set", "data.train_limit=256", "--set", "train.epochs=1000", "--set", "engine_options.cf=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RESPRUNE_TEST_TOKEN": token}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    ckpt = out / "checkpoints" / "sparse.pt"
    try:
        deadline = time.monotonic() + 300
        while not ckpt.is_file() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert ckpt.is_file(), proc.communicate(timeout=60)
        os.kill(_rank_pids(token)[1], signal.SIGKILL)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
        for pid in _rank_pids(token).values():  # no rank outlives a failed test
            os.kill(pid, signal.SIGKILL)
    assert proc.returncode == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("resprune train: error: rank 1 of 2 died (killed by SIGKILL, exit code -9); "), err
    assert f"{out} keeps the checkpoint of the last finished epoch (sparse.pt)" in err and "--resume" in err, err
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert state["epoch"] >= 1 and state["optimizer"]["state_by_name"]
    rp.serialization.model_from_payload(state["model"], ckpt)


@pytest.mark.dist
def test_run_layer_parallel_two_processes(tmp_path):
    """`resprune run ... --engine mgrit --nproc 2` end to end on a tiny gated chain: trains
    and fine-tunes layer-parallel (the pruned model re-partitioned), prunes, fuses, exports,
    benchmarks, and the report names the engine and its settings."""
    exe = Path(sys.executable).with_name("resprune")
    out = tmp_path / "mgrun"
    cmd = [str(exe), "-q", "run", "quickstart", "--engine", "mgrit", "--nproc", "2", "--out", str(out),
           "--set", "model.name=resconv_chain", "--set", "model.kwargs.depth=8", "--set", "model.kwargs.width=8",
           "--set", "model.kwargs.gate=tanh", "--set", "train.epochs=1", "--set", "train.smooth=1e-4",
           "--set", "prune.threshold=null", "--set", "prune.target_macs=0.7",
           "--set", "engine_options.cf=2", "--set", "engine_options.warm_start=class_mean", *FAST[2:]]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    for f in ("sparse.pt", "pruned.pt", "fused.pt", "onnx/pruned.onnx", "bench.json", "report.md"):
        assert (out / f).is_file(), f
    stages = json.loads((out / "metrics.json").read_text())["stages"]
    assert stages["pruned"]["removed"] > 0
    eng = stages["finetuned"]["engine"]
    assert eng["name"] == "mgrit" and eng["nproc"] == 2 and eng["options"]["warm_start"] == "class_mean"
    assert eng["bounds"][-1] == 10 - stages["pruned"]["removed"]  # the pruned chain, re-partitioned
    rb = eng["repartition"]  # by the per-layer times measured in training
    assert len(stages["sparse"]["engine"]["layer_time_s"]) == 10 and rb["bounds_after"] == eng["bounds"]
    assert rb["imbalance_after"] <= rb["imbalance_before"] + 1e-12
    report = (out / "report.md").read_text()
    assert "training engine: `mgrit` on 2 processes" in report and "cf=2" in report


def test_prune_summary_once_and_what_to_change_when_nothing_is_removed(run_dir, capsys):
    assert main(["prune", str(run_dir), "--set", "prune.target_macs=1.0"]) == 0
    out = capsys.readouterr().out
    assert out.count("nothing was removed") == 1 and "largest removed" not in out
    assert "train.l1" in out and "train.epochs" in out
    assert main(["prune", str(run_dir), "--set", "prune.threshold=0.02"]) == 0
    out = capsys.readouterr().out
    assert out.count("MACs") == 1, out  # the summary is printed once (prune_ logged it a second time)


def test_fuse_compares_logits_not_accuracy(run_dir, monkeypatch, capsys):
    """A fusion error that moves the logits by ~0.3% need not flip a prediction, so an accuracy
    check can pass it; the logit check refuses it (one line, exit 2) and writes nothing."""
    import resprune.stages.fuse as stage

    real = stage.fuse
    files = lambda: {p.name: p.read_bytes() for p in run_dir.glob("fused*.pt")}  # noqa: E731
    record = lambda: json.loads((run_dir / "provenance.json").read_text())["stages"].get("fuse")  # noqa: E731
    before = files(), record()

    def slightly_off(model):
        fused = real(model)
        with torch.no_grad():
            next(x for x in fused.modules() if isinstance(x, torch.nn.Conv2d)).weight.mul_(1.003)
        return fused

    monkeypatch.setattr(stage, "fuse", slightly_off)
    assert main(["fuse", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert "disagrees with the model it was fused from" in err and err.count("\n") == 1
    assert (files(), record()) == before


def test_a_bug_keeps_its_traceback_and_debug_shows_ours(tmp_path, monkeypatch, capsys):
    """Only resprune's own errors and OSErrors become one line; any other exception (here a
    ZeroDivisionError or a KeyError in a stage) surfaces with its traceback. --debug shows the
    traceback of resprune's own errors too, with the same one line and exit status."""
    import resprune.stages as stages

    run = tmp_path / "r"
    run.mkdir()
    (run / "recipe.json").write_text(rp.config.load_recipe("quickstart").to_json())
    for bug in (ZeroDivisionError("division by zero"), KeyError("stages")):
        def broken(recipe, run_dir, bug=bug):
            raise bug

        monkeypatch.setattr(stages, "stage_fuse", broken)
        with pytest.raises(type(bug)):
            main(["fuse", str(run)])
        assert "error:" not in capsys.readouterr().err
    assert main(["--debug", "train", "quickstart", "--set", "train.epoch=1", "--out", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last):") and "resprune.config.RecipeError" in err
    assert err.splitlines()[-1].startswith("resprune train: error: unknown recipe key 'train.epoch'")
    assert not (tmp_path / "d").exists()


def test_models_without_a_match(capsys):
    assert main(["models", "res"]) == 1
    cap = capsys.readouterr()
    assert cap.out == "" and "no registered model matches 'res'" in cap.err and "'*res*'" in cap.err
    assert main(["models", "*res*"]) == 0 and "resnet20" in capsys.readouterr().out


def test_read_only_out_is_one_line(tmp_path, capsys, monkeypatch):
    import errno

    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o555)
    if os.geteuid() == 0:  # root writes anyway: refuse writes in it as a read-only mount would
        real_open = Path.open

        def ro_open(self, mode="r", *a, **k):
            if any(c in mode for c in "wax+") and Path(self).parent == out:
                raise PermissionError(errno.EROFS, "Read-only file system", str(self))
            return real_open(self, mode, *a, **k)

        monkeypatch.setattr(Path, "open", ro_open)
    try:
        assert main(["train", "quickstart", "--out", str(out)]) == 2
    finally:
        out.chmod(0o755)
    err = capsys.readouterr().err
    assert f"cannot write the run directory {out}" in err and err.count("\n") == 1, err


def _idx(path, arr):
    header = bytes([0, 0, 8, arr.ndim]) + b"".join(int(v).to_bytes(4, "big") for v in arr.shape)
    path.write_bytes(header + arr.astype("uint8").tobytes())


def _mnist(root, n_labels=32):
    import numpy as np

    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", 32), ("t10k", 8)):
        _idx(raw / f"{split}-images-idx3-ubyte", rng.integers(0, 255, (n, 28, 28)))
        _idx(raw / f"{split}-labels-idx1-ubyte", np.arange(n_labels if split == "train" else n) % 10)
    return root


def test_bad_data_fails_before_training_and_the_retry_reuses_the_run_dir(tmp_path, capsys, monkeypatch):
    """Mismatched MNIST counts are an error naming them; the failed run leaves only recipe.json,
    and the same --out works for the retry (with or without --resume, with another data dir)."""
    monkeypatch.setenv("RESPRUNE_CACHE", str(tmp_path / "cache"))
    bad, good = _mnist(tmp_path / "bad", n_labels=8), _mnist(tmp_path / "good")
    out = tmp_path / "run"
    small = ["--set", "data.batch_size=8", "--set", "data.eval_batch_size=8", "--set", "train.epochs=0"]
    assert main(["train", "resnet20_mnist", "--data-dir", str(bad), "--out", str(out), *small]) == 2
    err = capsys.readouterr().err
    assert "(train split): 32 images but 8 labels" in err and err.count("\n") == 1
    assert [p.name for p in out.iterdir()] == ["recipe.json"]  # nothing trained
    for extra in (["--resume"], []):
        assert main(["-q", "train", "resnet20_mnist", "--data-dir", str(good), "--out", str(out), *small, *extra]) == 0
        assert (out / "sparse.pt").is_file(), capsys.readouterr().err
        for f in out.iterdir():  # back to "failed early" for the second round
            if f.is_file() and f.name != "recipe.json":
                f.unlink()
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
        shutil.rmtree(out / "tb", ignore_errors=True)


def test_resume_removes_partial_files_of_a_killed_run(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "run"
    (out / "onnx").mkdir(parents=True)
    (out / "checkpoints").mkdir()
    stale = [out / "onnx" / f".unpruned.onnx.tmp-{dead.pid}", out / "checkpoints" / f".sparse.pt.tmp-{dead.pid}"]
    for f in stale:
        f.write_bytes(b"partial")
    live = out / "onnx" / f".pruned.onnx.tmp-{os.getppid()}"  # a process that still runs: left alone
    live.write_bytes(b"in progress")
    assert main(["-q", "train", "quickstart", "--out", str(out), "--resume", "--set", "train.epochs=0"]) == 0
    assert not any(f.exists() for f in stale) and live.exists()


def test_a_pruned_architecture_trains_from_scratch(tmp_path):
    """model.remove = a run's prune.json: the same architecture, new random weights, trained
    by the whole pipeline (the control for a pruning result)."""
    (tmp_path / "prune.json").write_text(json.dumps({"removed": ["layer1.1.conv1", "layer3.2.conv2"]}))
    out = tmp_path / "scratch"
    assert main(["-q", "run", "quickstart", "--out", str(out), *FAST, "--set", "train.l1=0",
                 "--set", f"model.remove={tmp_path / 'prune.json'}"]) == 0
    recipe = json.loads((out / "recipe.json").read_text())
    assert recipe["model"]["remove"] == ["layer1.1.conv1", "layer3.2.conv2"]  # the names, not the path
    model = rp.load(out / "sparse.pt")
    units = {u.name for u in removal_units(model)}
    # resnet20 has 16 units; layer3.2.conv2 gates its whole block, so layer3.2.conv1 goes with it
    assert len(units) == 13 and not units & {"layer1.1.conv1", "layer3.2.conv1", "layer3.2.conv2"}
    report = (out / "report.md").read_text()
    assert "2 units were removed before training (model.remove)" in report and "To remove layers" not in report
    full = rp.create_model("resnet20", num_classes=10, in_chans=1)
    assert rp.profile(model, (1, 1, 8, 8)).macs < rp.profile(full, (1, 1, 8, 8)).macs
