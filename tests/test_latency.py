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
    p = subprocess.run([sys.executable, str(TOOL), d / "r20.onnx", "--batch", "2", "--threads", "1", "--runs", "4",
                        "--blocks", "2", "--warmup", "1", "--json", out], env=env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr
    return model, d, json.loads(out.read_text()), p.stdout


def test_tool_runs_without_torch_and_writes_the_table(r20):
    model, d, t, stdout = r20
    assert t["format"] == "resprune-latency-table" and t["format_version"] == 1
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
    assert "fingerprint check" in stdout and "whole model, measured" in stdout
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
    try:
        import openvino  # noqa: F401
        pytest.skip("openvino is installed here")
    except ImportError:
        pass
    _, d, _, _ = r20
    p = subprocess.run([sys.executable, str(TOOL), d / "r20.onnx", "--runtime", "openvino"],
                       capture_output=True, text=True)
    assert p.returncode == 2 and "pip install openvino" in p.stderr
    p = subprocess.run([sys.executable, str(TOOL), d / "r20.onnx", "--precision", "bf16"], capture_output=True, text=True)
    assert p.returncode == 2 and "onnxruntime runs precision fp32" in p.stderr


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
