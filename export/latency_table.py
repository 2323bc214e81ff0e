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

Before timing, the runtime's logits on the sidecar's fingerprint input (``MODEL.json``
beside ``MODEL.onnx``) are compared with the recorded ones: in fp32 a difference over the
sidecar's tolerance is an error (exit status 2); in reduced precision (OpenVINO bf16/fp16)
the difference and the top-1 flips are recorded, not refused.

Runtimes: ``onnxruntime`` (always; fp32), ``openvino`` where it is installed (fp32, bf16,
fp16 via its inference precision hint). Imports: the standard library, numpy, onnx,
onnxruntime (and openvino when asked for), and ``ort_bench.py`` next to this file; copy
both files to the device (export/README.md).
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
TABLE_VERSION = 1
DEFAULT_CHAIN = 5
OPSET = 17
PRECISIONS = {"onnxruntime": ("fp32",), "openvino": ("fp32", "bf16", "fp16")}


class TableError(RuntimeError):
    """Bad input or a runtime that does not reproduce the model (printed without a traceback)."""


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
    follows from their medians (``("chain", sig)`` or ``("lead", sig, follower sig)``)."""
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
        hint = {"fp32": "f32", "bf16": "bf16", "fp16": "f16"}[self.precision]
        return _OVSession(self.core.compile_model(model, "CPU", {
            "INFERENCE_NUM_THREADS": self.threads, "INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "LATENCY"}))

    def describe(self) -> dict:
        return {"name": self.name, "version": self.version, "precision": self.precision,
                "intra_op_threads": self.threads, "inter_op_threads": ob.INTER_OP_THREADS,
                "opt_level": self.opt_level if self.name == "onnxruntime" else None}


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
    if rt.precision == "fp32" and not res["within_tolerance"]:
        raise TableError(f"{model}: {rt.name} fp32 logits on the fingerprint input differ from the sidecar's by "
                         f"{diff:.3g} > tolerance {fp['atol']:.3g}; this runtime does not compute the exported model")
    return res


# --------------------------------------------------------------------------- timing


def time_all(rt: Runtime, files: dict[str, str], batch: int, runs: int, warmup: int, blocks: int) -> dict:
    """Per label, the latencies (ms) of ``runs`` runs, all files interleaved in each round,
    in ``blocks`` blocks of fresh sessions (the order of creation rotating)."""
    labels = list(files)
    times: dict[str, list[float]] = {k: [] for k in labels}
    for k, n in enumerate(np.diff(np.linspace(0, runs, min(blocks, runs) + 1).astype(int))):
        order = labels[k % len(labels):] + labels[:k % len(labels)]
        made = {lab: rt.session(files[lab], batch) for lab in order}
        sess = [made[lab] for lab in labels]
        feeds = [feed_for(files[lab], batch) for lab in labels]
        for lab, t in zip(labels, ob.time_interleaved(sess, feeds, int(n), warmup)):
            times[lab] += [1e3 * v for v in t]
        del made, sess
    return times


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


def calibrate(micro: dict, convs: list[dict], gone: list[dict], med: dict, cache: int | None) -> dict:
    """The fixed part and the cache penalty, from the model and the model without its
    shape-keeping convs (see the module docstring)::

        t(model) = fixed + Σ micro(conv) + penalty · max(0, weight bytes − cache)

    ``fixed`` comes from the stripped model (a few convs, weights far inside the cache), the
    penalty (ms per MB of weights beyond the cache: re-read each run from the next level of
    memory) from the whole model. When the whole model's weights fit the cache, or it is not
    slower than its sum, the penalty is 0 and what is left over goes to ``fixed``."""
    left = list(convs)
    for g in gone:
        left.remove(g)
    fixed = med["stripped"] - sum(micro[signature(g)] for g in left)
    w_all = sum(weight_bytes(g) for g in convs)
    excess = med["model"] - fixed - sum(micro[signature(g)] for g in convs)
    use = cache is not None and w_all > cache and excess > 0
    pen = excess / ((w_all - cache) / 2**20) if use else 0.0
    return {"stripped_ms": med["stripped"], "removed_convs": len(gone), "cache_bytes": cache,
            "weight_bytes": w_all, "excess_ms": excess, "penalty_ms_per_mb": pen,
            "fixed_ms": fixed if use else fixed + excess,
            "mode": "cache penalty" if use else "leftover in fixed (weights within the cache or no excess)"}


def build_table(args: argparse.Namespace) -> dict:
    model = Path(args.model)
    info = load_sidecar(model)
    if info.get("dynamic_batch") is False and info["input_shape"][0] != args.batch:
        raise TableError(f"{model} has a fixed batch {info['input_shape'][0]}; --batch {args.batch} cannot run it")
    rt = Runtime(args.runtime, args.threads or ob.physical_cores(), args.precision)
    check = check_fingerprint(rt, model, info)
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
        times = time_all(rt, files, args.batch, args.runs, args.warmup, args.blocks)
    med = {k: ob.percentile(v, 50) for k, v in times.items()}
    # a slope under timing noise can dip below 0: clamp here, so the table reads back (resprune.latency
    # clamps too) exactly as it was calibrated
    cost = {s: max(0.0, v) for s, v in costs(how, med, args.chain).items()}
    calib = calibrate(cost, convs, gone, med, cache_bytes(rt.threads))
    count = Counter(signature(c) for c in convs)
    geo = {signature(c): c for c in convs}
    whole = ob.stats(args.batch, [v / 1e3 for v in times["model"]])
    return {
        "format": TABLE_FORMAT, "format_version": TABLE_VERSION, "tool": "latency_table",
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": ob.device_info(), "runtime": rt.describe(), "precision": rt.precision,
        "threads": rt.threads, "batch": args.batch,
        "method": (f"micro-graphs: chains of 1 and {args.chain} copies of each fused conv (slope); a conv that "
                   f"changes the shape leads a chain of {args.chain - 1} shape-keeping convs; fixed part from the "
                   "model without its shape-keeping convs, cache penalty from the whole model"),
        "settings": {"chain": args.chain, "runs": args.runs, "warmup": args.warmup, "blocks": args.blocks,
                     "timing_wall_s": round(time.perf_counter() - t0, 2)},
        "model": {"file": model.name, "sha256": info.get("onnx_sha256"), "input_shape": info["input_shape"],
                  "macs_per_sample": info.get("macs_per_sample"), "latency_ms": whole["median_ms"],
                  "q25_ms": whole["q25_ms"], "q75_ms": whole["q75_ms"], "convs": dict(count)},
        "fixed_ms": calib["fixed_ms"], "cache_bytes": calib["cache_bytes"],
        "penalty_ms_per_mb": calib["penalty_ms_per_mb"],
        "layers": {s: {"ms": cost[s], "weight_bytes": weight_bytes(geo[s]), "count": count[s], "geometry": geo[s],
                       "method": how[s][0]} for s in cost},
        "calibration": calib,
        "micro_graphs_ms": {k: v for k, v in med.items() if k not in ("model", "stripped")},
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
    lines.append(f"{'whole model, measured':<46} {'':>5} {'':>9} {t['model']['latency_ms']:>9.3f}")
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
    p.add_argument("--json", help="write the table here (written under a temporary name, then renamed)")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    if args.batch < 1 or args.chain < 2 or args.runs < 1 or args.blocks < 1 or args.warmup < 0 or args.threads < 0:
        p.error("--batch, --runs, --blocks must be >= 1, --chain >= 2, --warmup and --threads >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        table = build_table(args)
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
