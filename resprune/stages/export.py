"""The ``export`` stage: ``fused_unpruned.pt`` / ``fused.pt`` → ``onnx/unpruned.onnx`` /
``onnx/pruned.onnx`` with their ``.json`` sidecars (docs/run-dir.md, docs/export.md)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from ..config import ExportConfig
from ..rundir import RunDir, StageError

logger = logging.getLogger(__name__)

__all__ = ["stage_export", "ONNX_FILES"]

#: label → (checkpoint it is exported from, ONNX file); ``unpruned`` is the reference of the ratios
ONNX_FILES = {"unpruned": ("fused_unpruned.pt", "onnx/unpruned.onnx"), "pruned": ("fused.pt", "onnx/pruned.onnx")}


def _input_size(path: Path, payload: dict, given: tuple[int, ...] | None) -> tuple[int, ...]:
    """``given``, else the input shape every resprune checkpoint records (``extra["input_size"]``)."""
    size = given or (payload.get("extra") or {}).get("input_size")
    if not size:
        raise StageError(f"{path} does not record its input size (written by an older resprune?); "
                         "pass --input-size N C H W")
    return tuple(int(v) for v in size)


def stage_export(run: RunDir | str | os.PathLike, config: ExportConfig | None = None, *,
                 input_size: tuple[int, ...] | None = None, dynamic_batch: bool = True) -> dict[str, dict]:
    """Export the run's fused checkpoints to verified ONNX files with sidecars, as one set.

    Each file is checked against onnxruntime by :func:`resprune.onnx.export_onnx` with
    ``config.opset``, ``config.atol`` and ``config.rtol`` (default :class:`ExportConfig`'s).
    Both files and sidecars are written to a temporary folder that replaces ``onnx/`` only
    when all of them passed their checks: a failed or killed export leaves the previous set
    (or, killed between the two renames, the export recorded as unfinished, which bench and
    report refuse), and the next export removes what a killed one left.

    Args:
        run: a run directory with ``fused_unpruned.pt`` and ``fused.pt``.
        config: opset and tolerances of the check (its other fields are not used here).
        input_size: input shape with batch (default: the one each checkpoint records).
        dynamic_batch: symbolic batch dimension.

    Returns:
        ``{"unpruned": sidecar, "pruned": sidecar}``.
    """
    from ..onnx import export_onnx
    from ..serialization import load_payload, model_from_payload

    cfg = config or ExportConfig()
    run = RunDir(run)
    srcs = {k: run.need(ckpt, "export") for k, (ckpt, _) in ONNX_FILES.items()}
    record = {"input_size": input_size and list(input_size), "opset": cfg.opset, "dynamic_batch": dynamic_batch,
              "atol": cfg.atol, "rtol": cfg.rtol}
    out = {}
    with run.writing("export", record, inputs=[ckpt for ckpt, _ in ONNX_FILES.values()]), \
            run.new_folder("onnx") as tmp:
        for key, (_, rel) in ONNX_FILES.items():
            payload = load_payload(srcs[key])
            size = _input_size(srcs[key], payload, input_size)
            out[key] = export_onnx(model_from_payload(payload, srcs[key]), tmp / Path(rel).name, size, dynamic_batch,
                                   cfg.opset, source=srcs[key], atol=cfg.atol, rtol=cfg.rtol,
                                   metadata=(payload.get("extra") or {}).get("deploy"))
            logger.info("export: %s → %s", srcs[key], run / rel)
    return out
