#!/usr/bin/env python3
"""INT8 on top of layer pruning: accuracy and latency of the published CIFAR-10 models.

Two sub-commands:

``calibration``: the calibration sweep that chose the defaults of ``[quantize]``. For one
fp32 model (default: the pruned ResNet-56), every calibration method × number of training
images × calibration draw (seed), plus activation type and first/last layer kept in fp32:
accuracy fp32 → INT8 and top-1 agreement on the full test split. Writes
``benchmarks/results/int8_calibration.md`` and ``.json``. Accuracy only (no timing), so it
may run on a busy machine (``nice``).

``models``: the published models (``benchmarks/results/cifar10/<folder>/pruned.onnx``).
Quantizes each (``--method``, ``--images``; ``--publish`` writes ``pruned.int8.onnx`` and
its sidecar beside the fp32 file, otherwise a work folder), evaluates fp32 and INT8 on the
full test split, and with ``--timing`` times, interleaved, fp32 unpruned / fp32 pruned /
INT8 pruned / INT8 unpruned in onnxruntime and (where installed) OpenVINO (fp32, bf16 and
the same INT8 file) at batch 1 and 64 with 1 and 2 threads, plus a roofline probe of the
CPU (``int8_timing.py``). Writes ``benchmarks/results/int8.md`` and ``.json``.
The ResNet-110 baseline has no published ONNX file: its latency rows use the same
architecture with random weights (latency does not depend on the weights), exported and
quantized here, and no accuracy.

Run the timing on an idle machine (about 10 minutes on 2 cores)::

    python benchmarks/int8.py models --data-dir DATA --timing --use-published
    nice -n 19 python benchmarks/int8.py calibration --data-dir DATA     # accuracy only
    nice -n 19 python benchmarks/int8.py models --data-dir DATA --publish  # the published INT8 files
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import header, write_report  # noqa: E402

from resprune.data import load_arrays  # noqa: E402
from resprune.quantize import (  # noqa: E402
    DEFAULT_ACTIVATIONS, DEFAULT_IMAGES, DEFAULT_METHOD, METHODS, calibration_subset, int8_path, quantize_onnx,
)

ROOT = Path(__file__).resolve().parents[1]
CIFAR = ROOT / "benchmarks" / "results" / "cifar10"
RESULTS = ROOT / "benchmarks" / "results"
#: family → (unpruned fp32 folder or None: random-weight architecture, pruned fp32 folder)
FAMILIES = {"resnet56": ("resnet56_cpu_baseline", "resnet56_cpu"), "resnet110": (None, "resnet110_cpu")}
EXTRA = ("resnet56_cpu_scratch",)  # published, quantized and evaluated, not timed (same architecture)
KEEP_VARIANTS = ((), ("first",), ("last",), ("first", "last"))


def quantize(src: Path, dst: Path, data, *, method: str, images: int, activations: str = DEFAULT_ACTIVATIONS,
             keep: tuple = (), seed: int = 0, min_agreement: float | None = None, check: int | None = None) -> dict:
    """:func:`resprune.quantize.quantize_onnx` with ``images`` training images (draw ``seed``)
    and the whole test split (``check``: a fixed draw of that many) as the held-out set; the
    sidecar plus the wall time."""
    tr, te = data
    idx = calibration_subset(len(tr.labels), images, seed)
    held = calibration_subset(len(te.labels), check or len(te.labels))
    kw = {} if min_agreement is None else {"min_agreement": min_agreement}
    t0 = time.perf_counter()
    info = quantize_onnx(src, dst, tr.images[idx], te.images[held], te.labels[held], method=method,
                         activations=activations,
                         keep_fp32=keep, split_images=len(te.labels),
                         calibration_info={"dataset": "cifar10", "split": "train", "seed": seed,
                                           "draw": "uniform without replacement (numpy default_rng)"}, **kw)
    info["wall_s"] = time.perf_counter() - t0
    return info


# --------------------------------------------------------------------------- calibration sweep


def _row(info: dict, **key) -> dict:
    c = info["check"]
    return {**key, "fp32_acc": c["fp32_accuracy"], "int8_acc": c["int8_accuracy"],
            "delta_pt": round(c["int8_accuracy"] - c["fp32_accuracy"], 2), "agreement": c["top1_agreement"],
            "bytes": info["onnx_bytes"], "wall_s": round(info["wall_s"], 1)}


def cmd_calibration(args: argparse.Namespace) -> int:
    lines, facts = header("INT8 calibration: method × images on " + args.model.parent.name,
                          f"{len(args.methods)} methods × {len(args.images)} image counts × {len(args.seeds)} draws")
    data = load_arrays("cifar10", args.data_dir)
    rows = []
    with tempfile.TemporaryDirectory(prefix="int8-cal-") as td:
        dst = Path(td) / "m.int8.onnx"
        for method in args.methods:
            for n in args.images:
                for seed in args.seeds:
                    info = quantize(args.model, dst, data, method=method, images=n, seed=seed, min_agreement=0.0)
                    rows.append(_row(info, method=method, images=n, seed=seed, activations=DEFAULT_ACTIVATIONS,
                                     keep=[]))
                    print(json.dumps(rows[-1]), flush=True)
        for acts, keep in [(a, ()) for a in ("int8", "uint8") if a != DEFAULT_ACTIVATIONS] + \
                [(DEFAULT_ACTIVATIONS, k) for k in KEEP_VARIANTS[1:]]:
            info = quantize(args.model, dst, data, method=DEFAULT_METHOD, images=DEFAULT_IMAGES, activations=acts,
                            keep=keep, min_agreement=0.0)
            rows.append(_row(info, method=DEFAULT_METHOD, images=DEFAULT_IMAGES, seed=0, activations=acts,
                             keep=list(keep)))
            print(json.dumps(rows[-1]), flush=True)
    facts["loadavg_end"] = list(os.getloadavg())
    md = lines + ["", *calibration_tables(rows)]
    write_report(args.out, "\n".join(md), {**facts, "model": str(args.model), "rows": rows})
    print("\n".join(md))
    return 0


def calibration_tables(rows: list[dict]) -> list[str]:
    """Mean (min–max over draws) accuracy per method and image count; then the variants."""
    base = [r for r in rows if not r["keep"] and r["activations"] == DEFAULT_ACTIVATIONS]
    fp32 = base[0]["fp32_acc"] if base else None
    out = [f"fp32 accuracy on the full test split: {fp32}%. INT8: QDQ, per-channel symmetric int8 weights, "
           f"{DEFAULT_ACTIVATIONS} activations; accuracy on all 10,000 test images, mean (min–max) over the "
           "calibration draws; agreement = top-1 agreement with fp32.", "",
           "| method | images | INT8 accuracy (%) | Δ vs fp32 (pt) | top-1 agreement | draws |",
           "|---|---:|---:|---:|---:|---:|"]
    for method in dict.fromkeys(r["method"] for r in base):
        for n in dict.fromkeys(r["images"] for r in base):
            rs = [r for r in base if r["method"] == method and r["images"] == n]
            if not rs:
                continue
            acc = [r["int8_acc"] for r in rs]
            agr = [r["agreement"] for r in rs]
            out.append(f"| {method} | {n} | {np.mean(acc):.2f} ({min(acc):.2f}–{max(acc):.2f}) | "
                       f"{np.mean(acc) - rs[0]['fp32_acc']:+.2f} | {np.mean(agr):.2%} | {len(rs)} |")
    var = [r for r in rows if r not in base]
    if var:
        out += ["", f"Variants ({DEFAULT_METHOD}, {DEFAULT_IMAGES} images, draw 0):", "",
                "| activations | kept in fp32 | INT8 accuracy (%) | Δ vs fp32 (pt) | top-1 agreement |",
                "|---|---|---:|---:|---:|"]
        out += [f"| {r['activations']} | {', '.join(r['keep']) or '–'} | {r['int8_acc']:.2f} | "
                f"{r['delta_pt']:+.2f} | {r['agreement']:.2%} |" for r in var]
    return out


# --------------------------------------------------------------------------- published models


def _fp32_info(path: Path) -> dict:
    return json.loads(path.with_suffix(".json").read_text())


def evaluate_published(src: Path, data, check: int | None) -> dict:
    """The published INT8 file of ``src`` (its sidecar checked against its bytes and its fp32
    source) evaluated beside ``src`` like :func:`quantize` does: the same record, no quantizing."""
    from resprune.onnx import sha256_file
    from resprune.quantize import predict, preprocess

    dst = int8_path(src)
    info = json.loads(dst.with_suffix(".json").read_text())
    if info["onnx_sha256"] != sha256_file(dst) or info["source"]["sha256"] != sha256_file(src):
        raise SystemExit(f"{dst}: its sidecar does not match it or its fp32 source; re-run with --publish")
    _, te = data
    held = calibration_subset(len(te.labels), check or len(te.labels))
    x, y = preprocess(te.images[held], info["preprocess"]), te.labels[held]
    ref, got = predict(src, x).argmax(1), predict(dst, x).argmax(1)
    info["check"] = {**info["check"], "images": len(y), "top1_agreement": float(np.mean(ref == got)),
                     "fp32_accuracy": round(100 * float(np.mean(ref == y)), 2),
                     "int8_accuracy": round(100 * float(np.mean(got == y)), 2)}
    info["wall_s"] = 0.0
    return info


def accuracy_rows(args: argparse.Namespace, data, work: Path) -> tuple[list[dict], dict[str, Path]]:
    """Quantize (or with ``--use-published`` take) every published model; their accuracy rows
    and {folder: INT8 path}."""
    rows, paths = [], {}
    for folder in [p for fam in FAMILIES.values() for p in fam if p] + list(EXTRA):
        src = CIFAR / folder / "pruned.onnx"
        dst = int8_path(src) if args.publish or args.use_published else work / folder / "pruned.int8.onnx"
        info = (evaluate_published(src, data, args.check_images) if args.use_published else
                quantize(src, dst, data, method=args.method, images=args.images, check=args.check_images))
        fp = _fp32_info(src)
        rows.append({"folder": folder, "macs": fp["macs_per_sample"], "fp32_bytes": fp["onnx_bytes"],
                     "int8_bytes": info["onnx_bytes"], **_row(info)})
        paths[folder] = dst
        print(json.dumps(rows[-1]), flush=True)
    return rows, paths


def accuracy_table(rows: list[dict]) -> list[str]:
    out = ["| model | MACs (M) | fp32 → INT8 accuracy (%) | Δ (pt) | top-1 agreement | file fp32 → INT8 (KiB) |",
           "|---|---:|---:|---:|---:|---:|"]
    out += [f"| `{r['folder']}` | {r['macs'] / 1e6:.2f} | {r['fp32_acc']:.2f} → {r['int8_acc']:.2f} | "
            f"{r['delta_pt']:+.2f} | {r['agreement']:.2%} | {r['fp32_bytes'] / 1024:.0f} → "
            f"{r['int8_bytes'] / 1024:.0f} |"
            for r in rows]
    return out


def cmd_models(args: argparse.Namespace) -> int:
    made = "the published INT8 files" if args.use_published else f"{args.method}, {args.images} calibration images"
    lines, facts = header("INT8 on the published CIFAR-10 models", f"{made}; timing: "
                          + (f"{args.runs} runs in {args.blocks} blocks" if args.timing else "not run"))
    data = load_arrays("cifar10", args.data_dir)
    out: dict = {**facts, "method": args.method, "images": args.images}
    with tempfile.TemporaryDirectory(prefix="int8-models-") as td:
        rows, paths = accuracy_rows(args, data, Path(td))
        held = f"a fixed draw of {args.check_images} test images" if args.check_images else "all 10,000 test images"
        md = lines + ["", f"## Accuracy ({held})", "", *accuracy_table(rows)]
        out["accuracy"] = rows
        if args.timing:
            from int8_timing import timing_section

            args.accuracy_rows = rows
            section, out["timing"] = timing_section(args, data, paths, Path(td), quantize)
            md += ["", *section]
    out["loadavg_end"] = list(os.getloadavg())
    write_report(args.out, "\n".join(md), out)
    print("\n".join(md))
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("calibration", help="method × images sweep on one model (accuracy only)")
    c.add_argument("--model", type=Path, default=CIFAR / "resnet56_cpu" / "pruned.onnx")
    c.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    c.add_argument("--images", nargs="+", type=int, default=[100, 500, 1000])
    c.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="calibration draws")
    c.add_argument("--out", type=Path, default=RESULTS / "int8_calibration.md")
    c.set_defaults(func=cmd_calibration)
    m = sub.add_parser("models", help="the published models: quantize, accuracy, (--timing) latency")
    m.add_argument("--method", default=DEFAULT_METHOD, choices=METHODS)
    m.add_argument("--images", type=int, default=DEFAULT_IMAGES)
    m.add_argument("--publish", action="store_true", help="write pruned.int8.onnx + sidecar into the published folders")
    m.add_argument("--use-published", action="store_true",
                   help="evaluate and time the published pruned.int8.onnx files instead of quantizing again")
    m.add_argument("--check-images", type=int, help="accuracy on a fixed draw of this many test images (a quick check; "
                                                    "default: all)")
    m.add_argument("--timing", action="store_true", help="also time the models (idle machine)")
    m.add_argument("--runtimes", nargs="+", default=["onnxruntime", "openvino"], help="openvino: where installed")
    m.add_argument("--batch", nargs="+", type=int, default=[1, 64])
    m.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    m.add_argument("--runs", type=int, default=40, help="timed rounds per batch and thread count")
    m.add_argument("--warmup", type=int, default=3, help="untimed rounds per block")
    m.add_argument("--blocks", type=int, default=5, help="blocks of fresh sessions")
    m.add_argument("--out", type=Path, help="default benchmarks/results/int8.md, without --timing int8_accuracy.md")
    m.set_defaults(func=cmd_models)
    for q in (c, m):
        q.add_argument("--data-dir", default=os.environ.get("RESPRUNE_DATA"), help="CIFAR-10 (default $RESPRUNE_DATA)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.command == "models" and args.publish and args.use_published:
        raise SystemExit("--publish and --use-published exclude each other")
    if args.command == "models" and args.out is None:
        args.out = RESULTS / ("int8.md" if args.timing else "int8_accuracy.md")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
