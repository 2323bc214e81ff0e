#!/usr/bin/env python3
"""Per-layer latency table of an exported resprune model on the device where this runs.

Usage:
    python latency_table.py MODEL.onnx --batch 1 --threads 1 [--runtime openvino --precision bf16] \\
        --json table.json

For every distinct fused convolution of the model (its *signature*: kernel, stride, padding,
channels, input size and what follows it: ``+Relu``, or ``+Add+Relu`` for the last conv of a
residual block) the tool builds micro-graphs with the onnx helper API, random weights, and
times them on the chosen runtime:

* a conv that keeps its shape (C→C, stride 1) is timed as a chain of 1 and of ``--chain`` M
  copies (``+Add+Relu``: ``x ← Relu(Conv(x) + x)``); its cost is the slope,
  ``(t_M − t_1) / (M − 1)``, free of the per-run overhead of a session;
* another conv X (a stem or a stride-2 transition) leads a chain of M − 1 shape-keeping
  convs Y at its output size: ``cost(X) = t(X, Y×(M−1)) − t(Y×M) + cost(Y)``.

The whole model and the model *stripped* of its shape-keeping convs (bypassed in the graph;
timed, never used for its values) run in the same interleaved rounds (blocks of fresh
sessions, threads pinned, no spin-waiting: the rules of ``ort_bench.py``). The stripped
model gives ``fixed_ms``, what is not in the convolutions (input/output copies, pooling, the
classifier, the option-A shortcuts, the session's own overhead); the whole model gives
``penalty_ms_per_mb``, what it costs beyond its per-layer sum, per MB of conv weights
beyond the L2 cache of the cores that run it (``cache_bytes``; weights that do not fit are
fetched again from the next level of memory at every run, which a short chain, whose
weights fit, does not show). A model's predicted latency is::

    fixed_ms + Σ ms(signature) + penalty_ms_per_mb · max(0, weight MB − cache MB)

over its convolutions, so a table made from a ResNet-56 also predicts a pruned ResNet-56
or a ResNet-110 (same signatures) on the same device.

Every graph is timed in ``--runs`` runs and summarised by its 25th percentile (load noise
only adds time; see ``STAT_Q``), and the tool refuses (exit status 2, no table written) a
measurement too noisy to trust: a graph whose interquartile range exceeds ``--max-spread``
(0.5) of its statistic, or a whole model more than ``--max-excess`` (0.5) over its per-layer
sum (a cache penalty that large is likelier load than cache). ``--allow-noisy`` writes the
table anyway, records the spread, and clamps the penalty to that bound. The spread of every
graph is in the table (``spread``, ``noise``; format version 2).

Before timing, the runtime's logits on the sidecar's fingerprint input (``MODEL.json``
beside ``MODEL.onnx``) are compared with the recorded ones: in fp32 a difference over the
sidecar's tolerance is an error (exit status 2); in reduced precision (OpenVINO bf16/fp16)
the difference and the top-1 flips are recorded, not refused.

Runtimes: ``onnxruntime`` (always; fp32), ``openvino`` where it is installed (fp32, bf16,
fp16 via its inference precision hint, or ``default``: the plugin's own choice). The table
records the precision the runtime reports it runs (OpenVINO falls back to f32 on a CPU
without bf16/fp16 support: a warning, and ``runtime.precision_requested`` keeps the request).
Imports: the standard library, numpy, onnx, onnxruntime (and openvino when asked for), and
``ort_bench.py`` next to this file; copy both files to the device (export/README.md).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ort_bench as ob  # noqa: E402  (the file next to this one)

TABLE_FORMAT = "resprune-latency-table"
TABLE_VERSION = 2  # 2: low-quantile statistic, spread per timed graph, noise and penalty checks
DEFAULT_CHAIN = 5
OPSET = 17
PRECISIONS = {"onnxruntime": ("fp32",), "openvino": ("fp32", "bf16", "fp16", "default")}
# The statistic of every timed graph (micro-graphs and both calibration points): the 25th
# percentile of all its runs, pooled over the interleaved blocks. Why a low quantile and not
# the median: load noise is one-sided (a run that is preempted, or whose caches another
# process evicted, is slower, never faster), so the fast end of the distribution is the
# undisturbed cost; a median is moved as soon as half the runs are disturbed (the demo in
# benchmarks/results/latency_budget_demo.md: quartiles 0.76 / 26 ms, median 10.9 ms). Why not
# the minimum: it rests on one run, and as an extreme value it keeps falling as --runs grows,
# so tables made with different run counts would disagree; the 25th percentile is stable in
# the run count and still unmoved while fewer than 3 in 4 runs are disturbed.
STAT_Q = 25
# The noise check: a timed graph whose interquartile range exceeds this fraction of its
# statistic is refused (--max-spread; --allow-noisy records it instead).
MAX_SPREAD = 0.5
# The penalty check: the whole model may take at most this fraction more than its per-layer
# sum (fixed part + Σ conv costs) before the excess is blamed on the cache (--max-excess).
MAX_EXCESS = 0.5


class TableError(RuntimeError):
    """Bad input or a runtime that does not reproduce the model (printed without a traceback)."""


class NoisyError(TableError):
    """A measurement too noisy to make a table from (refused unless --allow-noisy)."""


# --------------------------------------------------------------------------- signatures


def signature(g: dict) -> str:
    """The key of a fused conv in the table (resprune.latency.conv_signature writes the same)."""
    groups = f" g{g['groups']}" if g["groups"] != 1 else ""
    post = f" {g['post']}" if g["post"] else ""
    return (f"Conv {g['kh']}x{g['kw']}/s{g['stride']} p{g['pad']}{groups} {g['cin']}->{g['cout']} "
            f"@{g['h']}x{g['w']}{post}")


def out_size(g: dict) -> tuple[int, int]:
    return ((g["h"] + 2 * g["pad"] - g["kh"]) // g["stride"] + 1,
            (g["w"] + 2 * g["pad"] - g["kw"]) // g["stride"] + 1)


def keeps_shape(g: dict) -> bool:
    return g["cin"] == g["cout"] and out_size(g) == (g["h"], g["w"])


def _attrs(node) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _post(node, consumers) -> str:
    nxt = consumers.get(node.output[0], [])
    if len(nxt) == 1 and nxt[0].op_type == "Relu":
        return "+Relu"
    if len(nxt) == 1 and nxt[0].op_type == "Add":
        after = consumers.get(nxt[0].output[0], [])
        if len(after) == 1 and after[0].op_type == "Relu":
            return "+Add+Relu"
    return ""


def model_convs(proto) -> list[dict]:
    """The geometry of every Conv node of an ONNX model, in graph order."""
    graph = onnx.shape_inference.infer_shapes(proto).graph
    shapes = {v.name: [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
              for v in [*graph.value_info, *graph.input, *graph.output]}
    weights = {i.name: list(i.dims) for i in graph.initializer}
    consumers = defaultdict(list)
    for n in graph.node:
        for i in n.input:
            consumers[i].append(n)
    out = []
    for n in graph.node:
        if n.op_type != "Conv":
            continue
        a = _attrs(n)
        w, x = weights.get(n.input[1]), shapes.get(n.input[0])
        pads, strides = list(a.get("pads", [0, 0, 0, 0])), list(a.get("strides", [1, 1]))
        if w is None or x is None or None in x[1:] or len(w) != 4:
            raise TableError(f"Conv node {n.name!r}: weight or input shape unknown (only 2-D convs with "
                             "constant weights and a static input size are supported)")
        if a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET") or len(set(pads)) != 1 or len(set(strides)) != 1:
            raise TableError(f"Conv node {n.name!r}: only symmetric explicit padding and equal strides are "
                             f"supported (pads {pads}, strides {strides})")
        groups = int(a.get("group", 1))
        out.append({"cin": w[1] * groups, "cout": w[0], "kh": w[2], "kw": w[3], "stride": strides[0],
                    "pad": pads[0], "groups": groups, "h": x[2], "w": x[3], "post": _post(n, consumers)})
    return out


# --------------------------------------------------------------------------- micro-graphs


def _conv(nodes: list, inits: list, g: dict, cur: str, k: int, rng) -> str:
    fan_in = g["cin"] // g["groups"] * g["kh"] * g["kw"]
    w = (rng.standard_normal((g["cout"], g["cin"] // g["groups"], g["kh"], g["kw"])) * np.sqrt(2 / fan_in))
    inits += [numpy_helper.from_array(w.astype(np.float32), f"w{k}"),
              numpy_helper.from_array(np.zeros(g["cout"], np.float32), f"b{k}")]
    nodes.append(helper.make_node("Conv", [cur, f"w{k}", f"b{k}"], [f"c{k}"], kernel_shape=[g["kh"], g["kw"]],
                                  strides=[g["stride"]] * 2, pads=[g["pad"]] * 4, group=g["groups"]))
    y = f"c{k}"
    if g["post"] == "+Add+Relu" and keeps_shape(g):
        nodes.append(helper.make_node("Add", [y, cur], [f"a{k}"]))
        y = f"a{k}"
    if g["post"]:
        nodes.append(helper.make_node("Relu", [y], [f"r{k}"]))
        y = f"r{k}"
    return y


def chain_graph(g: dict, batch: int, n: int, lead: dict | None = None, seed: int = 0):
    """``lead`` (if any) followed by ``n`` copies of ``g``, as an ONNX model with a fixed batch."""
    rng = np.random.default_rng(seed)
    first = lead or g
    nodes, inits, cur = [], [], "x"
    for k, geom in enumerate(([lead] if lead else []) + [g] * n):
        cur = _conv(nodes, inits, geom, cur, k, rng)
    last = g if n else first
    ho, wo = out_size(last)
    graph = helper.make_graph(
        nodes, "latency_probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, first["cin"], first["h"], first["w"]])],
        [helper.make_tensor_value_info(cur, TensorProto.FLOAT, [batch, last["cout"], ho, wo])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8  # readable by onnxruntime >= 1.10 and OpenVINO
    return model


def follower(g: dict) -> dict:
    """The shape-keeping conv at ``g``'s output that times a conv which changes the shape."""
    ho, wo = out_size(g)
    return {"cin": g["cout"], "cout": g["cout"], "kh": 3, "kw": 3, "stride": 1, "pad": 1, "groups": 1,
            "h": ho, "w": wo, "post": "+Relu"}


def plan(convs: list[dict], chain: int) -> tuple[dict, dict]:
    """Micro-graphs to time (label → (geometry, n, lead)) and, per signature, how its cost
    follows from their statistics (``("chain", sig)`` or ``("lead", sig, follower sig)``)."""
    graphs, how = {}, {}
    for g in {signature(c): c for c in convs}.values():
        sig = signature(g)
        if keeps_shape(g):
            graphs[f"{sig} ×1"], graphs[f"{sig} ×{chain}"] = (g, 1, None), (g, chain, None)
            how[sig] = ("chain", sig)
        else:
            y = follower(g)
            ys = signature(y)
            graphs[f"{ys} ×1"], graphs[f"{ys} ×{chain}"] = (y, 1, None), (y, chain, None)
            graphs[f"{sig} + {ys} ×{chain - 1}"] = (y, chain - 1, g)
            how[sig] = ("lead", sig, ys)
    return graphs, how


def costs(how: dict, med: dict, chain: int) -> dict[str, float]:
    slope = {}

    def chain_cost(s: str) -> float:
        if s not in slope:
            slope[s] = (med[f"{s} ×{chain}"] - med[f"{s} ×1"]) / (chain - 1)
        return slope[s]

    out = {}
    for sig, h in how.items():
        if h[0] == "chain":
            out[sig] = chain_cost(sig)
        else:
            out[sig] = med[f"{sig} + {h[2]} ×{chain - 1}"] - med[f"{h[2]} ×{chain}"] + chain_cost(h[2])
    return out


# --------------------------------------------------------------------------- calibration


def _bypass(n, geom, consumers) -> tuple[str, str, list] | None:
    """(tensor that disappears, tensor that replaces it, nodes that go) for a shape-keeping
    conv whose removal leaves a valid graph: Conv→Relu becomes its input, Conv→Add→Relu
    the Add's other input (a residual branch without its block)."""
    if not keeps_shape(geom) or geom["post"] not in ("+Relu", "+Add+Relu"):
        return None
    first = consumers[n.output[0]][0]
    if geom["post"] == "+Relu":
        return first.output[0], n.input[0], [n, first]
    relu = consumers[first.output[0]][0]
    other = first.input[1] if first.input[0] == n.output[0] else first.input[0]
    return relu.output[0], other, [n, first, relu]


def stripped(proto) -> tuple[object, list[dict]]:
    """The model without its shape-keeping convs (each ``+Relu`` conv bypassed, each residual
    branch ending in a ``+Add+Relu`` conv cut, then dead nodes dropped), and the geometry of
    every conv that went. Only timed, never run for its values."""
    graph = proto.graph
    every = list(graph.node)  # one Python object per node for the whole function (ids stay valid)
    geoms = dict(zip([id(n) for n in every if n.op_type == "Conv"], model_convs(proto)))
    consumers = defaultdict(list)
    for n in every:
        for i in n.input:
            consumers[i].append(n)
    outputs = {o.name for o in graph.output}
    rename, drop = {}, set()
    for n in every:
        b = _bypass(n, geoms[id(n)], consumers) if n.op_type == "Conv" else None
        if b and b[0] not in outputs:
            rename[b[0]] = b[1]
            drop |= {id(x) for x in b[2]}

    def resolve(t: str) -> str:
        while t in rename:
            t = rename[t]
        return t

    nodes = [n for n in every if id(n) not in drop]
    for n in nodes:
        n.input[:] = [resolve(i) for i in n.input]
    while True:  # drop nodes nothing reads any more
        used = {i for n in nodes for i in n.input} | outputs
        live = [n for n in nodes if any(o in used for o in n.output)]
        if len(live) == len(nodes):
            break
        nodes = live
    kept = {id(n) for n in nodes}
    gone = [geoms[id(n)] for n in every if n.op_type == "Conv" and id(n) not in kept]
    used = {i for n in nodes for i in n.input}
    inits = [i for i in graph.initializer if i.name in used]
    g = helper.make_graph(nodes, graph.name, graph.input, graph.output, inits)
    model = helper.make_model(g, opset_imports=proto.opset_import)
    model.ir_version = proto.ir_version
    return model, gone


# --------------------------------------------------------------------------- runtimes


class _OVSession:
    """An OpenVINO compiled model with onnxruntime's ``run(None, feed)`` call."""

    def __init__(self, compiled):
        self.request = compiled.create_infer_request()
        self.n_out = len(compiled.outputs)

    def run(self, _names, feed: dict) -> list:
        self.request.infer(feed)
        return [self.request.get_output_tensor(i).data.copy() for i in range(self.n_out)]


class Runtime:
    """onnxruntime or OpenVINO on the CPU, with pinned threads and a precision."""

    def __init__(self, name: str, threads: int, precision: str, opt_level: str = "all"):
        if name not in PRECISIONS:
            raise TableError(f"--runtime {name!r} is unknown; choose one of {', '.join(PRECISIONS)}")
        if precision not in PRECISIONS[name]:
            raise TableError(f"{name} runs precision {', '.join(PRECISIONS[name])}, not {precision!r}")
        self.name, self.threads, self.precision, self.opt_level = name, threads, precision, opt_level
        if name == "openvino":
            try:
                import openvino as ov
            except ImportError as exc:
                raise TableError("--runtime openvino: the openvino package is not installed "
                                 "(pip install openvino)") from exc
            self.ov, self.core, self.version = ov, ov.Core(), ov.get_version()
        else:
            self.version = ob.ort.__version__

    def session(self, path: str, batch: int):
        if self.name == "onnxruntime":
            return ob.make_session(path, self.threads, ["CPUExecutionProvider"], self.opt_level)
        model = self.core.read_model(path)
        shape = list(model.inputs[0].get_partial_shape().to_shape()) if model.inputs[0].get_partial_shape().is_static \
            else None
        if shape is None or shape[0] != batch:
            model.reshape({model.inputs[0].get_any_name(): [batch, *_static_dims(path)]})
        config = {"INFERENCE_NUM_THREADS": self.threads, "PERFORMANCE_HINT": "LATENCY"}
        if self.precision != "default":  # "default": the plugin's own choice (bf16 where the CPU has it)
            config["INFERENCE_PRECISION_HINT"] = {"fp32": "f32", "bf16": "bf16", "fp16": "f16"}[self.precision]
        compiled = self.core.compile_model(model, "CPU", config)
        # what the plugin runs: it falls back to f32, silently, on a CPU without bf16/fp16 support
        hint = str(compiled.get_property("INFERENCE_PRECISION_HINT"))
        self.effective = _OV_NAMES.get(hint.lower(), hint)
        return _OVSession(compiled)

    def effective_precision(self) -> str:
        """The precision the runtime runs (known after the first session)."""
        return getattr(self, "effective", self.precision)

    def capabilities(self) -> list[str] | None:
        if self.name != "openvino":
            return None
        try:
            return [str(c) for c in self.core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")]
        except Exception:  # noqa: BLE001  (an optional property of the plugin)
            return None

    def describe(self) -> dict:
        return {"name": self.name, "version": self.version, "precision": self.effective_precision(),
                "precision_requested": self.precision, "cpu_capabilities": self.capabilities(),
                "intra_op_threads": self.threads, "inter_op_threads": ob.INTER_OP_THREADS,
                "opt_level": self.opt_level if self.name == "onnxruntime" else None}


_OV_NAMES = {"<type: 'float32'>": "fp32", "f32": "fp32", "float32": "fp32", "<type: 'bfloat16'>": "bf16",
             "bf16": "bf16", "bfloat16": "bf16", "<type: 'float16'>": "fp16", "f16": "fp16", "float16": "fp16"}


def _static_dims(path: str) -> list[int]:
    dims = onnx.load(path, load_external_data=False).graph.input[0].type.tensor_type.shape.dim
    return [d.dim_value for d in dims[1:]]


def feed_for(path: str, batch: int, seed: int = 0) -> dict:
    inp = onnx.load(path, load_external_data=False).graph.input[0]
    dims = [batch] + [d.dim_value for d in inp.type.tensor_type.shape.dim[1:]]
    return {inp.name: np.random.default_rng(seed).standard_normal(dims).astype(np.float32)}


# --------------------------------------------------------------------------- fingerprint check


def load_sidecar(model: Path) -> dict:
    side = model.with_suffix(".json")
    if not model.is_file():
        raise TableError(f"{model}: no such ONNX file")
    if not side.is_file():
        raise TableError(f"{side}: sidecar missing (written next to the .onnx by `resprune export`); "
                         "without its fingerprint the runtime's outputs cannot be checked")
    try:
        info = json.loads(side.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise TableError(f"{side}: not valid JSON: {exc}") from exc
    if "fingerprint" not in info or "input_shape" not in info:
        raise TableError(f"{side}: no fingerprint/input_shape; re-export the model with a current resprune")
    if info.get("onnx_sha256") and ob.sha256_file(str(model)) != info["onnx_sha256"]:
        raise TableError(f"{model}: sha256 differs from its sidecar's: not the file that was exported and checked")
    return info


def check_fingerprint(rt: Runtime, model: Path, info: dict) -> dict:
    """The runtime's logits on the sidecar's fingerprint input against the recorded ones."""
    fp = info["fingerprint"]
    ref = np.asarray(fp["logits"], dtype=np.float32)
    x = np.random.default_rng(fp["seed"]).standard_normal((fp["batch"], *info["input_shape"][1:])).astype(np.float32)
    got = np.asarray(rt.session(str(model), fp["batch"]).run(None, {info.get("input_name", "input"): x})[0])
    diff = float(np.abs(got - ref).max())
    res = {"samples": int(fp["batch"]), "max_abs_diff": diff, "tolerance": float(fp["atol"]),
           "top1_flips": int((got.argmax(1) != ref.argmax(1)).sum()), "within_tolerance": diff <= fp["atol"]}
    if rt.effective_precision() == "fp32" and not res["within_tolerance"]:
        raise TableError(f"{model}: {rt.name} fp32 logits on the fingerprint input differ from the sidecar's by "
                         f"{diff:.3g} > tolerance {fp['atol']:.3g}; this runtime does not compute the exported model")
    return res


# --------------------------------------------------------------------------- timing


def time_all(rt: Runtime, files: dict[str, str], batch: int, runs: int, warmup: int,
             blocks: int) -> dict[str, list[list[float]]]:
    """Per label, the latencies (ms) of ``runs`` runs as one list per block: all files
    interleaved in each round, in ``blocks`` blocks of fresh sessions (the order of creation
    rotating)."""
    labels = list(files)
    times: dict[str, list[list[float]]] = {k: [] for k in labels}
    for k, n in enumerate(np.diff(np.linspace(0, runs, min(blocks, runs) + 1).astype(int))):
        order = labels[k % len(labels):] + labels[:k % len(labels)]
        made = {lab: rt.session(files[lab], batch) for lab in order}
        sess = [made[lab] for lab in labels]
        feeds = [feed_for(files[lab], batch) for lab in labels]
        for lab, t in zip(labels, ob.time_interleaved(sess, feeds, int(n), warmup)):
            times[lab].append([1e3 * v for v in t])
        del made, sess
    return times


def spread(blocks: list[list[float]]) -> dict:
    """The statistic (``STAT_Q``-th percentile of all runs, pooled over the blocks) of one
    timed graph, with what says how noisy it was: min, quartiles, median, the interquartile
    range as a fraction of the statistic (``rel_iqr``) and the statistic of each block."""
    runs = [v for b in blocks for v in b]
    if not runs:
        raise TableError("a timed graph has no runs")
    q25, med, q75 = (float(np.percentile(runs, q)) for q in (25, 50, 75))
    stat = float(np.percentile(runs, STAT_Q))
    return {"stat_ms": stat, "min_ms": float(min(runs)), "q25_ms": q25, "median_ms": med, "q75_ms": q75,
            "rel_iqr": (q75 - q25) / stat if stat > 0 else float("inf"), "runs": len(runs),
            "block_stat_ms": [float(np.percentile(b, STAT_Q)) for b in blocks if b]}


def noisy(spreads: dict[str, dict], max_spread: float) -> list[str]:
    """Labels whose interquartile range exceeds ``max_spread`` × their statistic, worst first."""
    bad = [k for k, v in spreads.items() if not v["rel_iqr"] <= max_spread]
    return sorted(bad, key=lambda k: -spreads[k]["rel_iqr"])


def noise_message(spreads: dict[str, dict], bad: list[str], max_spread: float) -> str:
    worst = ", ".join(f"{k!r} (quartiles {spreads[k]['q25_ms']:.3g} / {spreads[k]['q75_ms']:.3g} ms, "
                      f"IQR {100 * spreads[k]['rel_iqr']:.0f}% of {spreads[k]['stat_ms']:.3g} ms)" for k in bad[:3])
    return (f"noisy measurement: {len(bad)} of {len(spreads)} timed graphs have an interquartile range wider than "
            f"{100 * max_spread:.0f}% of their statistic (--max-spread {max_spread:g}), worst {worst}. Another process "
            "is probably competing for the cores (check the load average); run the tool on a quieter machine, "
            "or with more --runs and --blocks, or pass --allow-noisy to write the table anyway (the spread is "
            "recorded in it). No table was written.")


def weight_bytes(g: dict) -> int:
    """Bytes of a fused conv's fp32 weights and bias."""
    return 4 * (g["cout"] * g["cin"] // g["groups"] * g["kh"] * g["kw"] + g["cout"])


def cache_bytes(threads: int) -> int | None:
    """The L2 cache of the cores that run the model (per-core size × threads; Linux sysfs),
    None where it cannot be read."""
    base = Path("/sys/devices/system/cpu/cpu0/cache")
    try:
        for d in sorted(base.glob("index*")):
            if (d / "level").read_text().strip() == "2" and (d / "type").read_text().strip() in ("Unified", "Data"):
                size = (d / "size").read_text().strip().upper()
                mult = {"K": 2**10, "M": 2**20}.get(size[-1], 1)
                return int(size.rstrip("KM")) * mult * threads
    except (OSError, ValueError):
        pass
    return None


def calibrate(micro: dict, convs: list[dict], gone: list[dict], med: dict, cache: int | None,
              max_excess: float = MAX_EXCESS, allow: bool = False) -> dict:
    """The fixed part and the cache penalty, from the model and the model without its
    shape-keeping convs (see the module docstring)::

        t(model) = fixed + Σ micro(conv) + penalty · max(0, weight bytes − cache)

    ``fixed`` comes from the stripped model (a few convs, weights far inside the cache), the
    penalty (ms per MB of weights beyond the cache: re-read each run from the next level of
    memory) from the whole model. When the whole model's weights fit the cache, or it is not
    slower than its sum, the penalty is 0 and what is left over goes to ``fixed``.

    The check: an excess over ``max_excess`` × the per-layer sum (``fixed + Σ micro``) is not
    believed to be the cache (a calibration point disturbed by load is the likelier cause):
    :class:`NoisyError`, or with ``allow`` the excess is clamped to that bound (recorded as
    ``excess_clamped_from_ms``; the table then predicts its own model below its measurement)."""
    left = list(convs)
    for g in gone:
        left.remove(g)
    fixed = med["stripped"] - sum(micro[signature(g)] for g in left)
    w_all = sum(weight_bytes(g) for g in convs)
    layer_sum = fixed + sum(micro[signature(g)] for g in convs)
    excess = med["model"] - layer_sum
    ratio = excess / layer_sum if layer_sum > 0 else float("inf")
    flagged = excess > 0 and not ratio <= max_excess
    raw = excess
    if flagged:
        if not allow:
            raise NoisyError(
                f"implausible cache penalty: the whole model ({med['model']:.3g} ms) takes {100 * ratio:.0f}% more "
                f"than its per-layer sum ({layer_sum:.3g} ms: fixed part + micro-graphs), over the "
                f"{100 * max_excess:.0f}% (--max-excess {max_excess:g}) a cache penalty is believed for; more likely "
                "the whole-model measurement was disturbed by another process. Run the tool on a quieter machine or "
                "with more --runs and --blocks, or pass --allow-noisy to clamp the penalty to that bound (recorded). "
                "No table was written.")
        excess = max_excess * layer_sum
    use = cache is not None and w_all > cache and excess > 0
    pen = excess / ((w_all - cache) / 2**20) if use else 0.0
    return {"stripped_ms": med["stripped"], "model_ms": med["model"], "removed_convs": len(gone),
            "cache_bytes": cache, "weight_bytes": w_all, "per_layer_sum_ms": layer_sum, "excess_ms": excess,
            "excess_ratio": ratio, "max_excess": max_excess, "penalty_flagged": flagged,
            "excess_clamped_from_ms": raw if flagged else None, "penalty_ms_per_mb": pen,
            # the re-fetch bandwidth the penalty implies (a DRAM delivers GB/s: far less is load, not the cache)
            "implied_refetch_mb_per_s": 1e3 / pen if pen > 0 else None,
            "fixed_ms": fixed if use else fixed + excess,
            "mode": "cache penalty" if use else "leftover in fixed (weights within the cache or no excess)"}


def build_table(args: argparse.Namespace, timer=None) -> dict:
    """The table (see the module docstring). ``timer`` replaces :func:`time_all` (same
    arguments and result; tests feed made-up timings through it)."""
    model = Path(args.model)
    info = load_sidecar(model)
    if info.get("dynamic_batch") is False and info["input_shape"][0] != args.batch:
        raise TableError(f"{model} has a fixed batch {info['input_shape'][0]}; --batch {args.batch} cannot run it")
    rt = Runtime(args.runtime, args.threads or ob.physical_cores(), args.precision)
    check = check_fingerprint(rt, model, info)
    if rt.precision not in ("default", rt.effective_precision()):
        print(f"latency_table: warning: {rt.name} was asked for {rt.precision} but runs {rt.effective_precision()} on "
              f"this CPU (capabilities {rt.capabilities()}); the table records {rt.effective_precision()}",
              file=sys.stderr)
    convs = model_convs(onnx.load(str(model)))
    if not convs:
        raise TableError(f"{model}: no Conv nodes; nothing to tabulate")
    graphs, how = plan(convs, args.chain)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="latency_table_") as tmp:
        files = {"model": str(model), "stripped": os.path.join(tmp, "stripped.onnx")}
        lean, gone = stripped(onnx.load(str(model)))
        onnx.save(lean, files["stripped"])
        for i, (label, (g, n, lead)) in enumerate(graphs.items()):
            files[label] = os.path.join(tmp, f"g{i}.onnx")
            onnx.save(chain_graph(g, args.batch, n, lead), files[label])
        times = (timer or time_all)(rt, files, args.batch, args.runs, args.warmup, args.blocks)
    wall = round(time.perf_counter() - t0, 2)
    spreads = {k: spread(v) for k, v in times.items()}
    bad = noisy(spreads, args.max_spread)
    if bad and not args.allow_noisy:
        raise NoisyError(noise_message(spreads, bad, args.max_spread))
    stat = {k: v["stat_ms"] for k, v in spreads.items()}
    # a slope under timing noise can dip below 0: clamp here, so the table reads back (resprune.latency
    # clamps too) exactly as it was calibrated
    cost = {s: max(0.0, v) for s, v in costs(how, stat, args.chain).items()}
    calib = calibrate(cost, convs, gone, stat, cache_bytes(rt.threads), args.max_excess, args.allow_noisy)
    count = Counter(signature(c) for c in convs)
    geo = {signature(c): c for c in convs}
    whole = spreads["model"]
    return {
        "format": TABLE_FORMAT, "format_version": TABLE_VERSION, "tool": "latency_table",
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": ob.device_info(), "runtime": rt.describe(), "precision": rt.effective_precision(),
        "threads": rt.threads, "batch": args.batch,
        "method": (f"micro-graphs: chains of 1 and {args.chain} copies of each fused conv (slope); a conv that "
                   f"changes the shape leads a chain of {args.chain - 1} shape-keeping convs; fixed part from the "
                   "model without its shape-keeping convs, cache penalty from the whole model"),
        "statistic": {"name": f"q{STAT_Q}", "description": f"{STAT_Q}th percentile of all runs of a graph, pooled "
                      "over the interleaved blocks (load noise only adds time)"},
        "settings": {"chain": args.chain, "runs": args.runs, "warmup": args.warmup, "blocks": args.blocks,
                     "timing_wall_s": wall},
        "noise": {"max_spread": args.max_spread, "max_excess": args.max_excess, "allowed": bool(args.allow_noisy),
                  "noisy_graphs": bad, "penalty_flagged": calib["penalty_flagged"],
                  "worst_rel_iqr": max(v["rel_iqr"] for v in spreads.values()),
                  "clean": not bad and not calib["penalty_flagged"]},
        "model": {"file": model.name, "sha256": info.get("onnx_sha256"), "input_shape": info["input_shape"],
                  "macs_per_sample": info.get("macs_per_sample"), "latency_ms": whole["stat_ms"],
                  "median_ms": whole["median_ms"], "min_ms": whole["min_ms"], "q25_ms": whole["q25_ms"],
                  "q75_ms": whole["q75_ms"], "convs": dict(count)},
        "fixed_ms": calib["fixed_ms"], "cache_bytes": calib["cache_bytes"],
        "penalty_ms_per_mb": calib["penalty_ms_per_mb"],
        "layers": {s: {"ms": cost[s], "weight_bytes": weight_bytes(geo[s]), "count": count[s], "geometry": geo[s],
                       "method": how[s][0]} for s in cost},
        "calibration": calib,
        "micro_graphs_ms": {k: v for k, v in stat.items() if k not in ("model", "stripped")},
        "spread": spreads,
        "check": check,
    }


def format_table(t: dict) -> str:
    r = t["runtime"]
    lines = [f"{'signature':<46} {'count':>5} {'ms each':>9} {'ms total':>9}", "-" * 72]
    for s, e in t["layers"].items():
        lines.append(f"{s:<46} {e['count']:>5} {e['ms']:>9.4f} {e['count'] * e['ms']:>9.3f}")
    lines.append(f"{'fixed (not in the convs)':<46} {'':>5} {'':>9} {t['fixed_ms']:>9.3f}")
    c = t["calibration"]
    if t["penalty_ms_per_mb"]:
        lines.append(f"{'cache penalty (weights beyond the L2 cache)':<46} {'':>5} {'':>9} {c['excess_ms']:>9.3f}")
    lines.append(f"{'whole model, measured (' + t['statistic']['name'] + ')':<46} {'':>5} {'':>9} "
                 f"{t['model']['latency_ms']:>9.3f}")
    if c["penalty_flagged"]:
        lines.append(f"  (excess over the per-layer sum clamped from {c['excess_clamped_from_ms']:.3f} ms: "
                     "--allow-noisy)")
    nz = t["noise"]
    lines.append(f"spread: worst interquartile range {100 * nz['worst_rel_iqr']:.0f}% of its statistic "
                 f"(limit {100 * nz['max_spread']:.0f}%); "
                 + ("clean" if nz["clean"] else f"NOISY, kept by --allow-noisy: {len(nz['noisy_graphs'])} graph(s) "
                    f"over the limit{', penalty clamped' if nz['penalty_flagged'] else ''}"))
    c = t["check"]
    lines += ["", f"device: {t['device']['cpu_model']}; {r['name']} {r['version']} {t['precision']}, "
              f"{t['threads']} thread(s), batch {t['batch']}; {t['method']}",
              f"fingerprint check: max |diff| {c['max_abs_diff']:.3g} (tolerance {c['tolerance']:.3g}), "
              f"top-1 flips {c['top1_flips']} of {c['samples']}"]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="latency_table.py", description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="the unpruned model's ONNX file (its sidecar MODEL.json beside it)")
    p.add_argument("--batch", type=int, default=1, help="batch size (default 1)")
    p.add_argument("--threads", type=int, default=0,
                   help="intra-op threads (default 0: the physical cores this process may use)")
    p.add_argument("--runtime", default="onnxruntime", help="onnxruntime (default) or openvino")
    p.add_argument("--precision", default="fp32", help="fp32 (default); openvino also bf16, fp16")
    p.add_argument("--chain", type=int, default=DEFAULT_CHAIN,
                   help=f"convs in the long chain of each micro-graph (default {DEFAULT_CHAIN})")
    p.add_argument("--runs", type=int, default=30, help="timed runs of every graph (default 30)")
    p.add_argument("--warmup", type=int, default=5, help="untimed runs before each block (default 5)")
    p.add_argument("--blocks", type=int, default=ob.BLOCKS, help="blocks of fresh sessions (default 5)")
    p.add_argument("--max-spread", type=float, default=MAX_SPREAD,
                   help=f"refuse a timed graph whose interquartile range exceeds this fraction of its statistic "
                        f"(default {MAX_SPREAD})")
    p.add_argument("--max-excess", type=float, default=MAX_EXCESS,
                   help=f"refuse a whole model that takes more than this fraction over its per-layer sum "
                        f"(default {MAX_EXCESS}: beyond it the excess is not believed to be the cache)")
    p.add_argument("--allow-noisy", action="store_true",
                   help="write the table despite either check (the spread is recorded, the penalty clamped)")
    p.add_argument("--json", help="write the table here (written under a temporary name, then renamed)")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    if args.batch < 1 or args.chain < 2 or args.runs < 1 or args.blocks < 1 or args.warmup < 0 or args.threads < 0:
        p.error("--batch, --runs, --blocks must be >= 1, --chain >= 2, --warmup and --threads >= 0")
    if not (args.max_spread > 0 and args.max_excess >= 0):
        p.error("--max-spread must be > 0 and --max-excess >= 0")
    return args


def main(argv: list[str] | None = None, timer=None) -> int:
    args = parse_args(argv)
    try:
        table = build_table(args, timer)
    except TableError as exc:
        print(f"latency_table: error: {exc}", file=sys.stderr)
        return 2
    if not args.quiet:
        print(format_table(table))
    if args.json:
        ob.write_json(args.json, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
