"""The ``export``, ``bench`` and ``report`` stages on a run directory (docs/run-dir.md).

* :func:`export_run_dir`: ``fused_unpruned.pt`` / ``fused.pt`` → ``onnx/unpruned.onnx`` /
  ``onnx/pruned.onnx`` (+ ``.json`` sidecars with the checkpoints' sha256), each verified
  against onnxruntime by :func:`resprune.onnx.export_onnx`.
* :func:`bench_run_dir`: re-verifies both ONNX files, then runs ``export/ort_bench.py`` on
  them in a subprocess (interleaved timing, the same tool a target device runs) →
  ``bench.json``.
* :func:`write_report`: ``report.md``, ``report.json`` and ``plots/*.png`` from
  ``prune.json``, ``metrics.json`` and ``bench.json`` of one or several run directories.

All three read and write through :class:`resprune.rundir.RunDir`: a missing or out-of-date
input raises :class:`RunDirError`, which names the file and the stage(s) to re-run; the CLI
handlers print it and exit with status 2. Export writes its files as one set (a temporary
folder renamed over ``onnx/``), so a failed export leaves the previous set.

The CLI (``resprune/cli.py``) wires the three sub-commands with::

    add_export_parser(subparsers); add_bench_parser(subparsers); add_report_parser(subparsers)

Each sets ``func`` on its parser: ``args.func(args)`` returns the exit status.

Example:
    >>> from resprune.report import write_report  # doctest: +SKIP
    >>> write_report(["runs/quickstart"])["out"]
    'runs/quickstart'
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import logging
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from .config import ExportConfig
from .rundir import METRICS, RunDir, RunDirError
from .version import __version__

logger = logging.getLogger(__name__)

__all__ = [
    "RunDirError", "export_run_dir", "bench_run_dir", "summarize_run", "write_report",
    "find_bench_tool", "add_export_parser", "add_bench_parser", "add_report_parser",
]

ONNX_FILES = {"unpruned": ("fused_unpruned.pt", "onnx/unpruned.onnx"), "pruned": ("fused.pt", "onnx/pruned.onnx")}
AFTER_STAGES = ("finetuned", "fused", "pruned")
METRIC_STAGE = {k: stage for stage, keys in METRICS.items() for k in keys}  # metrics.json entry → its stage


# --------------------------------------------------------------------------- export


def _input_size(path: Path, payload: dict, given: tuple[int, ...] | None) -> tuple[int, ...]:
    """``given``, else the input shape every resprune checkpoint records (``extra["input_size"]``)."""
    size = given or (payload.get("extra") or {}).get("input_size")
    if not size:
        raise ValueError(f"{path} does not record its input size (written by an older resprune?); "
                         "pass --input-size N C H W")
    return tuple(int(v) for v in size)


def export_run_dir(
    run_dir: str | os.PathLike,
    *,
    input_size: tuple[int, ...] | None = None,
    opset: int | None = None,
    dynamic_batch: bool = True,
    atol: float | None = None,
    rtol: float | None = None,
) -> dict[str, dict]:
    """Export the run's fused checkpoints to verified ONNX files with sidecars, as one set.

    Both files and sidecars are written to a temporary folder that replaces ``onnx/`` only
    when all of them passed their checks: a failed or killed export leaves the previous set
    (or, killed between the two renames, the export recorded as unfinished, which bench and
    report refuse), and the next export removes what a killed one left.

    Args:
        run_dir: a run directory with ``fused_unpruned.pt`` and ``fused.pt``.
        input_size: input shape with batch (default: the one each checkpoint records).
        opset: ONNX opset (default: the exporter's).
        dynamic_batch: symbolic batch dimension.
        atol, rtol: the onnxruntime check's tolerance on the logits, ``atol + rtol·max|logit|``
            (the relative part keeps float32 rounding of nets with huge logits, e.g. after a
            very short training run, from failing the check; 1e-6 is ~6× the rounding floor
            measured on such a ResNet-56); default: :class:`ExportConfig`'s.

    Returns:
        ``{"unpruned": sidecar, "pruned": sidecar}``.
    """
    from .onnx import export_onnx
    from .serialization import load_payload, model_from_payload

    cfg = ExportConfig()
    atol, rtol = cfg.atol if atol is None else atol, cfg.rtol if rtol is None else rtol
    run = RunDir(run_dir)
    srcs = {k: run.need(ckpt, "export") for k, (ckpt, _) in ONNX_FILES.items()}
    config = {"input_size": input_size and list(input_size), "opset": opset, "dynamic_batch": dynamic_batch,
              "atol": atol, "rtol": rtol}
    out = {}
    with run.writing("export", config, inputs=[ckpt for ckpt, _ in ONNX_FILES.values()]), \
            run.new_folder("onnx") as tmp:
        for key, (_, rel) in ONNX_FILES.items():
            payload = load_payload(srcs[key])
            size = _input_size(srcs[key], payload, input_size)
            out[key] = export_onnx(model_from_payload(payload, srcs[key]), tmp / Path(rel).name, size, dynamic_batch,
                                   opset, source=srcs[key], atol=atol, rtol=rtol,
                                   metadata=(payload.get("extra") or {}).get("deploy"))
            logger.info("export: %s → %s", srcs[key], run / rel)
    return out


# --------------------------------------------------------------------------- bench


def find_bench_tool(tool: str | os.PathLike | None = None) -> Path:
    """``export/ort_bench.py``: ``tool``, ``$RESPRUNE_ORT_BENCH``, or the repository's copy."""
    cands = [tool, os.environ.get("RESPRUNE_ORT_BENCH"), Path(__file__).resolve().parents[1] / "export" / "ort_bench.py"]
    for c in cands:
        if c and Path(c).is_file():
            return Path(c)
    raise RunDirError(
        "export/ort_bench.py not found (resprune is not installed from a source checkout?); pass "
        "--tool PATH or set RESPRUNE_ORT_BENCH"
    )


def bench_run_dir(
    run_dir: str | os.PathLike,
    *,
    batches: tuple[int, ...] | list[int] | None = None,
    runs: int | None = None,
    warmup: int | None = None,
    threads: int | None = None,
    providers: list[str] | None = None,
    memory: bool = True,
    tool: str | os.PathLike | None = None,
    quiet: bool = False,
    allow_unverified: bool = False,
) -> dict:
    """Verify the run's ONNX files and time them with ``export/ort_bench.py`` → ``bench.json``.

    The tool runs in a subprocess with the current Python, labels ``unpruned`` and ``pruned``
    (the reference of the ratios is ``unpruned``); ``batches``, ``runs``, ``warmup`` and
    ``threads`` default to :class:`ExportConfig`'s; ``threads`` 0 or None: the physical cores,
    set explicitly and recorded by the tool. A file without its sidecar (``.json``) cannot be
    checked against what was exported and is refused (:class:`OnnxVerificationError`) unless
    ``allow_unverified``. Returns the parsed ``bench.json``.
    """
    from .onnx import OnnxVerificationError, sidecar_path, verify_onnx

    cfg = ExportConfig()
    batches = cfg.bench_batches if batches is None else batches
    runs, warmup = cfg.bench_runs if runs is None else runs, cfg.bench_warmup if warmup is None else warmup
    threads = cfg.bench_threads if threads is None else threads
    run = RunDir(run_dir)
    paths = {k: run.need(rel, "bench") for k, (_, rel) in ONNX_FILES.items()}
    for p in paths.values():
        if not sidecar_path(p).is_file() and not allow_unverified:
            raise OnnxVerificationError(
                f"{p}: its sidecar {sidecar_path(p).name} is missing, so the file cannot be checked against "
                "what was exported; re-export it (resprune export), or pass --allow-unverified to time it anyway")
        if not verify_onnx(p)["functional"]:
            logger.warning("bench: %s is timed unverified (no sidecar; --allow-unverified)", p)
    tmp = run / f".bench.json.tmp-{os.getpid()}"
    cmd = [sys.executable, str(find_bench_tool(tool)), str(paths["unpruned"]), str(paths["pruned"]),
           "--names", "unpruned", "pruned", "--batch", *map(str, batches), "--runs", str(runs),
           "--warmup", str(warmup), "--threads", str(threads or 0), "--json", str(tmp)]
    if providers:
        cmd += ["--providers", *providers]
    if not memory:
        cmd.append("--no-memory")
    if quiet:
        cmd.append("--quiet")
    logger.info("bench: %s", " ".join(cmd))
    try:
        proc = subprocess.run(cmd, text=True, capture_output=quiet)
        if proc.returncode != 0:
            raise RuntimeError(f"ort_bench.py failed (exit {proc.returncode}): {(proc.stderr or '').strip()}")
        config = {"batches": list(batches), "runs": runs, "warmup": warmup, "threads": threads or 0,
                  "providers": providers}
        with run.writing("bench", config, inputs=[rel for _, rel in ONNX_FILES.values()]):
            os.replace(tmp, run / "bench.json")
    finally:
        tmp.unlink(missing_ok=True)
    return run.read_json("bench.json")


# --------------------------------------------------------------------------- report data


def _stage_values(stages: dict, name: str) -> dict:
    s = stages.get(name) or {}
    return {k: s.get(k) for k in ("test_acc", "test_loss", "macs", "params", "epochs", "wall_s")} | {"stage": name}


def _pick(model_name: str, bench: dict) -> str | None:
    names = [m["name"] for m in bench.get("models", [])]
    if model_name in names:
        return model_name
    for m in bench.get("models", []):
        if Path(m.get("path", "")).name == f"{model_name}.onnx":
            return m["name"]
    return None


def _final_stage(stages: dict) -> str:
    return next((s for s in AFTER_STAGES if (stages.get(s) or {}).get("test_acc") is not None),
                next((s for s in AFTER_STAGES if s in stages), "pruned"))


def _bench(run: RunDir) -> dict:
    """``bench.json``, refused when its stage is out of date or it timed other ONNX files than
    the run's (it records their sha256: a bench.json copied back from a device is checked too)."""
    bench = run.need_json("bench.json", "report")
    for m in bench.get("models", []):
        rel = f"onnx/{m.get('name')}.onnx"
        if m.get("sha256") and run.sha256(rel) not in (None, m["sha256"]):
            raise RunDirError(f"{run / 'bench.json'} timed another {rel} than the one in the run directory; "
                              f"re-run `resprune bench {run.path}`")
    return bench


def summarize_baseline(baseline: str | float | os.PathLike | None, run_dir: Path) -> dict | None:
    """The baseline column: a run directory of the same schedule without L1 (its trained and
    final accuracy, MACs, params) or a bare accuracy figure in %. A relative directory is
    looked up from the current directory, then beside ``run_dir``."""
    if baseline is None:
        return None
    if isinstance(baseline, (int, float)) and not isinstance(baseline, bool):
        return {"source": "figure", "run_dir": None, "trained_acc": None, "final_acc": float(baseline),
                "macs": None, "params": None, "epochs": None}
    p = Path(baseline)
    if not p.is_absolute() and not p.is_dir() and (run_dir.parent / p).is_dir():
        p = run_dir.parent / p
    if not p.is_dir():
        raise RunDirError(f"baseline run directory {baseline} does not exist (report.baseline / --baseline)")
    stages = RunDir(p).need_json("metrics.json", "report --baseline").get("stages", {})
    trained, final = stages.get("sparse") or {}, stages.get(_final_stage(stages)) or {}
    if trained.get("test_acc") is None:
        raise RunDirError(f"baseline {p}: metrics.json has no trained accuracy (stage 'sparse'); run it first")
    epochs = (trained.get("epochs") or 0) + ((stages.get("finetuned") or {}).get("epochs") or 0)
    return {"source": "run", "run_dir": str(p), "name": p.resolve().name, "trained_acc": trained["test_acc"],
            "final_acc": final.get("test_acc"), "macs": final.get("macs") or trained.get("macs"),
            "params": (stages.get("fused") or {}).get("params") or final.get("params") or trained.get("params"),
            "epochs": epochs}


def summarize_run(run_dir: str | os.PathLike, latency: bool = True,
                  baseline: str | float | os.PathLike | None = None) -> dict[str, Any]:
    """Everything the report shows about one run, as plain data (see ``report.json``).

    ``latency=False`` reports without ``bench.json`` (no latency rows or plots).
    ``baseline``: see :func:`summarize_baseline` (default: the recipe's ``report.baseline``).
    """
    run = RunDir(run_dir)
    run_dir = run.path
    prune = run.need_json("prune.json", "report")
    metrics = run.need_json("metrics.json", "report")
    stages = metrics.get("stages", {})
    for key in stages:  # every number shown comes from results that are current
        if key in METRIC_STAGE:
            run.need("metrics.json", "report", METRIC_STAGE[key])
    bench = _bench(run) if latency else {}
    before = _stage_values(stages, "sparse")
    after = _stage_values(stages, _final_stage(stages))
    for side, key, pkey in ((before, "macs", "macs_before"), (before, "params", "params_before"),
                            (after, "macs", "macs_after"), (after, "params", "params_after")):
        if side[key] is None:
            side[key] = prune.get(pkey)
    for side, fused in ((before, "unpruned_fused"), (after, "fused")):  # params of what is deployed
        if (stages.get(fused) or {}).get("params") is not None:
            side["params"] = stages[fused]["params"]
    latency: dict[str, dict] = {}
    nb, na = _pick("unpruned", bench), _pick("pruned", bench)
    rows = bench.get("results", [])
    ref_first = nb is not None and bench["models"][0]["name"] == nb  # ort_bench's intervals are against the first
    iqr = lambda r: [r["q25_ms"], r["q75_ms"]] if r and "q25_ms" in r else None  # noqa: E731
    for b in sorted({r["batch"] for r in rows}):
        rb = next((r for r in rows if r["model"] == nb and r["batch"] == b), None)
        ra = next((r for r in rows if r["model"] == na and r["batch"] == b), None)
        latency[str(b)] = {
            "before_ms": rb and rb["median_ms"], "after_ms": ra and ra["median_ms"],
            "before_iqr_ms": iqr(rb), "after_iqr_ms": iqr(ra),
            "before_p90_ms": rb and rb["p90_ms"], "after_p90_ms": ra and ra["p90_ms"],
            "before_throughput": rb and rb["throughput_per_s"], "after_throughput": ra and ra["throughput_per_s"],
            "before_peak_mb": rb and rb.get("peak_rss_mb"), "after_peak_mb": ra and ra.get("peak_rss_mb"),
            "ratio": (ra["median_ms"] / rb["median_ms"]) if ra and rb else None,
            "ratio_interval": ra.get("ratio_interval") if ra and ref_first else None,
            "within_noise": ra.get("within_noise") if ra and ref_first else None,
        }
    scales = prune.get("scales") or {"names": [], "values": [], "threshold": None}
    units = Counter(n.split(".")[0] for n in scales.get("names", []))
    for s in prune.get("removed_per_stage", {}):
        units.setdefault(s, prune["removed_per_stage"][s])
    model, rec = None, {}
    if (run_dir / "recipe.json").is_file():
        try:
            rec = json.loads((run_dir / "recipe.json").read_text())
            model = rec.get("model") if isinstance(rec.get("model"), str) else (rec.get("model") or {}).get("name")
        except (json.JSONDecodeError, AttributeError):
            rec = {}
    if baseline is None and isinstance(rec.get("report"), dict):
        baseline = rec["report"].get("baseline")
    base = summarize_baseline(baseline, run_dir)
    ratios = {k: (after[k] / before[k]) if before.get(k) and after.get(k) is not None else None
              for k in ("macs", "params")}
    acc_delta = (after["test_acc"] - before["test_acc"]
                 if after["test_acc"] is not None and before["test_acc"] is not None else None)
    return {
        "name": run_dir.resolve().name, "run_dir": str(run_dir), "model": model,
        "before": before, "after": after, "ratios": ratios, "acc_delta_pt": acc_delta,
        "baseline": base,
        "l1_cost_pt": (before["test_acc"] - base["trained_acc"]
                       if base and base["trained_acc"] is not None and before["test_acc"] is not None else None),
        "vs_baseline_pt": (after["test_acc"] - base["final_acc"]
                           if base and base["final_acc"] is not None and after["test_acc"] is not None else None),
        "latency": latency, "removed": prune.get("removed", []),
        "removed_per_stage": prune.get("removed_per_stage", {}), "units_per_stage": dict(units),
        "max_removed_scale": prune.get("max_removed_scale"),
        "prune_config": prune.get("config", {}), "scales": scales,
        "device": bench.get("device", {}), "bench_settings": bench.get("settings", {}),
        "hardware": metrics.get("hardware"),
        "engine": {k: (stages.get(k) or {}).get("engine") for k in ("sparse", "finetuned")
                   if (stages.get(k) or {}).get("engine")},
    }


# --------------------------------------------------------------------------- markdown


def _f(v, fmt: str, na: str = "n/a") -> str:
    return na if v is None else format(v, fmt)


def _threads(s: dict) -> str:
    if "intra_op_threads" in s:
        return f"{s['intra_op_threads']} intra-op, {s['inter_op_threads']} inter-op"
    return str(s.get("threads") or "onnxruntime's default")


def _ms(median: float | None, iqr: list[float] | None) -> str:
    return _f(median, ".3f") + (f" ({iqr[0]:.3f}–{iqr[1]:.3f})" if iqr else "")


def _ratio(l: dict) -> str:
    """The latency ratio with its noise interval; *within noise* when the interval holds 1."""
    ci = l.get("ratio_interval")
    if not ci or l["ratio"] is None:
        return _f(l["ratio"], ".3f")
    return f"{l['ratio']:.3f} ({ci[0]:.3f}–{ci[1]:.3f}{', *within noise*' if l.get('within_noise') else ''})"


def _run_markdown(r: dict, plots: dict[str, str]) -> list[str]:
    b, a, L = r["before"], r["after"], r["latency"]
    lines = [f"## {r['name']}", ""]
    if r["model"]:
        lines.append(f"model: `{r['model']}`  ")
    for stage, e in (r.get("engine") or {}).items():  # layer-parallel training: engine and settings
        opts = ", ".join(f"{k}={v}" for k, v in (e.get("options") or {}).items() if k != "version")
        rb = e.get("repartition") or {}
        moved = (f" (re-partitioned by measured layer time: load imbalance {rb['imbalance_before']:.1%} → "
                 f"{rb['imbalance_after']:.1%})" if rb.get("imbalance_after") is not None else "")
        lines.append(f"{stage} training engine: `{e.get('name')}` on {e.get('nproc')} processes"
                     f"{f' ({opts})' if opts else ''}, layer bounds {e.get('bounds')}{moved}  ")
    d, s = r["device"], r["bench_settings"]
    if d:
        lines.append(
            f"latency device: {d.get('cpu_model')} ({d.get('usable_cpus')} usable CPUs), onnxruntime "
            f"{d.get('onnxruntime')}, {', '.join(s.get('providers', []))}, threads {_threads(s)}, "
            f"{s.get('runs')} interleaved runs after {s.get('warmup')} warm-up, medians (interquartile range)"
            + (f"; ratio: {s['ratio_interval']}, *within noise* when it contains 1" if s.get("ratio_interval") else "")
        )
    base = r.get("baseline")
    if base:
        what = (f"run `{base['name']}`, {base['epochs']} epochs, no L1, nothing pruned" if base["source"] == "run"
                else "given figure")
        lines += ["", f"| | baseline ({what}) | pruned ({a['stage']}) | pruned − baseline |", "|---|---:|---:|---:|"]
        lines.append(f"| test accuracy (%) | {_f(base['final_acc'], '.2f')} | {_f(a['test_acc'], '.2f')} | "
                     f"{_f(r['vs_baseline_pt'], '+.2f')} pt |")
        if base["macs"]:
            lines.append(f"| MACs (M) | {base['macs'] / 1e6:.2f} | {_f(a['macs'] and a['macs'] / 1e6, '.2f')} | "
                         f"{_f(a['macs'] and 100 * (a['macs'] / base['macs'] - 1), '+.1f')}% |")
        if base["trained_acc"] is not None:
            lines += ["", f"What L1 cost before pruning: sparse-trained {_f(b['test_acc'], '.2f')}% vs "
                      f"{base['trained_acc']:.2f}% trained without L1 ({_f(r['l1_cost_pt'], '+.2f')} pt)."]
    lines += ["", f"| | before ({b['stage']}) | after ({a['stage']}) | after / before |", "|---|---:|---:|---:|"]
    delta = r["acc_delta_pt"]
    lines.append(f"| test accuracy (%) | {_f(b['test_acc'], '.2f')} | {_f(a['test_acc'], '.2f')} | "
                 f"{_f(delta, '+.2f')} pt |")
    lines.append(f"| MACs (M) | {_f(b['macs'] and b['macs'] / 1e6, '.2f')} | {_f(a['macs'] and a['macs'] / 1e6, '.2f')} "
                 f"| {_f(r['ratios']['macs'], '.3f')} |")
    lines.append(f"| params (M, fused) | {_f(b['params'] and b['params'] / 1e6, '.3f')} | "
                 f"{_f(a['params'] and a['params'] / 1e6, '.3f')} | {_f(r['ratios']['params'], '.3f')} |")
    for bs, l in sorted(L.items(), key=lambda kv: int(kv[0])):
        lines.append(f"| latency, batch {bs} (ms) | {_ms(l['before_ms'], l.get('before_iqr_ms'))} | "
                     f"{_ms(l['after_ms'], l.get('after_iqr_ms'))} | {_ratio(l)} |")
        if l.get("before_peak_mb") is not None:
            lines.append(f"| peak memory, batch {bs} (MB) | {_f(l['before_peak_mb'], '.0f')} | "
                         f"{_f(l['after_peak_mb'], '.0f')} | |")
    per = ", ".join(f"{k}: {v}/{r['units_per_stage'].get(k, '?')}" for k, v in r["removed_per_stage"].items()) or "none"
    cfg = r["prune_config"]
    rule = (f"threshold |s| < {cfg['threshold']:g}" if cfg.get("threshold") is not None
            else f"MACs budget {cfg.get('target_macs')}" if cfg.get("target_macs") is not None else "unknown rule")
    if r["removed"]:
        lines += ["", f"Removed {len(r['removed'])} units ({rule}; per stage removed/removable: {per}); "
                  f"largest removed |s| = {_f(r['max_removed_scale'], '.3g')}.", ""]
    else:
        lines += ["", f"Nothing was removed ({rule}). To remove layers, train with a larger L1 weight λ "
                  "(train.l1) or for more epochs (train.epochs), or prune with a larger prune.threshold or a "
                  "prune.target_macs budget.", ""]
    for title, key in (("layer scales", "scales"), ("before/after", "before_after"),
                       ("removed per stage", "removed_per_stage")):
        if key in plots:
            lines.append(f"![{title}]({plots[key]})")
    return lines + [""]


def write_report(
    run_dirs: list[str | os.PathLike], out: str | os.PathLike | None = None, *, latency: bool = True,
    baseline: str | float | os.PathLike | None = None,
) -> dict[str, Any]:
    """Write ``report.md``, ``report.json`` and ``plots/*.png`` for one or several runs.

    Args:
        run_dirs: run directories with ``prune.json``, ``metrics.json`` and ``bench.json``.
        out: output directory (default: the run directory when there is one; required
            with several).
        latency: require ``bench.json`` and report latency (``False``: a report without
            latency, for runs whose recipe skips the benchmark).
        baseline: a baseline run directory or accuracy figure for every run (default: each
            run's recipe ``report.baseline``); see :func:`summarize_baseline`.

    Returns:
        The ``report.json`` contents (with ``"out"``, the output directory).
    """
    if not run_dirs:
        raise ValueError("write_report needs at least one run directory")
    if out is None:
        if len(run_dirs) > 1:
            raise ValueError("several run directories need an output directory (--out DIR)")
        out = run_dirs[0]
    out = Path(out)
    runs = [summarize_run(d, latency, baseline) for d in run_dirs]  # all inputs checked before anything is written
    own = RunDir(run_dirs[0]) if len(run_dirs) == 1 and out.resolve() == Path(run_dirs[0]).resolve() else None
    with own.writing("report", {"latency": latency}, inputs=["prune.json", "bench.json"] if latency else ["prune.json"]) \
            if own else contextlib.nullcontext():
        return _write_report_files(runs, out)


def _write_report_files(runs: list[dict], out: Path) -> dict[str, Any]:
    from . import plots as P

    names = [r["name"] for r in runs]
    if len(set(names)) != len(names):
        for i, r in enumerate(runs):
            r["name"] = f"{i}-{r['name']}"
    pdir = out / "plots"
    all_plots: dict[str, dict[str, str]] = {}
    for r in runs:
        prefix = "" if len(runs) == 1 else f"{r['name']}_"
        files = {}
        if r["scales"].get("names"):
            files["scales"] = P.plot_scales(r, pdir / f"{prefix}scales.png")
        files["before_after"] = P.plot_before_after(r, pdir / f"{prefix}before_after.png")
        if r["units_per_stage"]:
            files["removed_per_stage"] = P.plot_removed_per_stage(r, pdir / f"{prefix}removed_per_stage.png")
        all_plots[r["name"]] = {k: str(v.relative_to(out)) for k, v in files.items()}
    cross = None
    if len(runs) > 1:
        cross = str(P.plot_acc_vs_macs(runs, pdir / "acc_vs_macs.png").relative_to(out))
    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    md = ["# resprune report", "",
          f"Generated {now} by resprune {__version__} from {len(runs)} run(s). Latency: medians of "
          "interleaved onnxruntime runs (`export/ort_bench.py`); MACs: conv + linear, per image.", ""]
    if len(runs) > 1:
        bs_all = sorted({int(b) for r in runs for b in r["latency"]})
        md += ["## Across runs", "",
               "| run | model | acc before (%) | acc after (%) | MACs after (M) | MACs ratio | "
               + " | ".join(f"latency ratio b={b}" for b in bs_all) + " |",
               "|---|---|---:|---:|---:|---:|" + "---:|" * len(bs_all)]
        for r in runs:
            lat = [_ratio(r["latency"][str(b)]) if str(b) in r["latency"] else "n/a" for b in bs_all]
            md.append(f"| {r['name']} | {r['model'] or ''} | {_f(r['before']['test_acc'], '.2f')} | "
                      f"{_f(r['after']['test_acc'], '.2f')} | {_f(r['after']['macs'] and r['after']['macs'] / 1e6, '.2f')} "
                      f"| {_f(r['ratios']['macs'], '.3f')} | " + " | ".join(lat) + " |")
        md += ["", f"![accuracy against MACs]({cross})", ""]
    for r in runs:
        md += _run_markdown(r, all_plots[r["name"]])
    report = {"generated": now, "resprune_version": __version__, "out": str(out), "runs": runs,
              "plots": {"per_run": all_plots, "acc_vs_macs": cross}}
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text("\n".join(md))
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    logger.info("report: %s", out / "report.md")
    return report


# --------------------------------------------------------------------------- CLI


def _fail(cmd: str, exc: BaseException) -> int:
    print(f"resprune {cmd}: error: {exc}", file=sys.stderr)
    return 2


def _cmd_export(args: argparse.Namespace) -> int:
    from .onnx import OnnxVerificationError
    from .serialization import CheckpointError

    try:
        res = export_run_dir(args.run_dir, input_size=tuple(args.input_size) if args.input_size else None,
                             opset=args.opset, dynamic_batch=not args.static_batch, atol=args.atol,
                             rtol=args.rtol)
    except (RunDirError, CheckpointError, OnnxVerificationError, ValueError) as exc:
        return _fail("export", exc)
    for key, info in res.items():
        chk = info["check"]
        print(f"{key:>9}: {Path(args.run_dir) / ONNX_FILES[key][1]}  opset {info['opset']}, "
              f"{info['macs_per_sample'] / 1e6:.2f} M MACs, {info['params'] / 1e6:.3f} M params, "
              f"onnxruntime max |diff| {chk['max_abs_diff']:.2g} (tol {chk['atol']:g}), ops "
              + ", ".join(f"{k}×{v}" for k, v in info["op_types"].items()))
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from .onnx import OnnxVerificationError

    try:
        bench_run_dir(args.run_dir, batches=tuple(args.batch), runs=args.runs, warmup=args.warmup,
                      threads=args.threads, providers=args.providers, memory=not args.no_memory,
                      tool=args.tool, allow_unverified=args.allow_unverified)
    except (RunDirError, OnnxVerificationError, RuntimeError) as exc:
        return _fail("bench", exc)
    print(f"wrote {Path(args.run_dir) / 'bench.json'}")
    return 0


def _baseline_arg(v: str | None) -> str | float | None:
    """``--baseline``: an accuracy figure when it parses as a number, else a run directory."""
    if v is None:
        return None
    try:
        return float(v)
    except ValueError:
        return v


def _cmd_report(args: argparse.Namespace) -> int:
    try:
        rep = write_report(args.run_dirs, args.out, latency=not args.no_latency, baseline=_baseline_arg(args.baseline))
    except (RunDirError, ValueError) as exc:
        return _fail("report", exc)
    print(f"wrote {Path(rep['out']) / 'report.md'}, report.json and "
          f"{sum(len(v) for v in rep['plots']['per_run'].values()) + bool(rep['plots']['acc_vs_macs'])} plots")
    return 0


def add_export_parser(subparsers) -> argparse.ArgumentParser:
    """``resprune export RUN_DIR``: fused checkpoints → verified ONNX files + sidecars."""
    p = subparsers.add_parser(
        "export", help="export fused.pt / fused_unpruned.pt to verified ONNX files",
        description="Export RUN_DIR/fused_unpruned.pt and RUN_DIR/fused.pt to RUN_DIR/onnx/unpruned.onnx "
                    "and RUN_DIR/onnx/pruned.onnx (one self-contained file each, plus a .json sidecar with "
                    "MACs, params, opset, versions and the checkpoint's sha256). Each file is checked with "
                    "onnx.checker and against onnxruntime on random inputs (max |diff| <= 1e-4, same top-1).",
    )
    p.add_argument("run_dir", help="run directory (docs/run-dir.md)")
    p.add_argument("--input-size", nargs=4, type=int, metavar=("N", "C", "H", "W"),
                   help="input shape (default: from the checkpoint/recipe, else 1 3 32 32)")
    p.add_argument("--opset", type=int, help="ONNX opset (default: the exporter's, >= 18)")
    p.add_argument("--static-batch", action="store_true", help="fix the batch dimension to N")
    cfg = ExportConfig()
    p.add_argument("--atol", type=float, default=cfg.atol,
                   help=f"onnxruntime check: absolute tolerance on the logits (default {cfg.atol:g})")
    p.add_argument("--rtol", type=float, default=cfg.rtol,
                   help=f"onnxruntime check: tolerance relative to the largest |logit| (added to --atol; "
                        f"default {cfg.rtol:g})")
    p.set_defaults(func=_cmd_export)
    return p


def add_bench_parser(subparsers) -> argparse.ArgumentParser:
    """``resprune bench RUN_DIR``: time the run's ONNX files with export/ort_bench.py."""
    p = subparsers.add_parser(
        "bench", help="time onnx/unpruned.onnx and onnx/pruned.onnx side by side → bench.json",
        description="Verify RUN_DIR/onnx/{unpruned,pruned}.onnx against their sidecars, then time them "
                    "interleaved with export/ort_bench.py (onnxruntime, medians, peak memory) and write "
                    "RUN_DIR/bench.json. On a target device run export/ort_bench.py itself (see "
                    "export/README.md).",
    )
    p.add_argument("run_dir", help="run directory with onnx/ (from `resprune export`)")
    cfg = ExportConfig()
    p.add_argument("--batch", nargs="+", type=int, default=list(cfg.bench_batches),
                   help=f"batch sizes (default: {' '.join(map(str, cfg.bench_batches))})")
    p.add_argument("--runs", type=int, default=cfg.bench_runs,
                   help=f"timed runs per model and batch (default {cfg.bench_runs})")
    p.add_argument("--warmup", type=int, default=cfg.bench_warmup, help=f"warm-up runs (default {cfg.bench_warmup})")
    p.add_argument("--threads", type=int, default=cfg.bench_threads or 0,
                   help="onnxruntime intra-op threads (0: the physical cores; always set explicitly and recorded)")
    p.add_argument("--providers", nargs="+", help="onnxruntime execution providers (default: CPU)")
    p.add_argument("--no-memory", action="store_true", help="skip peak-memory measurement")
    p.add_argument("--tool", help="path of ort_bench.py (default: the repository's export/ort_bench.py)")
    p.add_argument("--allow-unverified", action="store_true",
                   help="time ONNX files that have no sidecar (.json), which cannot be checked against the "
                        "export; by default such a file is refused")
    p.set_defaults(func=_cmd_bench)
    return p


def add_report_parser(subparsers) -> argparse.ArgumentParser:
    """``resprune report RUN_DIR [RUN_DIR ...] [--out DIR]``."""
    p = subparsers.add_parser(
        "report", help="report.md, report.json and plots from one or several run directories",
        description="Write report.md, report.json and plots/*.png (layer scales with the threshold, "
                    "MACs/params/latency/accuracy before and after, layers removed per stage; with "
                    "several runs also accuracy against MACs) from prune.json, metrics.json and "
                    "bench.json.",
    )
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories")
    p.add_argument("--out", help="output directory (default: RUN_DIR; required with several runs)")
    p.add_argument("--baseline", metavar="RUN_DIR|ACC",
                   help="baseline: a run directory of the same schedule without L1 (or its accuracy in %%); "
                        "default: the recipe's report.baseline")
    p.add_argument("--no-latency", action="store_true",
                   help="report without bench.json (no latency); by default a missing bench.json is an error")
    p.set_defaults(func=_cmd_report)
    return p
