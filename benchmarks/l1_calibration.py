"""Calibrate λ (``train.l1``): how many layers each λ drives to exactly zero, and at what cost.

For each λ the recipe's sparse training runs on a fixed subset of the training set
(``data.train_limit``), then threshold pruning at the recipe's default threshold. Per λ the
table gives: removable layer scales exactly 0, scales below the threshold, units removed,
MACs removed, test accuracy sparse-trained and after pruning (no fine-tuning), wall time.
The plot shows MACs removed and accuracy against λ.

    python benchmarks/l1_calibration.py resnet56_cifar10_cpu --data-dir DATA \\
        --limit 10000 --epochs 8 --l1 0 0.003 0.01 0.03 0.1 --out benchmarks/results/l1_calibration

Each λ runs through the pipeline's own ``stage_train`` and ``stage_prune`` in a run directory
under ``--work`` (default: a temporary folder, deleted afterwards).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from resprune.config import load_recipe
from resprune.rundir import RunDir
from resprune.stages import stage_prune, stage_train
from resprune.util import hardware


def run_one(recipe_name: str, l1: float, args, work: Path) -> dict:
    over = [f"train.l1={l1}", f"train.epochs={args.epochs}", f"data.train_limit={args.limit}",
            f"train.eval_every={args.epochs}", f"prune.threshold={args.threshold}", "prune.target_macs=null",
            f"train.seed={args.seed}"]
    if args.data_dir:
        over.append(f"data.data_dir={args.data_dir}")
    recipe = load_recipe(recipe_name, over)
    run = RunDir(work / f"l1-{l1:g}")
    run.path.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    sparse = stage_train(recipe, run)
    try:
        pruned = stage_prune(recipe, run)
    except ValueError as exc:  # the threshold would empty a stage: λ is too strong for this net
        from resprune.serialization import load
        from resprune.sparsity import scale_stats

        values = scale_stats(load(run / "sparse.pt"), args.threshold).values
        return {"l1": l1, "scales": len(values), "zero": sum(v == 0.0 for v in values),
                "below_threshold": sum(abs(v) < args.threshold for v in values), "removed_units": None,
                "macs_before": None, "macs_after": None, "macs_removed_pct": None,
                "sparse_acc": sparse["test_acc"], "pruned_acc": None, "wall_s": time.perf_counter() - t0,
                "median_abs_scale": sorted(abs(v) for v in values)[len(values) // 2], "refused": str(exc)}
    prune = json.loads((run / "prune.json").read_text())
    values = prune["scales"]["values"]
    return {
        "l1": l1, "scales": len(values), "zero": sum(v == 0.0 for v in values),
        "below_threshold": sum(abs(v) < args.threshold for v in values),
        "removed_units": pruned["removed"], "macs_before": prune["macs_before"], "macs_after": prune["macs_after"],
        "macs_removed_pct": 100.0 * (1 - prune["macs_after"] / prune["macs_before"]),
        "sparse_acc": sparse["test_acc"], "pruned_acc": pruned["test_acc"], "wall_s": time.perf_counter() - t0,
        "median_abs_scale": sorted(abs(v) for v in values)[len(values) // 2],
    }


def write(rows: list[dict], args, out: Path, what: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.parent.mkdir(parents=True, exist_ok=True)
    hw = hardware()
    lines = [
        f"# λ calibration: {args.recipe}, {args.limit} training images, {args.epochs} epochs", "",
        f"{what}; test set: all test images. Threshold pruning at |s| < {args.threshold:g}, no fine-tuning. "
        f"One run per λ (seed {args.seed}). {hw['cpu']}, {hw['cores']} cores, torch {hw['torch']}, "
        f"{time.strftime('%Y-%m-%d')}. Command: `python benchmarks/l1_calibration.py {' '.join(args.argv)}`", "",
        "| λ | scales = 0 | \\|s\\| < thr | units removed | MACs removed | acc sparse (%) | acc pruned (%) | median \\|s\\| | wall (s) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if r.get("refused"):
            lines.append(f"| {r['l1']:g} | {r['zero']}/{r['scales']} | {r['below_threshold']} | refused: the threshold "
                         f"would empty a stage | – | {r['sparse_acc']:.2f} | – | {r['median_abs_scale']:.3g} | "
                         f"{r['wall_s']:.0f} |")
            continue
        lines.append(f"| {r['l1']:g} | {r['zero']}/{r['scales']} | {r['below_threshold']} | {r['removed_units']} | "
                     f"{r['macs_removed_pct']:.1f}% | {r['sparse_acc']:.2f} | {r['pruned_acc']:.2f} | "
                     f"{r['median_abs_scale']:.3g} | {r['wall_s']:.0f} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps({"rows": rows, "hardware": hw, "args": vars(args) | {"argv": None}},
                                                   indent=1, default=str) + "\n")
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    floor = min((x["l1"] for x in rows if x["l1"] > 0), default=1e-3) / 3
    xs = [max(r["l1"], floor) for r in rows]  # λ = 0 drawn left of the rest
    ax.plot(xs, [r["macs_removed_pct"] if r["macs_removed_pct"] is not None else float("nan") for r in rows], "o-",
            label="MACs removed (threshold pruning)")
    ax.set_xscale("log")
    ax.set_xlabel("λ (train.l1; λ = 0 drawn at the left edge)")
    ax.set_ylabel("MACs removed (%)")
    ax.axhline(50, color="gray", lw=0.8, ls=":")
    ax2 = ax.twinx()
    ax2.plot(xs, [r["sparse_acc"] for r in rows], "s--", color="C1", label="test accuracy, sparse-trained")
    ax2.plot(xs, [r["pruned_acc"] if r["pruned_acc"] is not None else float("nan") for r in rows], "^:", color="C2",
             label="test accuracy, pruned")
    ax2.set_ylabel("test accuracy (%)")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=8, loc="center left")
    ax.set_title(f"{args.recipe}: {args.limit} images × {args.epochs} epochs", fontsize=10)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)


def main(argv: list[str] | None = None) -> None:
    import sys

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("recipe")
    ap.add_argument("--data-dir")
    ap.add_argument("--limit", type=int, default=10000, help="training images (fixed random subset)")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--l1", type=float, nargs="+", default=[0.0, 0.003, 0.01, 0.03, 0.1])
    ap.add_argument("--threshold", type=float, default=1e-2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--work", type=Path, help="keep the run directories here")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/l1_calibration"))
    args = ap.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else argv
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []  # rows of an earlier run with the same --out are kept unless their λ is run again
    if args.out.with_suffix(".json").is_file():
        rows = [r for r in json.loads(args.out.with_suffix(".json").read_text())["rows"] if r["l1"] not in args.l1]
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        for l1 in args.l1:
            r = run_one(args.recipe, l1, args, work)
            rows = sorted([*rows, r], key=lambda x: x["l1"])
            print(f"λ={l1:g}: {r['zero']}/{r['scales']} zero, {r['removed_units']} units removed, "
                  f"{r['macs_removed_pct']}% MACs, acc {r['sparse_acc']:.2f} → {r['pruned_acc']}", flush=True)
            write(rows, args, args.out, f"data: {load_recipe(args.recipe).data.dataset} from "
                  f"{args.data_dir or 'the recipe/RESPRUNE_DATA'}, fixed random training subset")
    print(f"wrote {args.out.with_suffix('.md')}, .json, .png")


if __name__ == "__main__":
    main()
