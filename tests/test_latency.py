"""Latency tables and the latency-budgeted pruner (issue 18).

The tool (export/latency_table.py) runs in a Python that cannot import torch or resprune;
its table's signatures are those resprune computes from the torch model; the selection is
checked on tables with made-up costs (no timing asserted anywhere)."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from helpers import blocked_env, randomize_

import resprune as rp
from resprune.config import RecipeError, load_recipe
from resprune.latency import LatencyTable, LatencyTableError, layer_signatures
from resprune.prune import PruneError, removal_units

ROOT = Path(__file__).resolve().parent.parent
TOOL = ROOT / "export" / "latency_table.py"
sys.path.insert(0, str(TOOL.parent))
import latency_table as lt  # noqa: E402

SIZE = (1, 3, 32, 32)


@pytest.fixture(scope="module")
def r20(tmp_path_factory):
    """A randomised ResNet-20, its ONNX export (with sidecar) and a table made without torch."""
    d = tmp_path_factory.mktemp("lat")
    model = randomize_(rp.create_model("resnet20"), seed=1).eval()
    rp.export_onnx(model, d / "r20.onnx", SIZE)
    env = blocked_env(tmp_path_factory.mktemp("shim"))
    out = d / "table.json"
    # --allow-noisy, --max-excess: the checks are tested on made-up timings below; this machine may be loaded
    p = subprocess.run([sys.executable, str(TOOL), d / "r20.onnx", "--batch", "2", "--threads", "1", "--runs", "4",
                        "--blocks", "2", "--warmup", "1", "--allow-noisy", "--max-excess", "1e6", "--json", out],
                       env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    return model, d, json.loads(out.read_text()), p.stdout


def test_tool_runs_without_torch_and_writes_the_table(r20):
    model, d, t, stdout = r20
    assert t["format"] == "resprune-latency-table" and t["format_version"] == 2
    # v2: the 25th percentile of every timed graph, with its spread
    assert t["statistic"]["name"] == "q25" and set(t["spread"]) == {"model", "stripped", *t["micro_graphs_ms"]}
    for v in t["spread"].values():
        assert v["runs"] == 4 and len(v["block_stat_ms"]) == 2 and v["min_ms"] <= v["stat_ms"] <= v["q75_ms"]
    assert t["model"]["latency_ms"] == t["spread"]["model"]["stat_ms"] == t["calibration"]["model_ms"]
    assert t["noise"]["allowed"] and not t["noise"]["penalty_flagged"]
    assert t["noise"]["clean"] == (not t["noise"]["noisy_graphs"])
    assert t["batch"] == 2 and t["threads"] == 1 and t["precision"] == "fp32"
    assert t["runtime"]["name"] == "onnxruntime" and t["runtime"]["version"] == ort.__version__
    assert t["runtime"]["intra_op_threads"] == 1 and t["device"]["cpu_model"]
    assert t["check"]["top1_flips"] == 0 and t["check"]["within_tolerance"] and t["check"]["samples"] == 2
    # the tool's signatures (from the ONNX graph) are resprune's (from the torch model), with counts
    assert t["model"]["convs"] == dict(Counter(layer_signatures(model, SIZE).values()))
    assert set(t["layers"]) == set(t["model"]["convs"])
    assert {e["method"] for e in t["layers"].values()} == {"chain", "lead"}  # stem/transitions lead a chain
    c = t["calibration"]
    assert c["removed_convs"] == 18  # both convs of all 9 blocks
    w = sum(e["weight_bytes"] * e["count"] for e in t["layers"].values())
    assert w == c["weight_bytes"] == 4 * sum(p.numel() for p in rp.fuse(model).parameters() if p.dim() in (1, 4)) - 4 * 10
    penalty = t["penalty_ms_per_mb"] * max(0, w - (t["cache_bytes"] or 0)) / 2**20
    total = t["fixed_ms"] + sum(e["ms"] * e["count"] for e in t["layers"].values()) + penalty
    assert total == pytest.approx(t["model"]["latency_ms"], rel=1e-9)
    assert (t["penalty_ms_per_mb"] > 0) == (c["mode"] == "cache penalty")
    assert "fingerprint check" in stdout and "whole model, measured (q25)" in stdout and "spread: worst" in stdout
    # the table predicts the model it was made from exactly (its own calibration point)
    assert LatencyTable.load(d / "table.json").predict(model) == pytest.approx(t["model"]["latency_ms"], rel=1e-9)


def test_tool_refuses_a_runtime_that_disagrees_with_the_fingerprint(r20, tmp_path):
    _, d, _, _ = r20
    for f in ("r20.onnx", "r20.json"):
        (tmp_path / f).write_bytes((d / f).read_bytes())
    side = json.loads((tmp_path / "r20.json").read_text())
    side["fingerprint"]["logits"] = (np.asarray(side["fingerprint"]["logits"]) + 1.0).tolist()
    (tmp_path / "r20.json").write_text(json.dumps(side))
    p = subprocess.run([sys.executable, str(TOOL), tmp_path / "r20.onnx", "--runs", "2"], capture_output=True, text=True)
    assert p.returncode == 2 and "does not compute the exported model" in p.stderr
    (tmp_path / "r20.json").unlink()
    p = subprocess.run([sys.executable, str(TOOL), tmp_path / "r20.onnx"], capture_output=True, text=True)
    assert p.returncode == 2 and "sidecar missing" in p.stderr


def test_tool_names_a_missing_optional_runtime(r20):
    _, d, _, _ = r20
    p = subprocess.run([sys.executable, str(TOOL), d / "r20.onnx", "--precision", "bf16"], capture_output=True, text=True)
    assert p.returncode == 2 and "onnxruntime runs precision fp32" in p.stderr
    try:
        import openvino  # noqa: F401
        pytest.skip("openvino is installed here")
    except ImportError:
        pass
    p = subprocess.run([sys.executable, str(TOOL), d / "r20.onnx", "--runtime", "openvino"],
                       capture_output=True, text=True)
    assert p.returncode == 2 and "pip install openvino" in p.stderr


@pytest.mark.parametrize("precision", ["fp32", "default"])
def test_openvino_runtime_checks_the_fingerprint_and_names_its_precision(r20, tmp_path, precision):
    """Only where the optional extra is installed: OpenVINO reads the exported ONNX unchanged,
    its logits are checked against the sidecar (fp32 within the tolerance; in its default
    precision the difference and the flips are recorded), and the table names the precision
    OpenVINO reports it ran (bf16 only on a CPU that has it)."""
    ov = pytest.importorskip("openvino")
    _, d, _, _ = r20
    out, shim = tmp_path / "ov.json", tmp_path / "shim"
    shim.mkdir()
    p = subprocess.run([sys.executable, str(TOOL), d / "r20.onnx", "--runtime", "openvino", "--precision", precision,
                        "--threads", "1", "--runs", "2", "--blocks", "1", "--warmup", "0", "--allow-noisy",
                        "--max-excess", "1e6", "--json", out],
                       env=blocked_env(shim),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    t = json.loads(out.read_text())
    r, c = t["runtime"], t["check"]
    assert r["name"] == "openvino" and r["version"] == ov.get_version() and r["precision_requested"] == precision
    assert t["precision"] == r["precision"] in ("fp32", "bf16", "fp16")
    assert c["samples"] == 2 and c["top1_flips"] in (0, 1, 2) and c["max_abs_diff"] >= 0
    if t["precision"] == "fp32":
        assert c["within_tolerance"]
    assert f"openvino {r['version']} {t['precision']}" in p.stdout and "top-1 flips" in p.stdout
    assert LatencyTable.load(out).describe()["precision"] == t["precision"]


def test_micro_graphs_and_stripped_model_are_valid(r20):
    """The chains keep the conv's shape and compute what their nodes say; the stripped model
    (timed for the calibration) is a valid graph without the 18 shape-keeping convs."""
    _, d, t, _ = r20
    g = t["layers"]["Conv 3x3/s1 p1 16->16 @32x32 +Add+Relu"]["geometry"]
    m = lt.chain_graph(g, 2, 3)
    onnx.checker.check_model(m, full_check=True)
    assert Counter(n.op_type for n in m.graph.node) == {"Conv": 3, "Add": 3, "Relu": 3}
    x = np.random.default_rng(0).standard_normal((2, 16, 32, 32)).astype(np.float32)
    y = ort.InferenceSession(m.SerializeToString()).run(None, {"x": x})[0]
    w = [onnx.numpy_helper.to_array(i) for i in m.graph.initializer if i.name.startswith("w")]
    ref = torch.from_numpy(x)
    for k in w:
        ref = torch.relu(torch.nn.functional.conv2d(ref, torch.from_numpy(k.copy()), padding=1) + ref)
    assert np.abs(y - ref.numpy()).max() <= 1e-4 * float(np.abs(y).max())
    lean, gone = lt.stripped(onnx.load(str(d / "r20.onnx")))
    onnx.checker.check_model(lean)
    # every block loses both convs (a transition's stride-2 conv1 dies with its cut branch): the stem is left
    assert len(gone) == 18 and sum(n.op_type == "Conv" for n in lean.graph.node) == 1
    out = ort.InferenceSession(lean.SerializeToString()).run(None, {"input": np.zeros((2, 3, 32, 32), np.float32)})[0]
    assert out.shape == (2, 10)


def test_costs_follow_from_the_medians():
    how = {"A": ("chain", "A"), "X": ("lead", "X", "A")}
    med = {"A ×1": 1.0, "A ×5": 3.0, "X + A ×4": 4.0}
    assert lt.costs(how, med, 5) == {"A": 0.5, "X": 4.0 - 3.0 + 0.5}


# ----------------------------------------------------------------- robust calibration (no timing)

CLEAN_MS = 1.32  # made-up timings below: every conv 0.05 ms, fixed 0.15 ms → per-layer sum 1.10 ms


def _fake_timer(model_ms):
    """A stand-in for ``time_all``: ``×1`` chains 0.10 ms, long chains and lead graphs 0.30 ms
    (every conv costs 0.05 ms), the stripped model 0.20 ms (stem 0.05 + fixed 0.15), the whole
    model ``model_ms(run)`` (exact); 2 blocks of 8 runs, the rest with ±1% deterministic jitter."""
    def timer(rt, files, batch, runs, warmup, blocks):
        jit = [1 + 0.01 * np.sin(k) for k in range(8)]
        base = {k: (0.10 if k.endswith("×1") else 0.20 if k == "stripped" else 0.30) for k in files}
        out = {k: [[base[k] * j for j in jit] for _ in range(2)] for k in files}
        out["model"] = [[model_ms(8 * b + k) for k in range(8)] for b in range(2)]
        return out
    return timer


def _bimodal(run: int) -> float:
    return CLEAN_MS if run % 2 else CLEAN_MS + 25.0  # preempted in every other run (the demo)


def _run_tool(r20, tmp_path, timer, *extra, quiet=True):
    _, d, _, _ = r20
    out = tmp_path / "t.json"
    argv = [str(d / "r20.onnx"), "--threads", "1", "--batch", "2", *(["--quiet"] if quiet else []), "--json", str(out),
            *extra]
    return lt.main(argv, timer=timer), out


def test_spread_uses_a_low_quantile_and_flags_a_bimodal_sample():
    clean = lt.spread([[1.0, 1.01, 0.99, 1.02], [1.0, 0.98, 1.01, 1.0]])
    bimodal = lt.spread([[0.76, 26.0, 0.77, 25.5], [0.75, 26.5, 0.76, 26.0]])
    assert clean["rel_iqr"] < 0.05 and clean["runs"] == 8 and len(clean["block_stat_ms"]) == 2
    assert bimodal["stat_ms"] == pytest.approx(0.76, abs=0.01)  # the undisturbed mode, not the median
    assert bimodal["median_ms"] > 10 and bimodal["rel_iqr"] > 30
    assert lt.noisy({"a": clean, "model": bimodal}, 0.5) == ["model"]
    assert lt.noisy({"a": clean, "model": bimodal}, 100) == []
    msg = lt.noise_message({"model": bimodal}, ["model"], 0.5)
    assert "noisy measurement" in msg and "'model'" in msg and "quieter machine" in msg and "--allow-noisy" in msg


def test_calibration_refuses_or_clamps_an_implausible_penalty():
    """The demo's failure: a whole-model time 13× its per-layer sum would be a 'cache penalty'."""
    g = {"cin": 16, "cout": 16, "kh": 3, "kw": 3, "stride": 1, "pad": 1, "groups": 1, "h": 32, "w": 32,
         "post": "+Relu"}  # 9.3 KB of weights: 200 of them exceed a 1 MB cache
    convs, micro = [dict(g) for _ in range(200)], {lt.signature(g): 0.005}  # per-layer sum 0.1 + 1.0 ms
    gone = list(convs)  # the stripped model keeps none of them: fixed = 0.1 ms
    ok = lt.calibrate(micro, convs, gone, {"model": 1.3, "stripped": 0.1}, 2**20)
    assert ok["mode"] == "cache penalty" and not ok["penalty_flagged"] and ok["excess_ms"] == pytest.approx(0.2)
    assert ok["per_layer_sum_ms"] == pytest.approx(1.1) and ok["excess_ratio"] == pytest.approx(0.2 / 1.1)
    with pytest.raises(lt.NoisyError, match=r"implausible cache penalty.*1\.1 ms.*--allow-noisy"):
        lt.calibrate(micro, convs, gone, {"model": 14.0, "stripped": 0.1}, 2**20)
    clamped = lt.calibrate(micro, convs, gone, {"model": 14.0, "stripped": 0.1}, 2**20, max_excess=0.5, allow=True)
    assert clamped["penalty_flagged"] and clamped["excess_clamped_from_ms"] == pytest.approx(12.9)
    assert clamped["excess_ms"] == pytest.approx(0.55) and clamped["penalty_ms_per_mb"] == pytest.approx(
        0.55 / ((200 * lt.weight_bytes(g) - 2**20) / 2**20))


def test_tool_refuses_a_noisy_measurement_and_writes_nothing(r20, tmp_path, capsys):
    rc, out = _run_tool(r20, tmp_path, _fake_timer(_bimodal))
    err = capsys.readouterr().err
    assert rc == 2 and not out.exists()
    assert "noisy measurement: 1 of" in err and "'model'" in err and "quieter machine" in err and "--allow-noisy" in err
    # a tight but implausibly slow whole model: the penalty check
    rc, out = _run_tool(r20, tmp_path, _fake_timer(lambda run: 3 * 1.10))
    assert rc == 2 and not out.exists() and "implausible cache penalty" in capsys.readouterr().err
    # --allow-noisy: written, the excess clamped to --max-excess × the per-layer sum, and said so
    rc, out = _run_tool(r20, tmp_path, _fake_timer(lambda run: 3 * 1.10), "--allow-noisy", quiet=False)
    t, printed = json.loads(out.read_text()), capsys.readouterr().out
    c = t["calibration"]
    assert rc == 0 and c["penalty_flagged"] and t["noise"]["penalty_flagged"] and not t["noise"]["clean"]
    assert c["excess_ms"] == pytest.approx(0.5 * c["per_layer_sum_ms"]) and c["excess_clamped_from_ms"] > 2
    assert "clamped from" in printed and "penalty clamped" in printed


def test_bimodal_sample_does_not_inflate_the_penalty(r20, tmp_path, monkeypatch):
    """Preempted in half its runs, the whole model gives the same table as undisturbed (the
    25th percentile falls in the fast mode); --allow-noisy keeps it and records the spread."""
    monkeypatch.setattr(lt, "cache_bytes", lambda threads: 512 * 2**10)
    rc, out = _run_tool(r20, tmp_path, _fake_timer(lambda run: CLEAN_MS))
    assert rc == 0
    clean = json.loads(out.read_text())
    assert clean["noise"]["clean"] and clean["noise"]["noisy_graphs"] == []
    assert clean["calibration"]["per_layer_sum_ms"] == pytest.approx(1.10, rel=0.03)
    assert clean["penalty_ms_per_mb"] > 0 and clean["calibration"]["excess_ratio"] < 0.5
    rc, out = _run_tool(r20, tmp_path, _fake_timer(_bimodal), "--allow-noisy")
    assert rc == 0
    noisy = json.loads(out.read_text())
    assert noisy["penalty_ms_per_mb"] == pytest.approx(clean["penalty_ms_per_mb"], rel=1e-9)
    assert noisy["fixed_ms"] == pytest.approx(clean["fixed_ms"])
    assert noisy["noise"]["noisy_graphs"] == ["model"] and not noisy["noise"]["clean"] and noisy["noise"]["allowed"]
    s = noisy["spread"]["model"]
    assert s["median_ms"] > 10 and s["q75_ms"] > 26 and s["rel_iqr"] > 10  # the spread is in the table
    assert LatencyTable.load(out).describe()["clean"] is False
    assert LatencyTable.load(out).describe()["statistic"] == "q25"
    # the median (format 1) would have taken the preempted runs for a cache penalty 10× the clean one
    assert (s["median_ms"] - clean["calibration"]["per_layer_sum_ms"]) > 10 * clean["calibration"]["excess_ms"]


def test_table_versions(tmp_path):
    """Format 1 (medians, no spread) and 2 read alike; another version is a clear error."""
    m = _scaled_r20()
    p = _table(m, tmp_path)
    assert LatencyTable.load(p).describe()["format_version"] == 1
    assert LatencyTable.load(p).describe()["statistic"] == "median" and LatencyTable.load(p).describe()["clean"] is None
    data = json.loads(p.read_text())
    for v, ok in ((2, True), (3, False), (None, False)):
        data["format_version"] = v
        p.write_text(json.dumps(data))
        if ok:
            assert LatencyTable.load(p).predict(m) == pytest.approx(20.0)
        else:
            with pytest.raises(LatencyTableError, match=f"format_version {v!r}; this resprune reads versions 1, 2"):
                LatencyTable.load(p)


def _table(model, tmp_path, ms_per_sig=None, fixed=1.0) -> Path:
    """A table with made-up costs: 1 ms per conv unless given."""
    sigs = Counter(layer_signatures(model, SIZE).values())
    layers = {s: {"ms": (ms_per_sig or {}).get(s, 1.0), "count": n} for s, n in sigs.items()}
    data = {"format": "resprune-latency-table", "format_version": 1, "device": {"cpu_model": "test CPU"},
            "runtime": {"name": "onnxruntime", "version": "x"}, "precision": "fp32", "threads": 1, "batch": 1,
            "fixed_ms": fixed, "layers": layers, "model": {"input_shape": ["batch", 3, 32, 32]}}
    p = tmp_path / "t.json"
    p.write_text(json.dumps(data))
    return p


def _scaled_r20(seed: int = 0):
    m = randomize_(rp.create_model("resnet20"), seed=seed)
    with torch.no_grad():
        for i, u in enumerate(removal_units(m)):
            m.get_submodule(u.name).scale.fill_(0.01 * (i + 1))  # importance grows in module order
    return m


def test_latency_budget_removes_least_important_first(tmp_path):
    m = _scaled_r20()
    table = _table(m, tmp_path)  # 19 convs + fc: 1 + 19 = 20 ms predicted
    assert LatencyTable.load(table).predict(m) == pytest.approx(20.0)
    rep = rp.prune_(m, rp.PruneConfig(target_latency_ms=16.5, latency_table=str(table)))
    lat = rep.latency
    assert lat["predicted_before_ms"] == pytest.approx(20.0) and lat["predicted_after_ms"] <= 16.5
    # by |s| in module order: layer1.0.conv1 (1 conv), layer1.0.conv2 (its other conv),
    # layer1.1.conv1, layer1.1.conv2 → 4 convs gone: 16 ms
    assert rep.removed == ["layer1.0.conv1", "layer1.0.conv2", "layer1.1.conv1", "layer1.1.conv2"]
    assert lat["predicted_after_ms"] == pytest.approx(16.0)
    assert LatencyTable.load(table).predict(m) == pytest.approx(16.0)  # the pruned model, re-predicted
    assert lat["per_stage_after_ms"] == {"fixed": 1.0, "cache": 0.0, "stem": 1.0, "layer1": 2.0, "layer2": 6.0,
                                         "layer3": 6.0}
    assert lat["device"] == "test CPU" and lat["runtime"] == "onnxruntime" and lat["batch"] == 1
    assert "latency budget 16.5 ms" == rep.rule() and "predicted latency 20.000 → 16.000 ms" in rep.summary()
    path = lat["candidates"]["scale"]
    assert path[0] == [rep.macs_before, 20.0] and all(b[1] < a[1] and b[0] < a[0] for a, b in zip(path, path[1:]))


def test_cache_penalty_counts_weights_beyond_the_cache(tmp_path):
    """With ``cache_bytes`` and ``penalty_ms_per_mb`` the prediction adds the penalty for the
    weight bytes beyond the cache, and removing units takes both their ms and their bytes."""
    m = _scaled_r20()
    table = _table(m, tmp_path)
    data = json.loads(table.read_text())
    for e in data["layers"].values():
        e["weight_bytes"] = 2**20  # 1 MB per conv: 19 MB in all
    data.update(cache_bytes=15 * 2**20, penalty_ms_per_mb=0.5)
    table.write_text(json.dumps(data))
    assert LatencyTable.load(table).predict(m) == pytest.approx(20.0 + 0.5 * 4)
    rep = rp.prune_(m, rp.PruneConfig(target_latency_ms=16.5, latency_table=str(table)))
    # 4 convs gone: 15 MB left, within the cache: 1 + 15 = 16 ms (without the penalty's fall
    # the first 3 convs would give 17 + 0.5 = 17.5 ms, still over the target)
    assert len(rep.removed) == 4 and rep.latency["predicted_after_ms"] == pytest.approx(16.0)
    assert rep.latency["per_stage_before_ms"]["cache"] == pytest.approx(2.0)
    assert rep.latency["per_stage_after_ms"]["cache"] == 0.0


def test_scale_per_ms_prefers_expensive_layers(tmp_path):
    m = _scaled_r20()
    costly = [s for s in set(layer_signatures(m, SIZE).values()) if "64->64" in s]
    table = _table(m, tmp_path, {s: 10.0 for s in costly})  # 5 convs × 10 + 14 × 1 + 1 fixed = 65 ms
    rep = rp.prune_(copy.deepcopy(m), rp.PruneConfig(target_latency_ms=50, latency_table=str(table), rank="scale_per_ms"))
    assert rep.removed and all(r.startswith("layer3") for r in rep.removed)
    by_scale = rp.prune_(copy.deepcopy(m), rp.PruneConfig(target_latency_ms=50, latency_table=str(table)))
    assert by_scale.removed[0].startswith("layer1") and len(by_scale.removed) > len(rep.removed)


def test_unreachable_target_is_an_error_and_nothing_is_removed(tmp_path):
    m = _scaled_r20()
    table = _table(m, tmp_path, fixed=5.0)
    before = copy.deepcopy(m.state_dict())
    with pytest.raises(PruneError, match=r"target_latency_ms=8 cannot be met on test CPU .*predicted 9\.000 ms"
                                         r".*Nothing was removed"):
        rp.prune_(m, rp.PruneConfig(target_latency_ms=8, latency_table=str(table)))
    assert m.state_dict().keys() == before.keys() and len(removal_units(m)) == 16


def test_bad_configs_and_tables_are_clear_errors(tmp_path):
    m = _scaled_r20()
    with pytest.raises(PruneError, match="needs latency_table"):
        rp.PruneConfig(target_latency_ms=3.0)
    with pytest.raises(PruneError, match="exactly one of"):
        rp.PruneConfig(target_latency_ms=3.0, target_macs=0.5, latency_table="t.json")
    with pytest.raises(PruneError, match="finite number of ms > 0"):
        rp.PruneConfig(target_latency_ms=-1, latency_table="t.json")
    with pytest.raises(LatencyTableError, match="no such latency table"):
        rp.prune_(m, rp.PruneConfig(target_latency_ms=3.0, latency_table=str(tmp_path / "none.json")))
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(LatencyTableError, match="not a latency table"):
        LatencyTable.load(tmp_path / "x.json")
    other = _table(m, tmp_path)
    data = json.loads(other.read_text())
    data["layers"].pop(next(iter(data["layers"])))
    other.write_text(json.dumps(data))
    with pytest.raises(LatencyTableError, match="no entry for 1 conv signature"):
        rp.prune_(m, rp.PruneConfig(target_latency_ms=3.0, latency_table=str(other)))


def test_recipe_and_overrides_switch_rules(tmp_path):
    r = load_recipe("quickstart", ["prune.target_latency_ms=2.5", "prune.latency_table=t.json"])
    assert r.prune.threshold is None and r.prune.target_latency_ms == 2.5 and r.prune.latency_table == "t.json"
    c = r.prune.to_prune_config(SIZE)
    assert c.target_latency_ms == 2.5 and c.latency_table == "t.json"
    with pytest.raises(RecipeError, match="exactly one of"):
        load_recipe("quickstart", ["prune.target_latency_ms=2.5", "prune.latency_table=t.json", "prune.target_macs=0.5"])
    with pytest.raises(RecipeError, match="needs latency_table"):
        load_recipe("quickstart", ["prune.target_latency_ms=2.5"])
    assert load_recipe("quickstart", ["prune.target_macs=0.5"]).prune.target_latency_ms is None
