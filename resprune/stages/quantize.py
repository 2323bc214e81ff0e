"""The ``quantize`` stage: ``onnx/unpruned.onnx`` / ``onnx/pruned.onnx`` → INT8
``int8/unpruned.int8.onnx`` / ``int8/pruned.int8.onnx`` with their ``.json`` sidecars
(:mod:`resprune.quantize`; docs/run-dir.md, docs/export.md)."""

from __future__ import annotations

import logging
import os
from dataclasses import asdict
from pathlib import Path

from ..config import QuantizeConfig, Recipe
from ..rundir import RunDir

logger = logging.getLogger(__name__)

__all__ = ["stage_quantize", "INT8_FILES"]

#: label → (fp32 ONNX file it is quantized from, INT8 file); the labels are bench.json's
INT8_FILES = {"unpruned_int8": ("onnx/unpruned.onnx", "int8/unpruned.int8.onnx"),
              "pruned_int8": ("onnx/pruned.onnx", "int8/pruned.int8.onnx")}


def _data(recipe: Recipe, cfg: QuantizeConfig, fp32: dict):
    """Calibration images (training split) and held-out images (test split), checked against
    every model's input before anything is written."""
    from ..data import load_arrays, resolve_data_dir
    from ..quantize import calibration_subset, check_images

    train, test = load_arrays(recipe.data.dataset, recipe.data.data_dir)
    calib = train.images[calibration_subset(len(train.labels), cfg.images)]
    keep = calibration_subset(len(test.labels), cfg.check_images or len(test.labels))  # a fixed draw (or all)
    held, labels = test.images[keep], test.labels[keep]
    for info in fp32.values():
        check_images(calib, info, "calibration")
        check_images(held, info, "held-out")
    src = resolve_data_dir(recipe.data.data_dir)
    where = {"dataset": recipe.data.dataset, "source": str(src.resolve()) if src else "built-in", "split": "train",
             "of": len(train.labels), "draw": "uniform without replacement, seed 0"}
    return calib, held, labels, where, len(test.labels)


def stage_quantize(recipe: Recipe, run: RunDir | str | os.PathLike,
                   config: QuantizeConfig | None = None) -> dict[str, dict]:
    """INT8 models of the run's two ONNX files, checked and with sidecars, as one set.

    Each fp32 file must have its sidecar and match its hash (:func:`resprune.quantize.read_fp32`);
    the calibration images are ``config.images`` training images of the recipe's data set,
    the check runs on the test split (``config.check_images`` of it, default all). Every
    input is checked before anything is written; both files and sidecars go to a temporary
    folder that replaces ``int8/`` only when all passed (:meth:`RunDir.new_folder`), so a
    failure leaves the previous set and never touches ``onnx/``.

    Args:
        recipe: the run's recipe (``data`` says where the images are).
        run: a run directory with ``onnx/unpruned.onnx`` and ``onnx/pruned.onnx``.
        config: method, images, activations, fp32 nodes, check (default ``recipe.quantize``).

    Returns:
        ``{"unpruned_int8": sidecar, "pruned_int8": sidecar}``.
    """
    from ..quantize import keep_nodes, quantize_onnx, read_fp32

    cfg = config or recipe.quantize
    run = RunDir(run)
    srcs = {k: run.need(src, "quantize") for k, (src, _) in INT8_FILES.items()}
    fp32 = {k: read_fp32(p) for k, p in srcs.items()}
    for p in srcs.values():
        keep_nodes(p, cfg.keep_fp32)  # an unknown node name fails here, before anything is written
    calib, held, labels, where, split = _data(recipe, cfg, fp32)
    out = {}
    with run.writing("quantize", asdict(cfg), inputs=[src for src, _ in INT8_FILES.values()]), \
            run.new_folder("int8") as tmp:
        for key, (_, rel) in INT8_FILES.items():
            out[key] = quantize_onnx(srcs[key], tmp / Path(rel).name, calib, held, labels, method=cfg.method,
                                     activations=cfg.activations, keep_fp32=cfg.keep_fp32,
                                     min_agreement=cfg.min_agreement, calibration_info=where, split_images=split,
                                     shown=str(run / rel))
            logger.info("quantize: %s → %s", srcs[key], run / rel)
    return out
