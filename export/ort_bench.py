#!/usr/bin/env python3
"""Latency of ONNX models with onnxruntime, timed side by side (numpy + onnxruntime only).

Usage:
    python ort_bench.py A.onnx [B.onnx ...] --batch 1 8 64 --threads 1 --runs 50 --warmup 10 \\
        --json out.json

The models are timed *interleaved*: within each batch size every round runs each model once,
alternating the order (A, B, then B, A, ...), so clock-frequency drift, thermal throttling
and noisy neighbours hit all models alike. The rounds are split into ``--blocks`` (5) blocks,
each with fresh sessions (created in rotating order), because a session itself can be
slower or faster than another of the same file (where its threads land). Reported per
(model, batch): median, interquartile range, p90, min and mean latency of one
``session.run`` (ms), throughput (samples/s at the median), the ratio of medians to the
first model (the reference) and its noise interval: the 95% bootstrap interval resampling
blocks, then rounds in pairs, widened by ``--noise-floor`` (0.05) on each side;
``within_noise`` when the interval contains 1. Threads are pinned: ``intra_op_num_threads``
(``--threads``; 0 resolves to the physical cores this process may use, onnxruntime's own
default) and ``inter_op_num_threads = 1`` are set explicitly and recorded, and no thread
spin-waits after a run (an idle session's spinning threads would slow the next model).
Inputs are random (seed 0) with the model's own input shape; a symbolic first dimension
takes the batch size, other symbolic dimensions need ``--shape``.

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

TOOL_VERSION = 2
INTER_OP_THREADS = 1
CI_LEVEL, CI_RESAMPLES, NOISE_FLOOR, BLOCKS = 0.95, 2000, 0.05, 5
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


def physical_cores() -> int:
    """Physical cores among the CPUs this process may use (what onnxruntime picks by
    default), from Linux's topology files; elsewhere the usable logical CPUs."""
    try:
        cpus = os.sched_getaffinity(0)
        topo = "/sys/devices/system/cpu/cpu{}/topology/"
        return len({(Path(topo.format(c) + "physical_package_id").read_text(),
                     Path(topo.format(c) + "core_id").read_text()) for c in cpus}) or len(cpus)
    except (AttributeError, OSError):
        return os.cpu_count() or 1


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
    so.inter_op_num_threads = INTER_OP_THREADS
    # no spin-waiting after a run: an idle session's spinning threads would take cores from the
    # next model in the round (two sessions of one file measured 0.55-1.74x with it on 2 cores)
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.add_session_config_entry("session.inter_op.allow_spinning", "0")
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
    q25, med, q75 = (percentile(ms, q) for q in (25, 50, 75))
    return {
        "median_ms": med, "q25_ms": q25, "q75_ms": q75, "p90_ms": percentile(ms, 90), "min_ms": min(ms),
        "mean_ms": float(np.mean(ms)), "std_ms": float(np.std(ms)),
        "throughput_per_s": 1e3 * batch / med if med > 0 else None, "runs": len(ms),
    }


def ratio_interval(ref: list[list[float]], t: list[list[float]], floor: float = NOISE_FLOOR,
                   level: float = CI_LEVEL, resamples: int = CI_RESAMPLES, seed: int = 0) -> list[float]:
    """Noise interval of median(t) / median(ref), from their times per block of fresh sessions
    (round by round): the bootstrap interval that resamples blocks, then rounds within each
    block in pairs (both models' times of one round together, so what slowed a round for both
    cancels, while what differs from session to session shows), widened by ``floor`` on each
    side for what one run cannot show (identical files differ by a few % on a shared machine)."""
    rng = np.random.default_rng(seed)
    pairs = [np.column_stack([a, b]) for a, b in zip(ref, t)]
    r = np.empty(resamples)
    for j in range(resamples):
        s = np.concatenate([pairs[c][rng.integers(0, len(pairs[c]), len(pairs[c]))]
                            for c in rng.integers(0, len(pairs), len(pairs))])
        r[j] = np.median(s[:, 1]) / np.median(s[:, 0])
    lo, hi = np.percentile(r, [50 * (1 - level), 50 * (1 + level)])
    return [float(lo) - floor, float(hi) + floor]


def format_table(result: dict) -> str:
    names = [m["name"] for m in result["models"]]
    kib = {m["name"]: m["bytes"] / 1024 for m in result["models"]}
    ref = names[0]
    w = max([len(n) for n in names] + [5])
    head = (f"{'model':<{w}} {'batch':>5} {'median ms':>10} {'IQR ms':>15} {'p90 ms':>9} {'min ms':>9} "
            f"{'samples/s':>10} {'vs ' + ref[:10]:>13} {'noise interval':>16} {'peak MB':>8} {'+MB':>6} "
            f"{'file KiB':>9}")
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
            ci = r.get("ratio_interval")
            ci = f"{ci[0]:.3f}-{ci[1]:.3f}{'~' if r['within_noise'] else ' '}" if ci else "-"
            iqr = f"{r['q25_ms']:.3f}-{r['q75_ms']:.3f}"
            mem = f"{r['peak_rss_mb']:.0f}" if r.get("peak_rss_mb") is not None else "-"
            delta = f"{r['peak_rss_delta_mb']:.0f}" if r.get("peak_rss_delta_mb") is not None else "-"
            lines.append(
                f"{n:<{w}} {b:>5} {r['median_ms']:>10.3f} {iqr:>15} {r['p90_ms']:>9.3f} {r['min_ms']:>9.3f} "
                f"{r['throughput_per_s']:>10.1f} {ratio:>13} {ci:>16} {mem:>8} {delta:>6} {kib[n]:>9.0f}"
            )
    d, s = result["device"], result["settings"]
    lines.append("")
    lines.append(
        f"device: {d['cpu_model']} ({d['usable_cpus']} of {d['logical_cpus']} logical CPUs usable), "
        f"onnxruntime {d['onnxruntime']}, providers {', '.join(s['providers'])}, threads intra-op "
        f"{s['intra_op_threads']}, inter-op {s['inter_op_threads']}, graph optimisation {s['opt_level']}, "
        f"{s['runs']} runs after {s['warmup']} warm-up, interleaved"
    )
    lines.append(f"noise interval: {s['ratio_interval']}; ~ marks a difference within noise "
                 "(the interval contains 1)")
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
                   help="intra-op threads (default 0: the physical cores this process may use, set "
                        "explicitly); inter-op threads are 1")
    p.add_argument("--providers", nargs="+", default=["CPUExecutionProvider"],
                   help="execution providers in priority order (default: CPUExecutionProvider)")
    p.add_argument("--opt-level", choices=list(OPT_LEVELS), default="all",
                   help="onnxruntime graph optimisation level (default: all)")
    p.add_argument("--runs", type=int, default=50, help="timed runs per model and batch (default 50)")
    p.add_argument("--warmup", type=int, default=10,
                   help="untimed runs before the timed rounds of each block (default 10)")
    p.add_argument("--blocks", type=int, default=BLOCKS,
                   help=f"split the rounds into this many blocks, each with fresh sessions (default {BLOCKS})")
    p.add_argument("--noise-floor", type=float, default=NOISE_FLOOR,
                   help="widen the ratio's bootstrap interval by this on each side (default 0.05)")
    p.add_argument("--shape", nargs="+", type=int, help="input shape without batch, for symbolic dims")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory child processes")
    p.add_argument("--mem-runs", type=int, default=3, help="runs in each memory child (default 3)")
    p.add_argument("--json", help="write the results to this JSON file")
    p.add_argument("--quiet", action="store_true", help="do not print the table")
    p.add_argument("--_child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.runs < 1 or args.blocks < 1 or args.warmup < 0 or args.threads < 0 or args.noise_floor < 0:
        p.error("--runs and --blocks must be >= 1, --warmup, --threads and --noise-floor >= 0")
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
    args.threads = args.threads or physical_cores()  # pinned: never left to onnxruntime
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
    del sessions  # each block of rounds gets fresh ones
    for b in args.batch:
        blocks = []  # per block, per model: the times of its rounds
        for k, n in enumerate(np.diff(np.linspace(0, args.runs, min(args.blocks, args.runs) + 1).astype(int))):
            order = [(k + j) % len(models) for j in range(len(models))]  # who is created first rotates
            made = {i: make_session(models[i]["path"], args.threads, args.providers, args.opt_level) for i in order}
            sessions = [made[i] for i in range(len(models))]
            feeds = [make_feed(s, b, args.shape) for s in sessions]
            blocks.append(time_interleaved(sessions, feeds, int(n), args.warmup))
            del sessions, made
        times = [[x for blk in blocks for x in blk[i]] for i in range(len(models))]
        for i, (m, f, t) in enumerate(zip(models, feeds, times)):
            if f is None:
                continue
            ref = times[0] if feeds[0] is not None else None  # the first model, timed in the same rounds
            ci = (ratio_interval([blk[0] for blk in blocks], [blk[i] for blk in blocks], args.noise_floor)
                  if ref and i > 0 else None)
            row = {"model": m["name"], "batch": b, **stats(b, t),
                   "ratio_to_first": percentile(t, 50) / percentile(ref, 50) if ref else None,
                   "ratio_interval": ci, "within_noise": ci[0] <= 1.0 <= ci[1] if ci else None}
            row.update(memory.get((m["name"], b), {"peak_rss_mb": None, "peak_rss_delta_mb": None}))
            rows.append(row)
    return {
        "tool": "ort_bench", "tool_version": TOOL_VERSION,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": device_info(),
        "settings": {
            "batches": args.batch, "runs": args.runs, "warmup": args.warmup, "threads": args.threads,
            "intra_op_threads": args.threads, "inter_op_threads": INTER_OP_THREADS,
            "blocks": min(args.blocks, args.runs), "noise_floor": args.noise_floor,
            "ratio_interval": f"{CI_LEVEL:.0%} bootstrap interval of the ratio of medians ({CI_RESAMPLES} "
                              f"resamples of the {min(args.blocks, args.runs)} blocks of fresh sessions, then of "
                              f"their rounds, in pairs), widened by {args.noise_floor:g} on each side",
            "providers": args.providers, "opt_level": args.opt_level,
            "opt_level_ort": OPT_LEVELS[args.opt_level], "interleaved": True,
            "memory": "child process ru_maxrss" if not args.no_memory else None,
            "timing_wall_s": round(time.perf_counter() - t_start, 3),
        },
        "models": models,
        "results": rows,
    }


def write_json(path: str | Path, obj: dict) -> None:
    """Write ``obj`` as JSON through a temporary file, so a reader never sees half a file."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, out)


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
        write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
