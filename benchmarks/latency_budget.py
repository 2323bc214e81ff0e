#!/usr/bin/env python3
"""Latency-budgeted pruning (issue 18): how well a latency table predicts pruned models, and
what a latency budget buys over a MACs budget.

Part 1, prediction accuracy: for each architecture (ResNet-56, ResNet-110; a fresh ResConv
model with layer scales drawn from a fixed seed: latency does not depend on weight values),
the unpruned model is exported and a table is made with ``export/latency_table.py`` (run as
a subprocess, as on a target device) at every (batch, threads). Pruned models are chosen
with the first table (``target_latency_ms`` = each ``--targets`` fraction of the predicted
unpruned latency, rank ``scale_per_ms``), fused and exported once, then, per (batch,
threads), predicted with that configuration's table and timed with ``export/ort_bench.py``
(interleaved with the unpruned model). Reported: the relative error of the predicted
latency against the measured 25th percentile (the tables' statistic), with the table's
full model (fixed part from the model without its shape-keeping convs, cache penalty from the whole model, see latency_table.py)
and with the per-layer sums alone (no cache penalty), and the error of the predicted ratio
pruned/unpruned against the measured ratio (one session, interleaved).

Part 2, latency vs MACs budget (``--run-dir``: a finished run, e.g. ``resprune run
quickstart``): along the greedy removal in rank order ``scale_per_mac`` (what a MACs budget
prefers) and ``scale_per_ms`` (latency), the test accuracy of every candidate (no
fine-tuning); for each accuracy budget the cheapest candidate of each order is exported and
timed; which layers each removed.

Full run (quiet machine, about 15-20 minutes on 2 cores):

    nice python benchmarks/latency_budget.py --run-dir runs/quickstart

``--quick`` (ResNet-56, batch 1, 1 thread, 2 targets, few runs) checks that it works.
Writes ``--out`` (benchmarks/results/latency_budget) .md, .json and .png.
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

import resprune as rp
from resprune.latency import LatencyTable, layer_signatures

ROOT = Path(__file__).resolve().parent.parent
TOOL, BENCH = ROOT / "export" / "latency_table.py", ROOT / "export" / "ort_bench.py"
SIZE = (1, 3, 32, 32)


def make_table(onnx_path: Path, batch: int, threads: int, runs: int, blocks: int, out: Path) -> dict:
    subprocess.run([sys.executable, str(TOOL), str(onnx_path), "--batch", str(batch), "--threads", str(threads),
                    "--runs", str(runs), "--blocks", str(blocks), "--quiet", "--allow-noisy", "--json", str(out)],
                   check=True)  # a noisy table is kept and flagged (table_clean), not fatal to a long run
    return json.loads(out.read_text())


def measure(paths: list[Path], batch: int, threads: int, runs: int, blocks: int, out: Path) -> list[float]:
    """25th percentile (ms) of each model, timed interleaved in one ort_bench process: the
    statistic latency tables predict (export/latency_table.py: load only adds time)."""
    subprocess.run([sys.executable, str(BENCH), *map(str, paths), "--batch", str(batch), "--threads", str(threads),
                    "--runs", str(runs), "--blocks", str(blocks), "--warmup", "3", "--no-memory", "--quiet",
                    "--json", str(out)], check=True)
    rows = json.loads(out.read_text())["results"]
    return [r["q25_ms"] for r in rows]


def uncalibrated(table: dict, model, size=SIZE) -> float:
    """The per-layer sum alone: the fixed part plus the micro-graph costs, no cache penalty."""
    tab = LatencyTable(table)
    return tab.fixed_ms + sum(tab.layer_ms(layer_signatures(model, size)).values())


def random_scales(arch: str, seed: int = 0):
    torch.manual_seed(seed)
    m = rp.create_model(arch).eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.endswith("scale"):
                p.uniform_(0.0, 1.0)
    return m


def part1_arch(arch: str, args, tmp: Path) -> list[dict]:
    """Prediction error of one architecture at every (batch, threads) and target."""
    model = random_scales(arch)
    full = tmp / f"{arch}.onnx"
    rp.export_onnx(model, full, SIZE)
    configs = [(b, t) for b in args.batches for t in args.threads]
    tables = {c: make_table(full, *c, args.table_runs, args.blocks, tmp / f"{arch}_b{c[0]}_t{c[1]}.json")
              for c in configs}
    first = str(tmp / f"{arch}_b{configs[0][0]}_t{configs[0][1]}.json")
    base = LatencyTable.load(first).predict(model)
    pruned = []
    for f in args.targets:
        m = copy.deepcopy(model)
        rep = rp.prune_(m, rp.PruneConfig(target_latency_ms=f * base, latency_table=first, rank="scale_per_ms"))
        path = tmp / f"{arch}_{f:g}.onnx"
        rp.export_onnx(m, path, SIZE)
        pruned.append((f, m, path, rep))
    rows = []
    for c in configs:
        tab = LatencyTable(tables[c], f"{arch} b{c[0]} t{c[1]}")
        meas = measure([full] + [p for _, _, p, _ in pruned], *c, args.runs, args.blocks, tmp / "bench.json")
        p_full = tab.predict(model)
        for (f, m, _, rep), ms in zip(pruned, meas[1:]):
            pred, raw = tab.predict(m), uncalibrated(tables[c], m)
            rows.append({"arch": arch, "batch": c[0], "threads": c[1], "target_fraction": f,
                         "removed": len(rep.removed), "macs_fraction": rep.macs_after / rep.macs_before,
                         "predicted_ms": pred, "measured_ms": ms, "error": pred / ms - 1,
                         "uncalibrated_ms": raw, "uncalibrated_error": raw / ms - 1,
                         "ratio_predicted": pred / p_full, "ratio_measured": ms / meas[0],
                         "ratio_error": (pred / p_full) / (ms / meas[0]) - 1,
                         "unpruned_measured_ms": meas[0], "unpruned_table_ms": tables[c]["model"]["latency_ms"],
                         "penalty_ms_per_mb": tables[c]["penalty_ms_per_mb"],
                         "table_clean": tables[c].get("noise", {}).get("clean", True),
                         "unit_share": _unit_share(pruned[0][3])})
    return rows


def _unit_share(rep) -> float:
    """Median predicted saving of one removal step, as a fraction of the unpruned latency
    (what timing the whole model with units removed would have to resolve)."""
    path = rep.latency["candidates"]["scale"]
    return float(np.median([a[1] - b[1] for a, b in zip(path, path[1:])]) / path[0][1])


def _evaluate_fn(run_dir: Path):
    from resprune.config import recipe_from_dict
    from resprune.train.loop import evaluate
    from resprune.train.pipeline import _loaders

    recipe = recipe_from_dict(json.loads((run_dir / "recipe.json").read_text()))
    _, test_l = _loaders(recipe, torch.device("cpu"))
    return lambda m: evaluate(m.eval(), test_l)[1]


def part2(args, tmp: Path) -> dict:
    """Accuracy against predicted latency along the two rank orders on a trained model."""
    run_dir = Path(args.run_dir)
    evaluate_acc = _evaluate_fn(run_dir)
    sparse = rp.load(run_dir / "sparse.pt").eval()
    size = tuple(json.loads((run_dir / "onnx" / "unpruned.json").read_text())["input_shape"][1:])
    size = (1, *size)
    full = tmp / "trained.onnx"
    rp.export_onnx(sparse, full, size)
    tpath = tmp / "trained_table.json"
    make_table(full, args.batches[0], args.threads[0], args.table_runs, args.blocks, tpath)
    acc0 = evaluate_acc(copy.deepcopy(sparse))
    probe = rp.prune_(copy.deepcopy(sparse), rp.PruneConfig(threshold=1e-12, latency_table=str(tpath), input_size=size))
    paths = {}
    for rank in ("scale_per_mac", "scale_per_ms"):
        pts = []
        for macs, ms in probe.latency["candidates"][rank]:
            m = copy.deepcopy(sparse)
            cfg = (rp.PruneConfig(target_latency_ms=ms + 1e-9, latency_table=str(tpath), rank=rank, input_size=size)
                   if rank == "scale_per_ms" else
                   rp.PruneConfig(target_macs=int(macs), latency_table=str(tpath), rank=rank, input_size=size))
            rep = rp.prune_(m, cfg)
            pts.append({"macs": rep.macs_after, "predicted_ms": rep.latency["predicted_after_ms"],
                        "acc": evaluate_acc(m), "removed": rep.removed, "model": m})
        paths[rank] = pts
    picks = []
    for drop in args.acc_drops:
        row = {"acc_drop": drop}
        for rank, pts in paths.items():
            ok = [p for p in pts if p["acc"] >= acc0 - drop]
            best = min(ok, key=lambda p: p["predicted_ms"] if rank == "scale_per_ms" else p["macs"])
            path = tmp / f"pick_{drop:g}_{rank}.onnx"
            rp.export_onnx(best["model"], path, size)
            row[rank] = {k: best[k] for k in ("macs", "predicted_ms", "acc", "removed")} | {"onnx": path}
        ms = measure([full, row["scale_per_mac"]["onnx"], row["scale_per_ms"]["onnx"]], args.batches[0],
                     args.threads[0], args.runs, args.blocks, tmp / "bench2.json")
        row["unpruned_measured_ms"] = ms[0]
        for rank, v in zip(("scale_per_mac", "scale_per_ms"), ms[1:]):
            row[rank]["measured_ms"] = v
            row[rank].pop("onnx")
        picks.append(row)
    for pts in paths.values():
        for p in pts:
            p.pop("model")
    return {"run_dir": str(run_dir), "acc_unpruned": acc0, "table": json.loads(tpath.read_text())["runtime"],
            "batch": args.batches[0], "threads": args.threads[0], "paths": paths, "picks": picks}


def _pct(v: float) -> str:
    return f"{100 * v:+.1f}%"


def markdown(res: dict) -> str:
    rows, dev = res["part1"], res["device"]
    lines = ["# Latency-budgeted pruning: prediction accuracy and latency vs MACs budgets", "",
             f"Date {res['date']}; {dev['cpu_model']} ({dev['usable_cpus']} usable CPUs), onnxruntime "
             f"{dev['onnxruntime']}, torch {torch.__version__}, Python {sys.version.split()[0]}. Command: "
             f"`{res['command']}`.", "",
             "## Prediction accuracy (fresh ResConv models, random layer scales; pruned with rank scale_per_ms)", "",
             "| model | batch | threads | target | removed | MACs | predicted ms | measured ms (q25) | error | "
             "per-layer sum error | ratio error | cache penalty ms/MB | table clean |", "|" + "---|" * 13]
    for r in rows:
        lines.append(f"| {r['arch']} | {r['batch']} | {r['threads']} | {r['target_fraction']:g} | {r['removed']} | "
                     f"{100 * r['macs_fraction']:.0f}% | {r['predicted_ms']:.3f} | {r['measured_ms']:.3f} | "
                     f"{_pct(r['error'])} | {_pct(r['uncalibrated_error'])} | {_pct(r['ratio_error'])} | "
                     f"{r['penalty_ms_per_mb']:.3g} | {'yes' if r['table_clean'] else 'no (noisy)'} |")
    s = res["summary"]
    lines += ["", f"|error| median {100 * s['median_abs_error']:.1f}%, worst {100 * s['max_abs_error']:.1f}% "
              f"(goal: median <= 5%, worst <= 10%: {'met' if s['goal_met'] else 'MISSED'}); per-layer sums "
              f"without the cache penalty: median {100 * s['median_abs_uncal']:.1f}%, worst {100 * s['max_abs_uncal']:.1f}%; "
              f"ratio pruned/unpruned median {100 * s['median_abs_ratio']:.1f}%, worst {100 * s['max_abs_ratio']:.1f}%.",
              f"One removal step saves a median {100 * s['median_unit_share']:.1f}% of the unpruned latency: "
              "timing the whole model once per unit removed would have to resolve differences of that size, "
              "below the 5% noise floor of one ort_bench comparison, hence micro-graphs per signature plus two "
              "whole-model timings (full and stripped).", ""]
    if res.get("part2"):
        p2 = res["part2"]
        lines += ["## Latency budget vs MACs budget on a trained model", "",
                  f"Run `{p2['run_dir']}`, unpruned (sparse) accuracy {p2['acc_unpruned']:.2f}%, no fine-tuning; "
                  f"batch {p2['batch']}, {p2['threads']} thread(s). Per accuracy budget the cheapest candidate "
                  "of each removal order (scale_per_mac: what a MACs budget prefers; scale_per_ms: latency).", "",
                  "| accuracy drop <= | order | removed | MACs (M) | accuracy | predicted ms | measured ms (q25) | "
                  "unpruned measured ms |", "|" + "---|" * 8]
        for row in p2["picks"]:
            for rank in ("scale_per_mac", "scale_per_ms"):
                v = row[rank]
                lines.append(f"| {row['acc_drop']:g} pt | {rank} | {len(v['removed'])} | {v['macs'] / 1e6:.2f} | "
                             f"{v['acc']:.2f}% | {v['predicted_ms']:.3f} | {v['measured_ms']:.3f} | "
                             f"{row['unpruned_measured_ms']:.3f} |")
            a, b = set(row["scale_per_mac"]["removed"]), set(row["scale_per_ms"]["removed"])
            lines.append(f"| | only in MACs order: {', '.join(sorted(a - b)) or '-'}; only in latency order: "
                         f"{', '.join(sorted(b - a)) or '-'} | | | | | | |")
    return "\n".join(lines) + "\n"


def summarize(rows: list[dict]) -> dict:
    e = [abs(r["error"]) for r in rows]
    u = [abs(r["uncalibrated_error"]) for r in rows]
    q = [abs(r["ratio_error"]) for r in rows]
    return {"median_abs_error": float(np.median(e)), "max_abs_error": max(e), "median_abs_uncal": float(np.median(u)),
            "max_abs_uncal": max(u), "median_abs_ratio": float(np.median(q)), "max_abs_ratio": max(q),
            "median_unit_share": float(np.median([r["unit_share"] for r in rows])),
            "goal_met": float(np.median(e)) <= 0.05 and max(e) <= 0.10}


def plot(res: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for arch in sorted({r["arch"] for r in res["part1"]}):
        rs = [r for r in res["part1"] if r["arch"] == arch]
        ax.scatter([r["measured_ms"] for r in rs], [r["predicted_ms"] for r in rs], label=arch, s=18)
    lim = max(max(r["measured_ms"], r["predicted_ms"]) for r in res["part1"]) * 1.1
    ax.plot([0.01, lim], [0.01, lim], color="0.5", lw=0.8, label="predicted = measured")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("measured latency (ms, onnxruntime)")
    ax.set_ylabel("predicted latency (ms, latency table)")
    ax.set_title("pruned, fused models: predicted against measured\n(all batch sizes, threads, targets)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--archs", nargs="+", default=["resnet56", "resnet110"])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 64])
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--targets", nargs="+", type=float, default=[0.8, 0.6, 0.45])
    ap.add_argument("--runs", type=int, default=20, help="ort_bench runs per model")
    ap.add_argument("--table-runs", type=int, default=20, help="latency_table runs per graph")
    ap.add_argument("--blocks", type=int, default=5)
    ap.add_argument("--run-dir", help="a finished run (e.g. resprune run quickstart) for the MACs vs latency part")
    ap.add_argument("--acc-drops", nargs="+", type=float, default=[0.5, 1.0, 2.0])
    ap.add_argument("--quick", action="store_true", help="ResNet-56, batch 1, 1 thread, 2 targets, few runs")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "latency_budget"))
    args = ap.parse_args(argv)
    if args.quick:
        args.archs, args.batches, args.threads, args.targets = ["resnet56"], [1], [1], [0.7, 0.5]
        args.runs, args.table_runs, args.blocks, args.acc_drops = 6, 6, 2, [1.0]
    import ort_bench  # noqa: F401  (export/ on the path below; only for the device description)
    res = {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
           "command": "python benchmarks/latency_budget.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "device": ort_bench.device_info(), "settings": vars(args)}
    with tempfile.TemporaryDirectory(prefix="latency_budget_") as tmp:
        res["part1"] = [r for a in args.archs for r in part1_arch(a, args, Path(tmp))]
        res["summary"] = summarize(res["part1"])
        res["part2"] = part2(args, Path(tmp)) if args.run_dir else None
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=1, default=str) + "\n")
    out.with_suffix(".md").write_text(markdown(res))
    plot(res, out.with_suffix(".png"))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "export"))
    sys.exit(main())
