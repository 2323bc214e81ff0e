#!/usr/bin/env python3
"""The CIFAR-10 accuracy–latency frontier at equal training compute (issue 27).

Every point is a finished ``resprune run`` directory (its ``metrics.json``, ``recipe.json`` and
``onnx/pruned.onnx``): resprune's pruned ResNet-56 (started from a published teacher with
``model.init``), the dense ResNet-56, ResNet-20/32 and the pruned architecture trained from
scratch, width pruning. Two sub-commands:

* ``teacher RUN OUT``: publish a finished teacher run (its ``sparse.pt``) as
  ``OUT/teacher.safetensors`` plus ``OUT/teacher.json`` (accuracy, MACs, epochs, training
  compute in dense-ResNet-56 epochs and wall time), what pruning recipes start from.
* ``gather --point LABEL=RUN ...``: for each point, the training compute (see below), the
  accuracy of its final fused model, MACs and params; copy its ONNX model + sidecar, recipe
  and metrics to ``benchmarks/results/cifar10/frontier/LABEL/``; time all ONNX models
  interleaved with ``export/ort_bench.py`` (batch 1 and 64, one thread); write
  ``frontier.md``, ``frontier.json`` and ``frontier.png`` there. Points already published
  are kept (``--keep``), so the frontier grows point by point as runs finish.

**Training compute** is counted in dense-ResNet-56 epochs (DEE): one epoch of a net with ``m``
MACs per image costs ``m / M₅₆`` DEE (forward + backward ≈ 3 forward passes for every net); a
distillation teacher adds its forward pass, ``m_T / (3·M₅₆)`` per epoch; a run that starts from
a published teacher (``model.init``) adds the teacher's own DEE from its ``teacher.json``. Wall
time is the sum of the stages' ``wall_s`` (and the teacher's), on the machine that ran them.

    python benchmarks/frontier.py teacher runs/teacher56 benchmarks/results/cifar10/frontier/teacher_resnet56
    python benchmarks/frontier.py gather --point resprune34=runs/p34 --point resnet20=runs/r20 --runs 30
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "cifar10" / "frontier"
M56 = 125_485_696  # MACs of ResNet-56 on 32×32 (conv + linear): the unit of training compute
sys.path.insert(0, str(Path(__file__).parent))


def _json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def _epoch_dee(macs: int, teacher_macs: int | None) -> float:
    """Dense-ResNet-56 epochs of one training epoch of a net with ``macs`` MACs per image,
    plus a distillation teacher's forward pass."""
    return (3 * macs + (teacher_macs or 0)) / (3 * M56)


def _teacher_record(recipe: dict) -> dict | None:
    """The ``teacher.json`` beside ``model.init`` (a published teacher), None without one."""
    init = recipe["model"].get("init")
    if not init:
        return None
    side = Path(init).with_suffix(".json") if Path(init).is_file() else Path(init) / "teacher.json"
    if not side.is_file():
        raise SystemExit(f"{side}: the teacher's record is missing (publish it with `frontier.py teacher`)")
    return _json(side)


def compute(run: Path) -> dict:
    """Training compute of a finished run in DEE and wall seconds, teacher included."""
    recipe, stages = _json(run / "recipe.json"), _json(run / "metrics.json")["stages"]
    teacher = _teacher_record(recipe)
    t_macs = teacher["macs"] if teacher else stages["sparse"]["macs"]  # "sparse" teacher: the unpruned net
    parts = {}
    for key, sec, macs in (("sparse", "train", stages["sparse"]["macs"]),
                           ("finetuned", "finetune", stages.get("pruned", {}).get("macs"))):
        cfg = recipe[sec]
        if key not in stages or not cfg["epochs"]:
            continue
        parts[sec] = cfg["epochs"] * _epoch_dee(macs, t_macs if cfg.get("distill", 0) > 0 else None)
    wall = sum(stages[k].get("wall_s", 0.0) for k in ("sparse", "finetuned") if k in stages)
    if teacher:
        parts["teacher"] = teacher["dee"]
        wall += teacher["wall_s"]
    return {"dee": sum(parts.values()), "dee_parts": parts, "wall_s": wall}


def publish_teacher(run: Path, out: Path) -> dict:
    """``run``'s trained model as ``out/teacher.safetensors`` + ``out/teacher.json``."""
    import resprune as rp
    from resprune.serialization import save_weights

    recipe, sparse = _json(run / "recipe.json"), _json(run / "metrics.json")["stages"]["sparse"]
    model = rp.load(run / "sparse.pt")
    info = {"recipe": recipe["name"], "model": recipe["model"]["name"], "epochs": recipe["train"]["epochs"],
            "test_accuracy": sparse["test_acc"], "macs": sparse["macs"], "params": sparse["params"],
            "dee": recipe["train"]["epochs"] * _epoch_dee(sparse["macs"], None), "wall_s": sparse["wall_s"],
            "hardware": _json(run / "metrics.json").get("hardware"), "dataset": "CIFAR-10 (JPEG copy)",
            "label_smoothing": recipe["train"]["label_smoothing"]}
    out.mkdir(parents=True, exist_ok=True)
    save_weights(model, out / "teacher.safetensors", metadata={k: json.dumps(v) for k, v in info.items()})
    (out / "teacher.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def point(label: str, run: Path) -> dict:
    """One frontier point from a finished run; its files copied to ``OUT/label``."""
    stages = _json(run / "metrics.json")["stages"]
    final = stages["fused"]
    dest = OUT / label
    dest.mkdir(parents=True, exist_ok=True)
    for src, name in ((run / "onnx" / "pruned.onnx", "model.onnx"), (run / "onnx" / "pruned.json", "model.json"),
                      (run / "recipe.json", "recipe.json"), (run / "metrics.json", "metrics.json"),
                      (run / "prune.json", "prune.json")):
        if src.is_file():
            shutil.copyfile(src, dest / name)
    recipe = _json(run / "recipe.json")
    return {"label": label, "run": str(run), "recipe": recipe["name"], "model": recipe["model"]["name"],
            "seed": recipe["train"]["seed"], "test_acc": final["test_acc"], "macs": final["macs"],
            "params": final["params"], **compute(run)}


def time_models(points: list[dict], runs: int, threads: int) -> dict:
    """ort_bench over every point's ONNX model, interleaved: median ms and IQR per batch."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "bench.json"
        cmd = [sys.executable, str(ROOT / "export" / "ort_bench.py"),
               *[str(OUT / p["label"] / "model.onnx") for p in points], "--names", *[p["label"] for p in points],
               "--batch", "1", "64", "--runs", str(runs), "--threads", str(threads), "--no-memory", "--quiet",
               "--json", str(out)]
        subprocess.run(cmd, check=True)
        return _json(out)


def _latency(bench: dict, label: str, batch: int) -> dict:
    for r in bench["results"]:
        if r["model"] == label and r["batch"] == batch:
            return r
    raise KeyError((label, batch))


def _iqr(row: dict) -> float:
    return row["q75_ms"] - row["q25_ms"]


def table(points: list[dict], bench: dict) -> list[str]:
    rows = ["| point | model | seed | test acc. | MACs | params | ms b1 (IQR) | ms b64 (IQR) | DEE | wall |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for p in sorted(points, key=lambda p: p["macs"]):
        b1, b64 = _latency(bench, p["label"], 1), _latency(bench, p["label"], 64)
        rows.append(f"| {p['label']} | {p['model']} | {p['seed']} | {p['test_acc']:.2f}% | {p['macs'] / 1e6:.2f} M | "
                    f"{p['params'] / 1e6:.3f} M | {b1['median_ms']:.3f} ({_iqr(b1):.3f}) | "
                    f"{b64['median_ms']:.2f} ({_iqr(b64):.2f}) | {p['dee']:.1f} | {p['wall_s'] / 60:.0f} min |")
    return rows


def plot(points: list[dict], bench: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 4), constrained_layout=True)
    for ax, (what, get) in zip(axes, (("latency, batch 1 (ms)", lambda p: _latency(bench, p["label"], 1)["median_ms"]),
                                      ("latency, batch 64 (ms)", lambda p: _latency(bench, p["label"], 64)["median_ms"]),
                                      ("MACs (M)", lambda p: p["macs"] / 1e6))):
        for p in points:
            ax.scatter(get(p), p["test_acc"], marker="*" if "resprune" in p["label"] else "o", s=60)
            ax.annotate(p["label"], (get(p), p["test_acc"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel(what)
        ax.set_ylabel("CIFAR-10 test accuracy (%)")
        ax.grid(alpha=0.3)
    fig.suptitle("CIFAR-10 (JPEG copy): accuracy vs onnxruntime latency (1 thread) and MACs")
    fig.savefig(path, dpi=110)


def gather(args) -> int:
    from _common import header, write_report

    old = {p["label"]: p for p in _json(OUT / "frontier.json")["points"]} if (OUT / "frontier.json").is_file() else {}
    new = {}
    for spec in args.point:
        label, _, run = spec.partition("=")
        if not run:
            raise SystemExit(f"--point {spec!r}: expected LABEL=RUN_DIR")
        new[label] = point(label, Path(run))
    points = list({**(old if args.keep else {}), **new}.values())
    bench = time_models(points, args.runs, args.threads)
    lines, facts = header("CIFAR-10 frontier at equal training compute", f"{args.runs} interleaved timing runs")
    lines += ["", *table(points, bench), "",
              "DEE: training compute in dense-ResNet-56 epochs (teacher included, distillation's teacher "
              "forward counted); wall: the runs' own training time on the machine that made them.", ""]
    plot(points, bench, OUT / "frontier.png")
    write_report(OUT / "frontier.md", "\n".join(lines) + "\n",
                 {**facts, "points": points, "bench": bench})
    print("\n".join(lines))
    return 0


def _cifar_loaders(data_dir: str | None, batch: int = 128):
    import torch

    from resprune.config import DataConfig
    from resprune.data import DeviceLoader, load_arrays

    tr, te = load_arrays("cifar10", data_dir)
    cfg, cpu = DataConfig(dataset="cifar10", batch_size=batch, eval_batch_size=1000), torch.device("cpu")
    train = DeviceLoader.from_config(tr, cfg, train=True, device=cpu, seed=0)
    mean, std = train.mean_std
    return train, DeviceLoader.from_config(te, cfg, train=False, device=cpu, mean=mean, std=std)


def ablate(args) -> int:
    """Accuracy right after pruning the teacher to each budget (no fine-tuning), by each
    ranking, with and without BatchNorm recalibration: the prune-time fixes measured alone."""
    import itertools

    import resprune as rp
    from _common import header, write_report
    from resprune.prune import recalibrate_bn_, taylor_scores
    from resprune.serialization import load_weights_
    from resprune.train.loop import evaluate

    train, test = _cifar_loaders(args.data_dir)
    lines, facts = header("Pruning the trained ResNet-56 without fine-tuning: ranking × BN recalibration",
                          "one teacher, one pass each (deterministic given the batches)")
    rows, data = ["| MACs kept | rank | removed | MACs | acc. (stale BN) | acc. (BN recalibrated) |",
                  "|---:|---|---:|---:|---:|---:|"], []
    teacher = load_weights_(rp.create_model("resnet56", num_classes=10), args.teacher)
    _, acc0 = evaluate(teacher.eval(), test)
    plain = [(x, y) for x, y, _ in itertools.islice(train.indexed(augment=False), args.taylor_batches)]
    scores = taylor_scores(teacher, plain)
    for target, rank in itertools.product(args.targets, ("scale", "gain", "taylor")):
        model = load_weights_(rp.create_model("resnet56", num_classes=10), args.teacher)
        rep = rp.prune_(model, rp.PruneConfig(target_macs=target, rank=rank), scores=scores)
        _, stale = evaluate(model.eval(), test)
        recalibrate_bn_(model, (x for x, _ in itertools.islice(train, args.recalibrate_batches)))
        _, recal = evaluate(model.eval(), test)
        data.append({"target": target, "rank": rank, "removed": rep.removed, "macs": rep.macs_after,
                     "acc_stale_bn": stale, "acc_recalibrated": recal})
        rows.append(f"| {target:.3f} | {rank} | {len(rep.removed)} | {rep.macs_after / 1e6:.2f} M | {stale:.2f}% | "
                    f"{recal:.2f}% |")
        print(rows[-1], flush=True)
    lines += ["", f"Teacher `{args.teacher}`: {acc0:.2f}% (CIFAR-10 JPEG copy, 10,000 test images, fp32). Taylor "
              f"scores over {args.taylor_batches} plain training batches of 128; recalibration over "
              f"{args.recalibrate_batches} augmented training batches of 128.", "", *rows]
    write_report(OUT / "prune_ablation.md", "\n".join(lines) + "\n", {**facts, "teacher_acc": acc0, "rows": data})
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("teacher", help="publish a finished teacher run as safetensors + teacher.json")
    t.add_argument("run", type=Path)
    t.add_argument("out", type=Path)
    g = sub.add_parser("gather", help="table, plot and published models of finished runs")
    g.add_argument("--point", action="append", default=[], help="LABEL=RUN_DIR (repeatable)")
    g.add_argument("--keep", action=argparse.BooleanOptionalAction, default=True,
                   help="keep points published earlier (default)")
    g.add_argument("--runs", type=int, default=30)
    g.add_argument("--threads", type=int, default=1)
    a = sub.add_parser("ablate", help="accuracy right after pruning the teacher: ranking × BN recalibration")
    a.add_argument("teacher", help="the teacher's weights (teacher.safetensors)")
    a.add_argument("--data-dir", default=None)
    a.add_argument("--targets", type=float, nargs="+", default=[0.345, 0.5])
    a.add_argument("--taylor-batches", type=int, default=16)
    a.add_argument("--recalibrate-batches", type=int, default=50)
    args = ap.parse_args(argv)
    if args.cmd == "ablate":
        return ablate(args)
    if args.cmd == "teacher":
        print(json.dumps(publish_teacher(args.run, args.out), indent=2))
        return 0
    return gather(args)


if __name__ == "__main__":
    sys.exit(main())
