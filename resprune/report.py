"""The report of one or several runs: ``report.md``, ``report.json`` and ``plots/*.png`` from
``prune.json``, ``metrics.json``, ``bench.json`` (and ``recipe.json``) of each run directory.

* :func:`summarize_run`: everything the report shows about one run, as plain data (reading
  through :class:`resprune.rundir.RunDir`: an input that is missing or out of date raises
  :class:`RunDirError`, which names the stage(s) to re-run).
* :func:`write_report_files`: the markdown, the JSON and the plots of such summaries.
* :func:`run_summary`: the closing table of ``resprune run``.

The ``report`` stage (:func:`resprune.stages.stage_report`) checks every input, then writes
the files with these inside the run directory's provenance record.

Example:
    >>> from resprune.stages import stage_report  # doctest: +SKIP
    >>> stage_report(["runs/quickstart"])["out"]
    'runs/quickstart'
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
from collections import Counter
from pathlib import Path
from typing import Any

from .rundir import BENCH_FILES, METRICS, RunDir, RunDirError
from .util import atomic_write
from .version import __version__

logger = logging.getLogger(__name__)

__all__ = ["summarize_run", "summarize_baseline", "write_report_files", "run_summary"]

AFTER_STAGES = ("finetuned", "fused", "pruned")
METRIC_STAGE = {k: stage for stage, keys in METRICS.items() for k in keys}  # metrics.json entry → its stage


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
        rel = BENCH_FILES.get(m.get("name"), f"onnx/{m.get('name')}.onnx")
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


def _latency(bench: dict) -> dict[str, dict]:
    """Per batch size: medians, spreads, throughput and peak memory before and after, the
    ratio with ort_bench's noise interval."""
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
    return latency


def _precision(run: RunDir, bench: dict) -> list[dict]:
    """fp32 and INT8 side by side (only where the quantize stage wrote INT8 models): per model
    its precision, accuracy, agreement with fp32, file size and latency per batch."""
    if not (run / BENCH_FILES["pruned_int8"]).is_file():
        return []
    rows = {(r["model"], r["batch"]): r for r in bench.get("results", [])}
    out = []
    for name, rel in BENCH_FILES.items():
        side = run.need_json(str(Path(rel).with_suffix(".json")), "report")
        lat = {str(b): {k: r.get(k) for k in ("median_ms", "q25_ms", "q75_ms", "ratio_to_first", "ratio_interval",
                                             "within_noise")}
               for (n, b), r in rows.items() if n == name}
        out.append({"model": name, "precision": side.get("precision", "fp32"), "file": rel,
                    "bytes": side.get("onnx_bytes"), "test_accuracy": side.get("test_accuracy"),
                    "top1_agreement": (side.get("check") or {}).get("top1_agreement"),
                    "quantization": side.get("quantization"), "latency": lat})
    return out


def _recipe(run_dir: Path) -> tuple[dict, str | None]:
    """``recipe.json`` as far as it can be read (a report needs only the model name from it),
    and the model name."""
    if not (run_dir / "recipe.json").is_file():
        return {}, None
    try:
        rec = json.loads((run_dir / "recipe.json").read_text())
        return rec, rec.get("model") if isinstance(rec.get("model"), str) else (rec.get("model") or {}).get("name")
    except (json.JSONDecodeError, AttributeError):
        return {}, None


def _section(rec: dict, key: str) -> dict:
    """A section of ``recipe.json`` (``{}`` where it is missing or not a table)."""
    return rec[key] if isinstance(rec.get(key), dict) else {}


def _comparisons(before: dict, after: dict, base: dict | None) -> dict:
    """Ratios after/before, the accuracy change, and the differences to the baseline."""
    ratios = {k: (after[k] / before[k]) if before.get(k) and after.get(k) is not None else None
              for k in ("macs", "params")}
    acc_delta = (after["test_acc"] - before["test_acc"]
                 if after["test_acc"] is not None and before["test_acc"] is not None else None)
    return {
        "ratios": ratios, "acc_delta_pt": acc_delta, "baseline": base,
        "l1_cost_pt": (before["test_acc"] - base["trained_acc"]
                       if base and base["trained_acc"] is not None and before["test_acc"] is not None else None),
        "vs_baseline_pt": (after["test_acc"] - base["final_acc"]
                           if base and base["final_acc"] is not None and after["test_acc"] is not None else None),
    }


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
    scales = prune.get("scales") or {"names": [], "values": [], "threshold": None}
    units = Counter(n.split(".")[0] for n in scales.get("names", []))
    for s in prune.get("removed_per_stage", {}):
        units.setdefault(s, prune["removed_per_stage"][s])
    rec, model = _recipe(run_dir)
    if baseline is None and isinstance(rec.get("report"), dict):
        baseline = rec["report"].get("baseline")
    return {
        "name": run_dir.resolve().name, "run_dir": str(run_dir), "model": model, "before": before, "after": after,
        **_comparisons(before, after, summarize_baseline(baseline, run_dir)),
        "latency": _latency(bench), "precision": _precision(run, bench), "removed": prune.get("removed", []),
        "removed_per_stage": prune.get("removed_per_stage", {}), "units_per_stage": dict(units),
        "max_removed_scale": prune.get("max_removed_scale"), "predicted_latency": prune.get("latency"),
        "prune_config": prune.get("config", {}), "scales": scales,
        "removed_before_training": list(_section(rec, "model").get("remove") or []),
        "l1": _section(rec, "train").get("l1"),
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


def _engine_lines(r: dict) -> list[str]:
    """Layer-parallel training: the engine of each stage and its settings."""
    lines = []
    for stage, e in (r.get("engine") or {}).items():
        opts = ", ".join(f"{k}={v}" for k, v in (e.get("options") or {}).items() if k != "version")
        rb = e.get("repartition") or {}
        moved = (f" (re-partitioned by measured layer time: load imbalance {rb['imbalance_before']:.1%} → "
                 f"{rb['imbalance_after']:.1%})" if rb.get("imbalance_after") is not None else "")
        lines.append(f"{stage} training engine: `{e.get('name')}` on {e.get('nproc')} processes"
                     f"{f' ({opts})' if opts else ''}, layer bounds {e.get('bounds')}{moved}  ")
    return lines


def _device_lines(r: dict) -> list[str]:
    d, s = r["device"], r["bench_settings"]
    if not d:
        return []
    return [
        f"latency device: {d.get('cpu_model')} ({d.get('usable_cpus')} usable CPUs), onnxruntime "
        f"{d.get('onnxruntime')}, {', '.join(s.get('providers', []))}, threads {_threads(s)}, "
        f"{s.get('runs')} interleaved runs after {s.get('warmup')} warm-up, medians (interquartile range)"
        + (f"; ratio: {s['ratio_interval']}, *within noise* when it contains 1" if s.get("ratio_interval") else "")
    ]


def _baseline_lines(r: dict) -> list[str]:
    base, a, b = r.get("baseline"), r["after"], r["before"]
    if not base:
        return []
    what = (f"run `{base['name']}`, {base['epochs']} epochs, no L1, nothing pruned" if base["source"] == "run"
            else "given figure")
    scratch = len(r.get("removed_before_training") or [])
    this = f"{scratch} units removed before training, new weights" if scratch else "pruned"
    lines = ["", f"| | baseline ({what}) | {this} ({a['stage']}) | this run − baseline |", "|---|---:|---:|---:|",
             f"| test accuracy (%) | {_f(base['final_acc'], '.2f')} | {_f(a['test_acc'], '.2f')} | "
             f"{_f(r['vs_baseline_pt'], '+.2f')} pt |"]
    if base["macs"]:
        lines.append(f"| MACs (M) | {base['macs'] / 1e6:.2f} | {_f(a['macs'] and a['macs'] / 1e6, '.2f')} | "
                     f"{_f(a['macs'] and 100 * (a['macs'] / base['macs'] - 1), '+.1f')}% |")
    if base["trained_acc"] is not None:
        cost = ("What L1 cost" if not scratch else
                "What the smaller architecture cost" if not r.get("l1") else "What the smaller architecture and L1 cost")
        lines += ["", f"{cost} before pruning: {_f(b['test_acc'], '.2f')}% at the end of the sparse stage vs "
                  f"{base['trained_acc']:.2f}% for the baseline at the same point ({_f(r['l1_cost_pt'], '+.2f')} pt)."]
    return lines


def _before_after_lines(r: dict) -> list[str]:
    """The table before/after: accuracy, MACs, params, latency and peak memory per batch."""
    b, a = r["before"], r["after"]
    lines = ["", f"| | before ({b['stage']}) | after ({a['stage']}) | after / before |", "|---|---:|---:|---:|",
             f"| test accuracy (%) | {_f(b['test_acc'], '.2f')} | {_f(a['test_acc'], '.2f')} | "
             f"{_f(r['acc_delta_pt'], '+.2f')} pt |",
             f"| MACs (M) | {_f(b['macs'] and b['macs'] / 1e6, '.2f')} | {_f(a['macs'] and a['macs'] / 1e6, '.2f')} "
             f"| {_f(r['ratios']['macs'], '.3f')} |",
             f"| params (M, fused) | {_f(b['params'] and b['params'] / 1e6, '.3f')} | "
             f"{_f(a['params'] and a['params'] / 1e6, '.3f')} | {_f(r['ratios']['params'], '.3f')} |"]
    for bs, l in sorted(r["latency"].items(), key=lambda kv: int(kv[0])):
        lines.append(f"| latency, batch {bs} (ms) | {_ms(l['before_ms'], l.get('before_iqr_ms'))} | "
                     f"{_ms(l['after_ms'], l.get('after_iqr_ms'))} | {_ratio(l)} |")
        if l.get("before_peak_mb") is not None:
            lines.append(f"| peak memory, batch {bs} (MB) | {_f(l['before_peak_mb'], '.0f')} | "
                         f"{_f(l['after_peak_mb'], '.0f')} | |")
    return lines


def _precision_lines(r: dict) -> list[str]:
    """fp32 and INT8 side by side: accuracy, agreement, file size, latency per batch and its
    ratio to the unpruned fp32 model (with ort_bench's noise interval)."""
    rows = r.get("precision") or []
    if not rows:
        return []
    q = next(x["quantization"] for x in rows if x["quantization"])
    bs = sorted({int(b) for x in rows for b in x["latency"]})
    head = "| model | precision | test accuracy (%) | top-1 agreement with fp32 | file (KiB) | " + " | ".join(
        f"batch {b}: ms (IQR), × unpruned fp32" for b in bs) + " |"
    lines = ["", f"fp32 and INT8 (`resprune quantize`: {q['format']}, per-channel int8 weights, {q['activations']} "
             f"activations, {q['method']} calibration on {q['calibration']['images']} training images):", "", head,
             "|---|---|---:|---:|---:|" + "---|" * len(bs)]
    for x in rows:
        cells = []
        for b in bs:
            m = x["latency"].get(str(b))
            ratio = {"ratio": m["ratio_to_first"], "ratio_interval": m["ratio_interval"],
                     "within_noise": m["within_noise"]} if m else {"ratio": None}
            cells.append(f"{_ms(m and m['median_ms'], m and [m['q25_ms'], m['q75_ms']])}, {_ratio(ratio)}")
        lines.append(f"| {x['model']} | {x['precision']} | {_f(x['test_accuracy'], '.2f')} | "
                     f"{_f(x['top1_agreement'], '.2%', '–')} | {_f(x['bytes'] and x['bytes'] / 1024, '.0f')} | "
                     + " | ".join(cells) + " |")
    return lines


def _removed_lines(r: dict) -> list[str]:
    """What was removed, by which rule; or what to change when nothing was."""
    per = ", ".join(f"{k}: {v}/{r['units_per_stage'].get(k, '?')}" for k, v in r["removed_per_stage"].items()) or "none"
    cfg = r["prune_config"]
    rule = (f"threshold |s| < {cfg['threshold']:g}" if cfg.get("threshold") is not None
            else f"MACs budget {cfg.get('target_macs')}" if cfg.get("target_macs") is not None
            else f"latency budget {cfg['target_latency_ms']:g} ms" if cfg.get("target_latency_ms") is not None
            else "unknown rule")
    if r["removed"]:
        return ["", f"Removed {len(r['removed'])} units ({rule}; per stage removed/removable: {per}); "
                f"largest removed |s| = {_f(r['max_removed_scale'], '.3g')}.", ""]
    if r.get("removed_before_training"):
        return ["", f"Nothing was removed by pruning ({rule}); {len(r['removed_before_training'])} units were "
                "removed before training (model.remove): this run trained that architecture from new weights.", ""]
    return ["", f"Nothing was removed ({rule}). To remove layers, train with a larger L1 weight λ "
            "(train.l1) or for more epochs (train.epochs), or prune with a larger prune.threshold or a "
            "prune.target_macs budget.", ""]


def _predicted_lines(r: dict) -> list[str]:
    """Per-stage predicted latency from the latency table, and what bench.json measured at
    the table's batch size."""
    p = r.get("predicted_latency")
    if not p:
        return []
    lines = ["", f"Predicted latency (table `{p['table']}`: {p['device']}, {p['runtime']} {p.get('runtime_version')} "
             f"{p['precision']}, batch {p['batch']}, {p['threads']} thread(s)):", "",
             "| part | before (ms) | after (ms) |", "|---|---|---|"]
    after = p["per_stage_after_ms"]
    for k, v in p["per_stage_before_ms"].items():
        lines.append(f"| {k} | {v:.3f} | {after.get(k, 0.0):.3f} |")
    lines.append(f"| **total (predicted)** | {p['predicted_before_ms']:.3f} | {p['predicted_after_ms']:.3f} |")
    m = r["latency"].get(str(p["batch"]))
    if m:
        lines.append(f"| total (measured, bench.json, {_threads(r['bench_settings'])}) | "
                     f"{_ms(m['before_ms'], m.get('before_iqr_ms'))} | {_ms(m['after_ms'], m.get('after_iqr_ms'))} |")
    return lines + [""]


def _run_markdown(r: dict, plots: dict[str, str]) -> list[str]:
    lines = [f"## {r['name']}", ""]
    if r["model"]:
        lines.append(f"model: `{r['model']}`  ")
    lines += (_engine_lines(r) + _device_lines(r) + _baseline_lines(r) + _before_after_lines(r)
              + _precision_lines(r) + _removed_lines(r) + _predicted_lines(r))
    for title, key in (("layer scales", "scales"), ("before/after", "before_after"),
                       ("removed per stage", "removed_per_stage"), ("latency against MACs", "latency_vs_macs")):
        if key in plots:
            lines.append(f"![{title}]({plots[key]})")
    return lines + [""]


def _across_runs(runs: list[dict], cross: str) -> list[str]:
    bs_all = sorted({int(b) for r in runs for b in r["latency"]})
    md = ["## Across runs", "",
          "| run | model | acc before (%) | acc after (%) | MACs after (M) | MACs ratio | "
          + " | ".join(f"latency ratio b={b}" for b in bs_all) + " |",
          "|---|---|---:|---:|---:|---:|" + "---:|" * len(bs_all)]
    for r in runs:
        lat = [_ratio(r["latency"][str(b)]) if str(b) in r["latency"] else "n/a" for b in bs_all]
        md.append(f"| {r['name']} | {r['model'] or ''} | {_f(r['before']['test_acc'], '.2f')} | "
                  f"{_f(r['after']['test_acc'], '.2f')} | {_f(r['after']['macs'] and r['after']['macs'] / 1e6, '.2f')} "
                  f"| {_f(r['ratios']['macs'], '.3f')} | " + " | ".join(lat) + " |")
    return md + ["", f"![accuracy against MACs]({cross})", ""]


# --------------------------------------------------------------------------- files


def _plots(runs: list[dict], out: Path) -> tuple[dict[str, dict[str, str]], str | None]:
    """Each run's plots and, with several runs, accuracy against MACs (paths relative to ``out``)."""
    from . import plots as P

    pdir = out / "plots"
    per_run: dict[str, dict[str, str]] = {}
    for r in runs:
        prefix = "" if len(runs) == 1 else f"{r['name']}_"
        files = {}
        if r["scales"].get("names"):
            files["scales"] = P.plot_scales(r, pdir / f"{prefix}scales.png")
        files["before_after"] = P.plot_before_after(r, pdir / f"{prefix}before_after.png")
        if r["units_per_stage"]:
            files["removed_per_stage"] = P.plot_removed_per_stage(r, pdir / f"{prefix}removed_per_stage.png")
        if r.get("predicted_latency"):
            files["latency_vs_macs"] = P.plot_latency_vs_macs(r, pdir / f"{prefix}latency_vs_macs.png")
        per_run[r["name"]] = {k: str(v.relative_to(out)) for k, v in files.items()}
    cross = str(P.plot_acc_vs_macs(runs, pdir / "acc_vs_macs.png").relative_to(out)) if len(runs) > 1 else None
    return per_run, cross


def write_report_files(runs: list[dict], out: str | os.PathLike) -> dict[str, Any]:
    """Write ``report.md``, ``report.json`` and ``plots/*.png`` of ``runs`` (summaries from
    :func:`summarize_run`) into ``out``; runs of the same name are numbered. Returns the
    ``report.json`` contents (with ``"out"``)."""
    out = Path(out)
    names = [r["name"] for r in runs]
    if len(set(names)) != len(names):
        for i, r in enumerate(runs):
            r["name"] = f"{i}-{r['name']}"
    per_run, cross = _plots(runs, out)
    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    md = ["# resprune report", "",
          f"Generated {now} by resprune {__version__} from {len(runs)} run(s). Latency: medians of "
          "interleaved onnxruntime runs (`export/ort_bench.py`); MACs: conv + linear, per image.", ""]
    if len(runs) > 1:
        md += _across_runs(runs, cross)
    for r in runs:
        md += _run_markdown(r, per_run[r["name"]])
    report = {"generated": now, "resprune_version": __version__, "out": str(out), "runs": runs,
              "plots": {"per_run": per_run, "acc_vs_macs": cross}}
    with atomic_write(out / "report.md") as tmp:
        tmp.write_text("\n".join(md))
    with atomic_write(out / "report.json") as tmp:
        tmp.write_text(json.dumps(report, indent=1) + "\n")
    logger.info("report: %s", out / "report.md")
    return report


def run_summary(run: RunDir) -> list[str]:
    """The closing lines of ``resprune run``: accuracy, MACs, params and latency before and
    after, the layers removed per stage, where the report is."""
    m = run.read_json("metrics.json").get("stages", {})
    lat = {Path(r["model"]).stem: r.get("median_ms") for r in run.read_json("bench.json").get("results", [])
           if r.get("batch") == 1}
    before, after = m.get("unpruned_fused") or m.get("sparse", {}), m.get("fused", {})
    acc_after = (m.get("finetuned") or m.get("pruned") or {}).get("test_acc")

    def fmt(a, b, unit, scale=1.0, nd=2):
        if a is None or b is None:
            return (unit, "-", "-", "-")
        return (unit, f"{a / scale:.{nd}f}", f"{b / scale:.{nd}f}",
                f"{100 * (b - a) / a:+.1f}%" if unit != "test accuracy (%)" else f"{b - a:+.2f} pt")

    rows = [("", "before", "after", "change"),
            fmt(m.get("sparse", {}).get("test_acc"), acc_after, "test accuracy (%)"),
            fmt(before.get("macs"), after.get("macs"), "MACs (M)", 1e6),
            fmt(before.get("params"), after.get("params"), "params (M, fused)", 1e6, 3),
            fmt(lat.get("unpruned"), lat.get("pruned"), "latency bs=1 (ms, ORT)", 1.0, 3)]
    if "pruned_int8" in lat:  # the quantize stage ran: pruned + INT8 against the unpruned fp32 model
        rows.append(fmt(lat.get("unpruned"), lat["pruned_int8"], "  pruned + INT8 (ms)", 1.0, 3))
    pr = m.get("pruned", {})
    lines = ["", f"resprune run: {run.path}", *(f"  {r[0]:<24}{r[1]:>10}{r[2]:>10}{r[3]:>10}" for r in rows),
             f"  layers removed per stage: {pr.get('removed_per_stage', {})} ({pr.get('removed', 0)} units)"]
    if (run / "report.md").is_file():
        lines.append(f"  report: {run / 'report.md'}")
    return lines
