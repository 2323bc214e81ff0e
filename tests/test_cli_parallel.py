"""`resprune train/run --engine pipeline|local --nproc 2` (torchrun, gloo): the command line
works for every layer-parallel engine as it does for mgrit (tests/test_cli.py)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

import resprune as rp

EXE = Path(sys.executable).with_name("resprune")
TINY = ["--set", "model.name=resconv_chain", "--set", "model.kwargs.depth=6", "--set", "model.kwargs.width=8",
        "--set", "data.train_limit=256", "--set", "train.epochs=1"]
FAST = ["--set", "finetune.epochs=1", "--set", "export.bench_runs=3", "--set", "export.bench_warmup=1",
        "--set", "export.bench_batches=[1]"]


def _run(cmd: list[str]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([str(EXE), "-q", *cmd], capture_output=True, text=True, timeout=400, env=env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]


@pytest.mark.dist
def test_train_pipeline_two_processes(tmp_path):
    """`resprune train … --engine pipeline --nproc 2`: the checkpoint written by the parallel
    run reloads serially and scores what the run reported."""
    out = tmp_path / "pp"
    _run(["train", "quickstart", "--engine", "pipeline", "--nproc", "2", "--out", str(out), *TINY])
    m = rp.load(out / "sparse.pt")
    sparse = json.loads((out / "metrics.json").read_text())["stages"]["sparse"]
    assert sparse["engine"]["name"] == "pipeline" and sparse["engine"]["nproc"] == 2
    from resprune.data import DeviceLoader, load_arrays
    from resprune.train import evaluate

    tr, te = load_arrays("digits")
    trl = DeviceLoader(tr, 64, train=True)
    tel = DeviceLoader(te, 512, mean=tuple(trl.mean.flatten().tolist()), std=tuple(trl.std.flatten().tolist()))
    assert evaluate(m.eval(), tel)[1] == pytest.approx(sparse["test_acc"], abs=1e-6)


@pytest.mark.dist
def test_run_local_two_processes(tmp_path):
    """`resprune run … --engine local --nproc 2`: trains and fine-tunes with local losses,
    prunes, fuses and exports the model without its auxiliary heads."""
    out = tmp_path / "loc"
    _run(["run", "quickstart", "--engine", "local", "--nproc", "2", "--out", str(out), *TINY,
          "--set", "prune.threshold=null", "--set", "prune.target_macs=0.8", *FAST])
    for f in ("sparse.pt", "pruned.pt", "fused.pt", "onnx/pruned.onnx", "report.md"):
        assert (out / f).is_file(), f
    stages = json.loads((out / "metrics.json").read_text())["stages"]
    assert stages["sparse"]["engine"]["name"] == "local" and stages["finetuned"]["engine"]["nproc"] == 2
    assert not any(k.startswith("aux") for k in rp.load(out / "sparse.pt").state_dict())


@pytest.mark.dist
def test_run_auxvar_two_processes(tmp_path):
    """`resprune run … --engine auxvar --nproc 2`: one parallel epoch on auxiliary variables and
    one serial correction epoch, then pruning, fine-tuning, fusion and export of the net."""
    out = tmp_path / "aux"
    _run(["run", "quickstart", "--engine", "auxvar", "--nproc", "2", "--out", str(out), *TINY,
          "--set", "train.epochs=2", "--set", "engine_options.variant=al", "--set", "engine_options.downsample=2",
          "--set", "prune.threshold=null", "--set", "prune.target_macs=0.8", *FAST])
    for f in ("sparse.pt", "pruned.pt", "fused.pt", "onnx/pruned.onnx", "report.md"):
        assert (out / f).is_file(), f
    stages = json.loads((out / "metrics.json").read_text())["stages"]
    sparse = stages["sparse"]
    assert sparse["engine"]["name"] == "auxvar" and sparse["engine"]["options"]["variant"] == "al"
    assert len(sparse["history"]) == 2 and stages["pruned"]["macs"] < sparse["macs"]
    assert all(math.isfinite(h["train_loss"]) for h in sparse["history"])


@pytest.mark.dist
def test_train_consensus_two_agents_non_iid(tmp_path):
    """`resprune train … --engine consensus --nproc 2` with a label-sorted split: every rank
    trains on its shard, the checkpoint is the agents' average and scores what the run reported."""
    out = tmp_path / "cons"
    _run(["train", "quickstart", "--engine", "consensus", "--nproc", "2", "--out", str(out), *TINY,
          "--set", "engine_options.split=label_sorted", "--set", "engine_options.graph=ring"])
    sparse = json.loads((out / "metrics.json").read_text())["stages"]["sparse"]
    assert sparse["engine"]["name"] == "consensus" and sparse["engine"]["options"]["split"] == "label_sorted"
    from resprune.data import DeviceLoader, load_arrays
    from resprune.train import evaluate

    tr, te = load_arrays("digits")
    trl = DeviceLoader(tr, 64, train=True)
    tel = DeviceLoader(te, 512, mean=tuple(trl.mean.flatten().tolist()), std=tuple(trl.std.flatten().tolist()))
    assert evaluate(rp.load(out / "sparse.pt").eval(), tel)[1] == pytest.approx(sparse["test_acc"], abs=1e-6)


def test_consensus_graph_that_does_not_fit_nproc_is_refused_before_launch(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([str(EXE), "-q", "train", "quickstart", "--engine", "consensus", "--nproc", "2",
                          "--out", str(tmp_path / "x"), "--set", "engine_options.graph=torus",
                          "--set", "engine_options.torus_shape=[3,3]"], capture_output=True, text=True,
                         timeout=120, env=env)
    assert res.returncode == 2 and "torus_shape 3x3 needs 9 agents, but there are 2" in res.stderr, res.stderr
    assert not (tmp_path / "x").exists()
