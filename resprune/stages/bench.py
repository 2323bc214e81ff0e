"""The ``bench`` stage: time ``onnx/unpruned.onnx`` and ``onnx/pruned.onnx`` (and the INT8
models of the quantize stage, where it ran) side by side with ``export/ort_bench.py`` →
``bench.json`` (docs/run-dir.md, docs/export.md)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

from ..config import ExportConfig
from ..errors import ResPruneError
from ..rundir import RunDir, RunDirError
from .export import ONNX_FILES
from .quantize import INT8_FILES

logger = logging.getLogger(__name__)

__all__ = ["stage_bench", "find_bench_tool", "BenchError"]


class BenchError(ResPruneError, RuntimeError):
    """``export/ort_bench.py`` failed (its error output is in the message)."""


def find_bench_tool(tool: str | os.PathLike | None = None) -> Path:
    """``export/ort_bench.py``: ``tool``, ``$RESPRUNE_ORT_BENCH``, or the repository's copy."""
    cands = [tool, os.environ.get("RESPRUNE_ORT_BENCH"), Path(__file__).resolve().parents[2] / "export" / "ort_bench.py"]
    for c in cands:
        if c and Path(c).is_file():
            return Path(c)
    raise RunDirError(
        "export/ort_bench.py not found (resprune is not installed from a source checkout?); pass "
        "--tool PATH or set RESPRUNE_ORT_BENCH"
    )


def _verify(paths: dict[str, Path], allow_unverified: bool) -> None:
    from ..onnx import OnnxVerificationError, sidecar_path, verify_onnx

    for p in paths.values():
        if not sidecar_path(p).is_file() and not allow_unverified:
            raise OnnxVerificationError(
                f"{p}: its sidecar {sidecar_path(p).name} is missing, so the file cannot be checked against "
                "what was exported; re-export it (resprune export), or pass --allow-unverified to time it anyway")
        if not verify_onnx(p)["functional"]:
            logger.warning("bench: %s is timed unverified (no sidecar; --allow-unverified)", p)


def stage_bench(run: RunDir | str | os.PathLike, config: ExportConfig | None = None, *,
                providers: list[str] | None = None, memory: bool = True, tool: str | os.PathLike | None = None,
                quiet: bool = False, allow_unverified: bool = False) -> dict:
    """Verify the run's ONNX files and time them with ``export/ort_bench.py`` → ``bench.json``.

    The tool runs in a subprocess with the current Python, labels ``unpruned`` and ``pruned``
    (the reference of the ratios is ``unpruned``) and, where the quantize stage wrote them,
    ``unpruned_int8`` and ``pruned_int8``, with ``config.bench_batches``,
    ``bench_runs``, ``bench_warmup`` and ``bench_threads`` (default :class:`ExportConfig`'s;
    threads 0 or None: the physical cores, set explicitly and recorded by the tool). A file
    without its sidecar (``.json``) cannot be checked against what was exported and is refused
    (:class:`OnnxVerificationError`) unless ``allow_unverified``. ``providers``: onnxruntime
    execution providers (default: CPU); ``memory``: also measure peak memory; ``tool``: see
    :func:`find_bench_tool`; ``quiet``: no table on stdout. Returns the parsed ``bench.json``.
    """
    cfg = config or ExportConfig()
    run = RunDir(run)
    rels = {k: rel for k, (_, rel) in ONNX_FILES.items()}
    rels |= {k: rel for k, (_, rel) in INT8_FILES.items() if (run / rel).is_file()}
    paths = {k: run.need(rel, "bench") for k, rel in rels.items()}
    _verify(paths, allow_unverified)
    # the tool writes its JSON here; it replaces bench.json inside the stage's record (so not
    # util.atomic_write, which would replace it after the record is written)
    tmp = run / f".bench.json.tmp-{os.getpid()}"
    cmd = [sys.executable, str(find_bench_tool(tool)), *map(str, paths.values()), "--names", *paths,
           "--batch", *map(str, cfg.bench_batches), "--runs", str(cfg.bench_runs),
           "--warmup", str(cfg.bench_warmup), "--threads", str(cfg.bench_threads or 0), "--json", str(tmp)]
    cmd += ["--providers", *providers] if providers else []
    cmd += [] if memory else ["--no-memory"]
    cmd += ["--quiet"] if quiet else []
    logger.info("bench: %s", " ".join(cmd))
    try:
        proc = subprocess.run(cmd, text=True, capture_output=quiet)
        if proc.returncode != 0:
            raise BenchError(f"ort_bench.py failed (exit {proc.returncode}): {(proc.stderr or '').strip()}")
        record = {"batches": list(cfg.bench_batches), "runs": cfg.bench_runs, "warmup": cfg.bench_warmup,
                  "threads": cfg.bench_threads or 0, "providers": providers}
        with run.writing("bench", record, inputs=list(rels.values())):
            os.replace(tmp, run / "bench.json")
    finally:
        tmp.unlink(missing_ok=True)
    return run.read_json("bench.json")
