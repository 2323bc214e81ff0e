#!/usr/bin/env python3
"""Latency of ONNX models with onnxruntime, timed side by side (numpy + onnxruntime only).

Usage:
    python ort_bench.py A.onnx [B.onnx ...] --batch 1 8 64 --threads 1 --runs 50 --warmup 10 \\
        --json out.json

The models are timed *interleaved*: within each batch size every round runs each model once,
alternating the order (A, B, then B, A, ...), so clock-frequency drift, thermal throttling
and noisy neighbours hit all models alike. Reported per (model, batch): median, p90, min and
mean latency of one ``session.run`` (ms), throughput (samples/s at the median) and the ratio
of medians to the first model (the reference). Inputs are random (seed 0) with the model's
own input shape; a symbolic first dimension takes the batch size, other symbolic dimensions
need ``--shape``.

Peak memory: each (model, batch) is also run in a child process (this script with
``--_child``) that creates the session, runs the model ``--mem-runs`` times and reports its
peak resident set size (``ru_maxrss``) and the increase over the same process right after
``import onnxruntime`` (``peak_rss_delta_mb``: weights, arena, activations). Children run
before the timing phase, one at a time, so they never overlap the timed runs. Unix only
(``resource``); elsewhere, or with ``--no-memory``, memory is reported as null.

The script imports only the Python standard library, numpy and onnxruntime, so it can be
copied alone to a target device (see README.md next to it).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

TOOL_VERSION = 1
OPT_LEVELS = {
    "disable": "ORT_DISABLE_ALL",
    "basic": "ORT_ENABLE_BASIC",
    "extended": "ORT_ENABLE_EXTENDED",
    "all": "ORT_ENABLE_ALL",
}
_DTYPES = {
    "tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(uint8)": np.uint8,
    "tensor(int8)": np.int8, "tensor(bool)": np.bool_,
}


class BenchError(RuntimeError):
    """A problem with the arguments or the models (printed without a traceback)."""


# --------------------------------------------------------------------------- device


def cpu_model() -> str:
    """The CPU's marketing name, best effort on Linux, macOS and Windows."""
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
        for key in ("model name", "Hardware", "Processor", "cpu model"):
            m = re.search(rf"^{key}\s*:\s*(.+)$", text, re.M)
            if m:
                return m.group(1).strip()
    except OSError:
        pass
    if sys.platform == "darwin":
        try:
            out = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True,
                                 text=True, timeout=5)
            if out.stdout.strip():
                return out.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return platform.processor() or platform.machine() or "unknown"


def device_info() -> dict:
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    mem_gb = None
    try:
        with open("/proc/meminfo") as f:
            m = re.search(r"MemTotal:\s+(\d+) kB", f.read())
        mem_gb = round(int(m.group(1)) / 2**20, 1) if m else None
    except OSError:
        pass
    return {
        "cpu_model": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": usable,
        "memory_gb": mem_gb,
        "machine": platform.machine(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "onnxruntime": ort.__version__,
        "onnxruntime_device": ort.get_device(),
        "available_providers": ort.get_available_providers(),
    }


# --------------------------------------------------------------------------- sessions


def make_session(path: str, threads: int, providers: list[str], opt_level: str) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, OPT_LEVELS[opt_level])
    so.log_severity_level = 3
    try:
        return ort.InferenceSession(path, so, providers=providers)
    except Exception as exc:
        raise BenchError(f"{path}: onnxruntime cannot load it: {exc}") from exc


def make_feed(sess: ort.InferenceSession, batch: int, shape: list[int] | None, seed: int = 0):
    """Random inputs for one run at ``batch``; None when the model's batch is fixed otherwise."""
    rng = np.random.default_rng(seed)
    feed = {}
    for inp in sess.get_inputs():
        dims = list(inp.shape)
        if shape:
            dims = [dims[0], *shape] if len(shape) == len(dims) - 1 else list(shape)
        if isinstance(dims[0], int) and dims[0] != batch:
            return None
        dims[0] = batch
        if any(not isinstance(d, int) for d in dims[1:]):
            raise BenchError(f"input {inp.name!r} has symbolic dimensions {inp.shape}; pass --shape C H W")
        dtype = _DTYPES.get(inp.type)
        if dtype is None:
            raise BenchError(f"input {inp.name!r} has unsupported type {inp.type}")
        if np.issubdtype(dtype, np.floating):
            feed[inp.name] = rng.standard_normal(dims).astype(dtype)
        else:
            feed[inp.name] = rng.integers(0, 2, size=dims).astype(dtype)
    return feed


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------- memory (child)


def _maxrss_mb() -> float | None:
    try:
        import resource
    except ImportError:
        return None
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 2**20 if sys.platform == "darwin" else r / 2**10  # bytes on macOS, KiB on Linux


def _child(args: argparse.Namespace) -> int:
    """Run one model at one batch in this fresh process and print its peak RSS as JSON."""
    base = _maxrss_mb()
    sess = make_session(args.models[0], args.threads, args.providers, args.opt_level)
    feed = make_feed(sess, args.batch[0], args.shape)
    if feed is not None:
        for _ in range(max(1, args.mem_runs)):
            sess.run(None, feed)
    peak = _maxrss_mb()
    print(json.dumps({"peak_rss_mb": peak, "base_rss_mb": base,
                      "peak_rss_delta_mb": None if peak is None or base is None else peak - base}))
    return 0


def measure_memory(script: str, path: str, batch: int, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, script, path, "--_child", "--batch", str(batch), "--threads", str(args.threads),
           "--opt-level", args.opt_level, "--mem-runs", str(args.mem_runs), "--providers", *args.providers]
    if args.shape:
        cmd += ["--shape", *map(str, args.shape)]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if out.returncode == 0:
            return json.loads(out.stdout.strip().splitlines()[-1])
        err = out.stderr.strip().splitlines()[-1:] or ["no output"]
        print(f"warning: memory child for {path} batch {batch} failed: {err[0]}", file=sys.stderr)
    except (OSError, subprocess.SubprocessError, ValueError) as exc:
        print(f"warning: memory child for {path} batch {batch} failed: {exc}", file=sys.stderr)
    return {"peak_rss_mb": None, "base_rss_mb": None, "peak_rss_delta_mb": None}


# --------------------------------------------------------------------------- timing


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def time_interleaved(sessions: list, feeds: list, runs: int, warmup: int) -> list[list[float]]:
    """Per model, ``runs`` latencies (s), models alternating within each round."""
    n = len(sessions)
    for _ in range(warmup):
        for s, f in zip(sessions, feeds):
            if f is not None:
                s.run(None, f)
    times: list[list[float]] = [[] for _ in range(n)]
    clock = time.perf_counter
    for r in range(runs):
        order = range(n) if r % 2 == 0 else range(n - 1, -1, -1)
        for i in order:
            if feeds[i] is None:
                continue
            t0 = clock()
            sessions[i].run(None, feeds[i])
            times[i].append(clock() - t0)
    return times


def stats(batch: int, t: list[float]) -> dict:
    ms = [1e3 * v for v in t]
    med = percentile(ms, 50)
    return {
        "median_ms": med, "p90_ms": percentile(ms, 90), "min_ms": min(ms), "mean_ms": float(np.mean(ms)),
        "std_ms": float(np.std(ms)), "throughput_per_s": 1e3 * batch / med if med > 0 else None,
        "runs": len(ms),
    }


def format_table(result: dict) -> str:
    names = [m["name"] for m in result["models"]]
    ref = names[0]
    w = max([len(n) for n in names] + [5])
    head = (f"{'model':<{w}} {'batch':>5} {'median ms':>10} {'p90 ms':>9} {'min ms':>9} "
            f"{'samples/s':>10} {'vs ' + ref[:10]:>13} {'peak MB':>8} {'+MB':>6}")
    lines = [head, "-" * len(head)]
    by = {(r["model"], r["batch"]): r for r in result["results"]}
    for b in result["settings"]["batches"]:
        for n in names:
            r = by.get((n, b))
            if r is None:
                lines.append(f"{n:<{w}} {b:>5} {'(fixed batch, skipped)':>30}")
                continue
            base = by.get((ref, b))
            ratio = f"{r['median_ms'] / base['median_ms']:.3f}" if base else "-"
            mem = f"{r['peak_rss_mb']:.0f}" if r.get("peak_rss_mb") is not None else "-"
            delta = f"{r['peak_rss_delta_mb']:.0f}" if r.get("peak_rss_delta_mb") is not None else "-"
            lines.append(
                f"{n:<{w}} {b:>5} {r['median_ms']:>10.3f} {r['p90_ms']:>9.3f} {r['min_ms']:>9.3f} "
                f"{r['throughput_per_s']:>10.1f} {ratio:>13} {mem:>8} {delta:>6}"
            )
    d, s = result["device"], result["settings"]
    lines.append("")
    lines.append(
        f"device: {d['cpu_model']} ({d['usable_cpus']} of {d['logical_cpus']} logical CPUs usable), "
        f"onnxruntime {d['onnxruntime']}, providers {', '.join(s['providers'])}, threads "
        f"{s['threads'] or 'ort default'}, graph optimisation {s['opt_level']}, "
        f"{s['runs']} runs after {s['warmup']} warm-up, interleaved"
    )
    if any(r.get("peak_rss_mb") is not None for r in result["results"]):
        lines.append("peak MB: peak resident memory of a child process running the model alone; "
                     "+MB: its increase over the process with onnxruntime imported")
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="ort_bench.py",
        description="Time ONNX models side by side with onnxruntime (interleaved runs, medians, "
                    "peak memory, device description). Needs only numpy and onnxruntime.",
    )
    p.add_argument("models", nargs="+", help="ONNX files; the first is the reference of the ratios")
    p.add_argument("--names", nargs="+", help="labels of the models (default: file stems)")
    p.add_argument("--batch", nargs="+", type=int, default=[1], help="batch sizes (default: 1)")
    p.add_argument("--threads", type=int, default=0,
                   help="intra-op threads (default 0: onnxruntime's choice, all physical cores)")
    p.add_argument("--providers", nargs="+", default=["CPUExecutionProvider"],
                   help="execution providers in priority order (default: CPUExecutionProvider)")
    p.add_argument("--opt-level", choices=list(OPT_LEVELS), default="all",
                   help="onnxruntime graph optimisation level (default: all)")
    p.add_argument("--runs", type=int, default=50, help="timed runs per model and batch (default 50)")
    p.add_argument("--warmup", type=int, default=10, help="untimed runs first (default 10)")
    p.add_argument("--shape", nargs="+", type=int, help="input shape without batch, for symbolic dims")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory child processes")
    p.add_argument("--mem-runs", type=int, default=3, help="runs in each memory child (default 3)")
    p.add_argument("--json", help="write the results to this JSON file")
    p.add_argument("--quiet", action="store_true", help="do not print the table")
    p.add_argument("--_child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.runs < 1 or args.warmup < 0 or args.threads < 0:
        p.error("--runs must be >= 1, --warmup and --threads >= 0")
    if any(b < 1 for b in args.batch):
        p.error("batch sizes must be >= 1")
    if args.names and len(args.names) != len(args.models):
        p.error(f"--names got {len(args.names)} labels for {len(args.models)} models")
    return args


def run(args: argparse.Namespace) -> dict:
    avail = ort.get_available_providers()
    missing = [p for p in args.providers if p not in avail]
    if missing:
        raise BenchError(f"providers {missing} are not available in this onnxruntime build "
                         f"(available: {', '.join(avail)})")
    for m in args.models:
        if not Path(m).is_file():
            raise BenchError(f"{m}: no such file")
    names = args.names or [Path(m).stem for m in args.models]
    if len(set(names)) != len(names):
        raise BenchError(f"model labels must differ, got {names}; pass --names")
    script = str(Path(__file__).resolve())
    models = []
    for path, name in zip(args.models, names):
        models.append({"name": name, "path": str(path), "sha256": sha256_file(path),
                       "bytes": Path(path).stat().st_size})
    sessions = [make_session(m["path"], args.threads, args.providers, args.opt_level) for m in models]
    memory: dict = {}
    if not args.no_memory:  # idle sessions here hold memory but no CPU while the children run
        for b in args.batch:
            for mdl in models:
                memory[(mdl["name"], b)] = measure_memory(script, mdl["path"], b, args)
    for m, s in zip(models, sessions):
        m["providers_used"] = s.get_providers()
        m["inputs"] = [{"name": i.name, "shape": [d if isinstance(d, int) else str(d) for d in i.shape],
                        "type": i.type} for i in s.get_inputs()]
    rows = []
    t_start = time.perf_counter()
    for b in args.batch:
        feeds = [make_feed(s, b, args.shape) for s in sessions]
        times = time_interleaved(sessions, feeds, args.runs, args.warmup)
        for m, f, t in zip(models, feeds, times):
            if f is None:
                continue
            row = {"model": m["name"], "batch": b, **stats(b, t)}
            row.update(memory.get((m["name"], b), {"peak_rss_mb": None, "peak_rss_delta_mb": None}))
            rows.append(row)
    ref = models[0]["name"]
    for r in rows:
        base = next((x for x in rows if x["model"] == ref and x["batch"] == r["batch"]), None)
        r["ratio_to_first"] = r["median_ms"] / base["median_ms"] if base else None
    return {
        "tool": "ort_bench", "tool_version": TOOL_VERSION,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": device_info(),
        "settings": {
            "batches": args.batch, "runs": args.runs, "warmup": args.warmup, "threads": args.threads,
            "providers": args.providers, "opt_level": args.opt_level,
            "opt_level_ort": OPT_LEVELS[args.opt_level], "interleaved": True,
            "memory": "child process ru_maxrss" if not args.no_memory else None,
            "timing_wall_s": round(time.perf_counter() - t_start, 3),
        },
        "models": models,
        "results": rows,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args._child:
            return _child(args)
        result = run(args)
    except BenchError as exc:
        print(f"ort_bench: error: {exc}", file=sys.stderr)
        return 2
    if not args.quiet:
        print(format_table(result))
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
