#!/usr/bin/env python3
"""Accuracy of an exported resprune model on an ImageFolder test tree, without torch.

Needs only ``numpy``, ``onnxruntime`` and ``Pillow``. The model's sidecar (``MODEL.json``
beside ``MODEL.onnx``) says how to turn a raw image into the network's input
(``preprocess``: uint8 pixels × ``scale``, minus ``mean``, over ``std`` per channel, in
``layout`` with channels in ``color`` order) and which class each output is (``classes``);
the test tree is ``DIR/<class name>/*.jpg|png|...`` (or ``DIR/test/<class name>/...``).

    python3 export/eval_onnx.py benchmarks/results/cifar10/resnet56_pruned.onnx /data/cifar10/test

prints the top-1 accuracy and compares it with the sidecar's ``test_accuracy``; the exit
status is 1 when they differ by more than ``--tol`` percentage points, 2 on bad input
(missing files, a sidecar without ``preprocess``/``classes``, a class folder the model does
not know), 0 otherwise.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np

IMG_EXT = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


class EvalError(Exception):
    """Bad input: the message says which file or field."""


def load_sidecar(model: Path) -> dict:
    side = model.with_suffix(".json")
    if not model.is_file():
        raise EvalError(f"{model}: no such ONNX file")
    if not side.is_file():
        raise EvalError(f"{side}: sidecar missing (it is written next to the .onnx by `resprune export`)")
    try:
        info = json.loads(side.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise EvalError(f"{side}: not valid JSON: {exc}") from exc
    for key in ("preprocess", "classes"):
        if key not in info:
            raise EvalError(f"{side}: no {key!r} field; re-export the model with a current resprune")
    pre = info["preprocess"]
    for key in ("scale", "mean", "std", "layout", "color"):
        if key not in pre:
            raise EvalError(f"{side}: preprocess has no {key!r}")
    if pre["layout"] not in ("NCHW", "NHWC") or pre["color"] not in ("RGB", "L"):
        raise EvalError(f"{side}: unsupported layout/color {pre['layout']}/{pre['color']}")
    digest = info.get("onnx_sha256")
    if digest and hashlib.sha256(model.read_bytes()).hexdigest() != digest:
        raise EvalError(f"{model}: sha256 differs from its sidecar's: not the file that was exported and checked")
    return info


def list_images(root: Path, classes: list[str]) -> list[tuple[Path, int]]:
    if (root / "test").is_dir() and not any((root / c).is_dir() for c in classes):
        root = root / "test"
    if not root.is_dir():
        raise EvalError(f"{root}: no such test folder")
    index = {c: i for i, c in enumerate(classes)}
    dirs = sorted(d for d in root.iterdir() if d.is_dir())
    unknown = [d.name for d in dirs if d.name not in index]
    if unknown:
        raise EvalError(f"{root}: class folder(s) {unknown[:5]} are not among the model's classes {classes}")
    items = [(f, index[d.name]) for d in dirs for f in sorted(d.iterdir()) if f.suffix.lower() in IMG_EXT]
    if not items:
        raise EvalError(f"{root}: no images in {root}/<class>/*{IMG_EXT}")
    return items


def preprocess(paths: list[Path], pre: dict) -> np.ndarray:
    from PIL import Image

    arrs = []
    for p in paths:
        with Image.open(p) as im:
            arrs.append(np.asarray(im.convert(pre["color"]), dtype=np.uint8))
    x = np.stack(arrs).astype(np.float32)
    if x.ndim == 3:  # grayscale: (N, H, W) → (N, H, W, 1)
        x = x[..., None]
    mean = np.asarray(pre["mean"], dtype=np.float32)
    std = np.asarray(pre["std"], dtype=np.float32)
    x = (x * np.float32(pre["scale"]) - mean) / std
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2) if pre["layout"] == "NCHW" else x)


def evaluate(model: Path, test_dir: Path, batch: int = 256, limit: int | None = None,
             threads: int = 0) -> dict:
    import onnxruntime as ort

    info = load_sidecar(model)
    items = list_images(test_dir, info["classes"])
    if limit:
        items = items[:: max(1, len(items) // limit)][:limit]
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    fixed = info.get("dynamic_batch") is False
    correct, t0 = 0, time.perf_counter()
    for i in range(0, len(items), batch):
        chunk = items[i:i + batch]
        x = preprocess([p for p, _ in chunk], info["preprocess"])
        if fixed:  # a fixed-batch model: one image at a time
            logits = np.concatenate([sess.run(None, {name: x[j:j + 1]})[0] for j in range(len(x))])
        else:
            logits = sess.run(None, {name: x})[0]
        correct += int((logits.argmax(1) == np.asarray([y for _, y in chunk])).sum())
    return {"model": str(model), "images": len(items), "correct": correct,
            "accuracy": 100.0 * correct / len(items), "sidecar_accuracy": info.get("test_accuracy"),
            "dataset": info.get("dataset"), "seconds": time.perf_counter() - t0}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path, help="MODEL.onnx (its sidecar MODEL.json beside it)")
    ap.add_argument("test_dir", type=Path, help="ImageFolder test tree: DIR/<class>/*.jpg (or DIR/test/<class>/)")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--limit", type=int, help="evaluate an evenly spaced subset of this many images")
    ap.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: its choice)")
    ap.add_argument("--tol", type=float, default=0.05,
                    help="largest accepted |accuracy − sidecar test_accuracy| in points (default 0.05)")
    ap.add_argument("--json", type=Path, help="also write the result here")
    args = ap.parse_args(argv)
    try:
        r = evaluate(args.model, args.test_dir, args.batch, args.limit, args.threads)
    except EvalError as exc:
        print(f"eval_onnx: error: {exc}", file=sys.stderr)
        return 2
    print(f"{r['model']}: top-1 {r['accuracy']:.2f}% ({r['correct']}/{r['images']} images, {r['seconds']:.1f} s)")
    code = 0
    ref = r["sidecar_accuracy"]
    if ref is not None and not args.limit:
        diff = r["accuracy"] - ref
        ok = abs(diff) <= args.tol
        print(f"sidecar test_accuracy {ref:.2f}% ({r['dataset']}): difference {diff:+.2f} pt "
              f"({'within' if ok else 'OUTSIDE'} ±{args.tol:g})")
        code = 0 if ok else 1
    if args.json:
        args.json.write_text(json.dumps(r, indent=1) + "\n")
    return code


if __name__ == "__main__":
    sys.exit(main())
