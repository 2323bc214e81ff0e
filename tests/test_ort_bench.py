"""export/ort_bench.py: runs without torch or resprune, writes its JSON, times interleaved.

The ONNX models here are built with onnx.helper (no torch export), so this file also shows
that the tool needs nothing from the training side. Timings are real but only their
structure is asserted (min <= median <= p90, positive), never their values.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import blocked_env
from onnx import TensorProto, helper, numpy_helper

TOOL = Path(__file__).resolve().parents[1] / "export" / "ort_bench.py"


def tiny_cnn(path: Path, channels: int, batch: int | str = "batch") -> Path:
    """Conv(3→channels, 3×3) → Relu → GlobalAveragePool → Flatten on 3×16×16 inputs."""
    rng = np.random.default_rng(channels)
    w = numpy_helper.from_array(rng.standard_normal((channels, 3, 3, 3)).astype(np.float32), "w")
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["p"]),
        helper.make_node("Flatten", ["p"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, channels])],
        initializer=[w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench")
    return tiny_cnn(d / "small.onnx", 4), tiny_cnn(d / "big.onnx", 32), tiny_cnn(d / "fixed.onnx", 4, batch=2)


@pytest.fixture(scope="module")
def no_torch_env(tmp_path_factory):
    """Environment whose Python cannot import torch or resprune (fake failing packages first)."""
    return blocked_env(tmp_path_factory.mktemp("shim"))


def run_tool(args, env, cwd):
    return subprocess.run([sys.executable, str(TOOL), *map(str, args)], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def test_runs_without_torch_and_writes_json(models, no_torch_env, tmp_path):
    small, big, fixed = models
    out = tmp_path / "res" / "bench.json"
    p = run_tool([small, big, fixed, "--batch", 1, 4, "--runs", 7, "--warmup", 2, "--threads", 1,
                  "--json", out], no_torch_env, tmp_path)
    assert p.returncode == 0, p.stderr
    res = json.loads(out.read_text())
    assert [m["name"] for m in res["models"]] == ["small", "big", "fixed"]
    # the fixed-batch model (batch 2) runs at neither 1 nor 4: no rows, a note in the table
    assert {(r["model"], r["batch"]) for r in res["results"]} == {
        ("small", 1), ("big", 1), ("small", 4), ("big", 4)}
    for r in res["results"]:
        assert r["runs"] == 7 and 0 < r["min_ms"] <= r["q25_ms"] <= r["median_ms"] <= r["q75_ms"] <= r["p90_ms"]
        assert r["throughput_per_s"] == pytest.approx(1e3 * r["batch"] / r["median_ms"])
        if sys.platform.startswith("linux"):
            assert r["peak_rss_mb"] > 10 and r["peak_rss_delta_mb"] >= 0
    assert all(r["ratio_to_first"] == 1.0 and r["ratio_interval"] is None for r in res["results"] if r["model"] == "small")
    for r in (r for r in res["results"] if r["model"] == "big"):
        lo, hi = r["ratio_interval"]
        assert lo < r["ratio_to_first"] < hi and r["within_noise"] == (lo <= 1 <= hi)
    d, s = res["device"], res["settings"]
    assert d["cpu_model"] and d["logical_cpus"] >= 1 and d["onnxruntime"]
    assert s["interleaved"] and s["threads"] == 1 and s["opt_level_ort"] == "ORT_ENABLE_ALL"
    assert s["intra_op_threads"] == 1 and s["inter_op_threads"] == 1 and s["noise_floor"] == 0.05
    assert res["models"][0]["providers_used"] == ["CPUExecutionProvider"]
    assert "median ms" in p.stdout and "skipped" in p.stdout and "interleaved" in p.stdout
    assert "IQR ms" in p.stdout and "noise interval" in p.stdout


def test_identical_files_are_within_noise_and_threads_are_pinned(models, tmp_path):
    """Two byte-identical files timed side by side: at every batch size the ratio's noise
    interval contains 1 (asserted on the interval, not on a time). A net with 8× fewer
    channels is outside it at batch 16. Threads 0 resolve to an explicit, recorded count."""
    small, big, _ = models
    twin = tmp_path / "twin.onnx"
    shutil.copy(big, twin)
    out = tmp_path / "same.json"
    p = run_tool([big, twin, small, "--batch", 1, 16, "--runs", 30, "--warmup", 3, "--threads", 1, "--no-memory",
                  "--quiet", "--json", out], os.environ, tmp_path)
    assert p.returncode == 0, p.stderr
    res = json.loads(out.read_text())
    rows = {(r["model"], r["batch"]): r for r in res["results"]}
    for b in (1, 16):
        lo, hi = rows[("twin", b)]["ratio_interval"]
        assert lo <= 1.0 <= hi and rows[("twin", b)]["within_noise"] is True
    assert rows[("small", 16)]["within_noise"] is False and rows[("small", 16)]["ratio_interval"][1] < 1
    assert res["settings"]["blocks"] == 5
    p = run_tool([big, "--runs", 1, "--warmup", 0, "--no-memory", "--quiet", "--json", out], os.environ, tmp_path)
    s = json.loads(out.read_text())["settings"]
    assert p.returncode == 0 and s["threads"] == s["intra_op_threads"] >= 1 and s["inter_op_threads"] == 1


def test_errors_are_clear(models, no_torch_env, tmp_path):
    small, _, _ = models
    p = run_tool([small, "--providers", "NoSuchExecutionProvider", "--no-memory"], no_torch_env, tmp_path)
    assert p.returncode == 2 and "not available" in p.stderr and "Traceback" not in p.stderr
    p = run_tool([tmp_path / "missing.onnx", "--no-memory"], no_torch_env, tmp_path)
    assert p.returncode == 2 and "no such file" in p.stderr
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not an onnx file")
    p = run_tool([bad, "--no-memory"], no_torch_env, tmp_path)
    assert p.returncode == 2 and "cannot load" in p.stderr


def test_imports_only_stdlib_numpy_onnxruntime():
    tree = ast.parse(TOOL.read_text())
    mods = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            mods |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            mods.add(node.module.split(".")[0])
    third_party = {m for m in mods if m not in sys.stdlib_module_names and m != "__future__"}
    assert third_party == {"numpy", "onnxruntime"}


def _load_tool():
    spec = importlib.util.spec_from_file_location("ort_bench", TOOL)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_timing_is_interleaved_and_alternates_order():
    tool = _load_tool()
    calls = []

    class FakeSession:
        def __init__(self, name):
            self.name = name

        def run(self, _, feed):
            calls.append(self.name)

    sessions = [FakeSession("A"), FakeSession("B"), FakeSession("C")]
    times = tool.time_interleaved(sessions, [{}, {}, None], runs=4, warmup=1)
    assert calls == ["A", "B"] + ["A", "B", "B", "A", "A", "B", "B", "A"]  # warm-up, then rounds
    assert [len(t) for t in times] == [4, 4, 0]
    st = tool.stats(8, [0.001, 0.002, 0.003, 0.010])
    assert st["median_ms"] == pytest.approx(2.5) and st["min_ms"] == pytest.approx(1.0)
    assert st["q25_ms"] == pytest.approx(1.75) and st["q75_ms"] == pytest.approx(4.75)
    assert st["p90_ms"] == pytest.approx(np.percentile([1, 2, 3, 10], 90))
    assert st["throughput_per_s"] == pytest.approx(8 / 0.0025)


def test_ratio_interval_pairs_rounds_resamples_blocks_and_adds_the_floor():
    """Rounds resampled in pairs: a slow round that slowed both models does not widen the
    interval of a constant ratio; blocks of fresh sessions that disagree do; the floor widens
    it on each side."""
    tool = _load_tool()
    rng = np.random.default_rng(1)
    ref = [list(rng.uniform(1, 3, 8)) for _ in range(5)]  # very uneven rounds, 5 blocks
    half = [[0.5 * t for t in blk] for blk in ref]
    assert tool.ratio_interval(ref, half, floor=0.0) == pytest.approx([0.5, 0.5])
    assert tool.ratio_interval(ref, half, floor=0.05) == pytest.approx([0.45, 0.55])
    sessions = [[f * t for t in blk] for f, blk in zip((0.8, 0.9, 1.0, 1.1, 1.2), ref)]  # per-session offsets
    lo, hi = tool.ratio_interval(ref, sessions, floor=0.0)
    assert lo < 0.95 and hi > 1.05
