"""The ``report`` stage: ``report.md``, ``report.json`` and ``plots/*.png`` of one or several
run directories (docs/run-dir.md, docs/export.md); the report itself is :mod:`resprune.report`."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

from ..report import summarize_run, write_report_files
from ..rundir import RunDir, StageError

__all__ = ["stage_report"]


def stage_report(
    run_dirs: list[str | os.PathLike], out: str | os.PathLike | None = None, *, latency: bool = True,
    baseline: str | float | os.PathLike | None = None,
) -> dict[str, Any]:
    """Write ``report.md``, ``report.json`` and ``plots/*.png`` for one or several runs.

    Every input of every run is checked before anything is written. A report written into its
    own run directory is recorded in its provenance (the ``report`` stage).

    Args:
        run_dirs: run directories with ``prune.json``, ``metrics.json`` and ``bench.json``.
        out: output directory (default: the run directory when there is one; required
            with several).
        latency: require ``bench.json`` and report latency (``False``: a report without
            latency, for runs whose recipe skips the benchmark).
        baseline: a baseline run directory or accuracy figure for every run (default: each
            run's recipe ``report.baseline``); see :func:`resprune.report.summarize_baseline`.

    Returns:
        The ``report.json`` contents (with ``"out"``, the output directory).
    """
    if not run_dirs:
        raise StageError("the report needs at least one run directory")
    if out is None:
        if len(run_dirs) > 1:
            raise StageError("several run directories need an output directory (--out DIR)")
        out = run_dirs[0]
    out = Path(out)
    runs = [summarize_run(d, latency, baseline) for d in run_dirs]  # all inputs checked before anything is written
    own = RunDir(run_dirs[0]) if len(run_dirs) == 1 and out.resolve() == Path(run_dirs[0]).resolve() else None
    with own.writing("report", {"latency": latency}, inputs=["prune.json", "bench.json"] if latency else ["prune.json"]) \
            if own else contextlib.nullcontext():
        return write_report_files(runs, out)
