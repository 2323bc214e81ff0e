"""The stages of a run, one function each, one module each (docs/run-dir.md)::

    train → prune → finetune → fuse → export → quantize → bench → report

Each reads its inputs from a run directory through :meth:`RunDir.need` and writes its
results inside :meth:`RunDir.writing` (provenance; a re-run stage invalidates the results of
the later ones), so a run can stop after any stage and go on from its files.
:func:`run_all` runs them in order, as ``resprune run`` does; the command line
(:mod:`resprune.cli`) calls the same functions for ``resprune STAGE``.

=============  ==========================================  ==================================
stage          function                                    writes
=============  ==========================================  ==================================
``train``      :func:`stage_train` (recipe, run)           ``sparse.pt``
``prune``      :func:`stage_prune` (recipe, run)           ``pruned.pt``, ``prune.json``
``finetune``   :func:`stage_finetune` (recipe, run)        ``finetuned.pt``
``fuse``       :func:`stage_fuse` (recipe, run)            ``fused.pt``, ``fused_unpruned.pt``
``export``     :func:`stage_export` (run, ExportConfig)    ``onnx/*.onnx`` and sidecars
``quantize``   :func:`stage_quantize` (recipe, run)        ``int8/*.int8.onnx`` and sidecars
``bench``      :func:`stage_bench` (run, ExportConfig)     ``bench.json``
``report``     :func:`stage_report` (run dirs, out)        ``report.md``, ``report.json``, plots
=============  ==========================================  ==================================
"""

from __future__ import annotations

from ..config import Recipe
from ..rundir import RunDir, stage_config
from ..train.pipeline import barrier, rank, skip
from .bench import stage_bench
from .export import stage_export
from .finetune import stage_finetune
from .fuse import stage_fuse
from .prune import stage_prune
from .quantize import stage_quantize
from .report import stage_report
from .train import stage_train

__all__ = ["stage_train", "stage_prune", "stage_finetune", "stage_fuse", "stage_export", "stage_quantize",
           "stage_bench", "stage_report", "run_all"]


def run_all(recipe: Recipe, run: RunDir, resume: bool = False, engine_factory=None) -> None:
    """Every stage in order; export and bench when ``recipe.export`` asks for them, quantize
    (after export) when ``recipe.quantize.enabled``. With
    ``resume``, stages whose results are current are not run again. With ``engine_factory``
    (every rank calls this): train and fine-tune layer-parallel, the other stages on rank 0."""
    stage_train(recipe, run, resume=resume, engine_factory=engine_factory)
    if engine_factory is not None:  # layer-parallel: rank 0 prunes, every rank fine-tunes
        if rank() == 0 and not skip(run, "prune", resume, stage_config(recipe, "prune")):
            stage_prune(recipe, run)
        barrier()
        stage_finetune(recipe, run, resume=resume, engine_factory=engine_factory)
        if rank() != 0:
            return
    else:
        if not skip(run, "prune", resume, stage_config(recipe, "prune")):
            stage_prune(recipe, run)
        stage_finetune(recipe, run, resume=resume)
    if not skip(run, "fuse", resume):
        stage_fuse(recipe, run)
    if recipe.export.onnx:
        if not skip(run, "export", resume):
            stage_export(run, recipe.export)
        if recipe.quantize.enabled and not skip(run, "quantize", resume, stage_config(recipe, "quantize")):
            stage_quantize(recipe, run)
        if recipe.export.bench and not skip(run, "bench", resume):
            stage_bench(run, recipe.export)
    stage_report([run.path], run.path, latency=recipe.export.onnx and recipe.export.bench,
                 baseline=recipe.report.baseline)
