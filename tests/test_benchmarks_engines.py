"""benchmarks/engines.py: Part A's dry run (--quick, torchrun) reports every engine, positive
numbers and the cost models' errors; Part B's table, plot, FLOP count and the saved-tensor
tracker work on synthetic inputs (no training)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import resprune as rp

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "engines.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_engines", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
@pytest.mark.dist
def test_part_a_quick(tmp_path):
    """`--part time --quick` under torchrun (P = 1, 2): every engine measured, memory, bytes
    and saved activations positive, each model's error at P = 2 reported, P = 8 modelled."""
    out = tmp_path / "engines_time.md"
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(SCRIPT.parents[1]), os.environ.get("PYTHONPATH", "")])}
    res = subprocess.run([sys.executable, str(SCRIPT), "--part", "time", "--quick", "--out", str(out)],
                         capture_output=True, text=True, timeout=900, env=env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    d = json.loads(out.with_suffix(".json").read_text())
    bench = _bench()
    by = {(r["engine"], r["P"]): r for r in d["summary"]}
    assert {e for e, P in by if P == 1} == set(bench.ENGINES)
    assert {e for e, P in by if P == 2} == set(bench.ENGINES) - {"serial"}
    for (e, P), r in by.items():
        assert r["median_s"] > 0 and r["model_s"] > 0, (e, P)
        assert len(r["memory_total_per_rank"]) == P and min(r["memory_total_per_rank"]) > 0
        assert min(r["saved_peak_per_rank"]) > 0
        if P == 2:  # every stage engine sends, and says so exactly
            assert sum(r["engine_sent_bytes_per_rank"]) > 0
            assert r["engine_sent_bytes_per_rank"] == r["p2p_bytes_per_rank"], e
    for e in set(bench.ENGINES) - {"serial"}:
        err = d["model_errors"][e]["2"]
        assert math.isfinite(err["rho1"]) and err["rho_measured"] is not None
    assert {r["engine"] for r in d["extrapolation"] if r["P"] == 8} == set(bench.ENGINES) - {"serial"}
    assert all(r["model_s"] > 0 for r in d["extrapolation"])
    md = out.read_text()
    for s in ("Date:", "torch", "command:", "Runs:", "MODEL", "error at P = 2", "depth 12"):
        assert s in md, s


def _synthetic_runs():
    runs = []
    accs = {("backprop", 1): [60.0, 62.0, 61.0], ("greedy", 2): [55.0, 57.0, 56.0], ("greedy", 4): [50.0, 50.0, 53.0],
            ("overlap", 2): [58.0, 58.5, 59.0], ("overlap", 4): [52.0, 54.0, 53.0]}
    flops = {("backprop", 1): [3e9], ("greedy", 2): [1.4e9, 1.5e9], ("greedy", 4): [0.7e9, 0.8e9, 0.75e9, 0.7e9],
             ("overlap", 2): [1.4e9, 1.7e9], ("overlap", 4): [0.7e9, 0.9e9, 0.85e9, 0.8e9]}
    for (v, K), acc in accs.items():
        for seed, a in enumerate(acc):
            runs.append({"variant": v, "K": K, "seed": seed, "test_acc": a, "steps": 100, "flops_per_rank": flops[v, K],
                         "wall_s": 10.0, "train_loss_end": 1.0})
    return runs


def test_part_b_table_and_plot(tmp_path):
    bench = _bench()
    lines, rows = bench.local_accuracy_table(_synthetic_runs()[::-1])  # order of the input does not matter
    assert [r["label"] for r in rows] == ["backprop (serial)", "greedy K = 2", "greedy K = 4", "overlap K = 2",
                                          "overlap K = 4"]
    assert len(lines) == 2 + len(rows) and all(ln.startswith("|") for ln in lines)
    g4 = rows[2]
    assert g4["acc_mean"] == pytest.approx(51.0) and g4["acc_std"] == pytest.approx(math.sqrt(3.0))
    assert (g4["acc_min"], g4["acc_max"], g4["seeds"]) == (50.0, 53.0, [0, 1, 2])
    assert g4["flops_step_critical"] == 0.8e9 and g4["flops_step_total"] == pytest.approx(2.95e9)
    assert g4["rel_critical"] == pytest.approx(0.8 / 3) and rows[0]["rel_total"] == 1.0
    assert g4["train_tflop_critical"] == pytest.approx(0.8e9 * 100 / 1e12)
    assert g4["acc_vs_backprop"] == pytest.approx(51.0 - 61.0)
    assert "51.00 ± 1.73" in lines[4]
    png = tmp_path / "p.png"
    bench.plot_local_accuracy(rows, png, "synthetic")
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_step_flops_follow_the_chunks():
    """Serial backprop counts the whole net; greedy chunks together skip the input gradient
    at the chunk boundary (and add a small head); the overlapping rank 1 also trains a
    replica of rank 0's last layer."""
    bench = _bench()
    torch.manual_seed(0)
    model = rp.create_model("resconv_chain", depth=6, width=4)
    x, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    n = len(model.layer_sequence())
    serial = bench.step_flops(model, [0, n], 0, x, y)
    greedy = bench.step_flops(model, [0, 4, n], 0, x, y)
    overlap = bench.step_flops(model, [0, 4, n], 1, x, y)
    assert len(serial) == 1 and len(greedy) == len(overlap) == 2
    assert greedy[0] == overlap[0] and overlap[1] > greedy[1]
    assert 0.5 * serial[0] < sum(greedy) < 1.05 * serial[0] and max(greedy) < serial[0]


def test_saved_tensor_peak_counts_activations_once():
    bench = _bench()
    w = torch.nn.Parameter(torch.randn(64, 64))
    x = torch.randn(32, 64)
    with bench.SavedTensorPeak([w]) as tr:
        h = torch.relu(x @ w)  # mm saves x (w excluded); relu saves its output
        loss = (h @ w).sum()  # saves h (the same storage as relu's output)
        loss.backward()
        del loss, h
    assert tr.peak == 2 * 32 * 64 * 4 and tr.live == 0


def test_cost_models_reproduce_their_fit_at_one_rank():
    """Every cost model reproduces its own P = 1 fit (a self-consistency check of the formulas)."""
    bench = _bench()
    a = bench.parse_args(["--part", "time", "--quick"])
    net = bench.NetFacts(a)
    ell = [1e-3] * len(net.names)
    for name in ("pipeline-1f1b", "local-greedy", "local-overlap"):
        fit = {"T1": 0.05, "hop": {"latency_s": 1e-4, "s_per_byte": 1e-9}, "fwd": sum(ell), "r": 2.0,
               "o": 0.05 - 3 * sum(ell), "ell": ell, "M": a.microbatches}
        assert bench.predict(name, fit, net, 1) == pytest.approx(0.05)
        two = bench.predict(name, fit, net, 2, bounds=net.bounds(2))
        assert 0.025 < two < 0.05, name
