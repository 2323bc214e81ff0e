"""The ``prune`` stage: ``sparse.pt`` → ``pruned.pt`` and ``prune.json`` (docs/run-dir.md)."""

from __future__ import annotations

import itertools
import logging

from ..config import Recipe
from ..errors import ResPruneError
from ..prune import prune_, recalibrate_bn_, taylor_scores
from ..rundir import RunDir, StageError, stage_config
from ..serialization import load, save
from ..sparsity import scale_stats
from ..train.loop import evaluate, select_device
from ..train.pipeline import _loaders, loader_input_size

logger = logging.getLogger(__name__)

__all__ = ["stage_prune"]


def stage_prune(recipe: Recipe, run: RunDir) -> dict:
    """Remove the layers ``recipe.prune`` selects from ``sparse.pt`` → ``pruned.pt``,
    ``prune.json`` (the report and the layer scales before pruning) and the ``pruned`` entry
    of ``metrics.json``; no fine-tuning yet. A rule that would empty a network stage or a
    budget that cannot be met is a :class:`StageError`, and nothing is written."""
    model = load(run.need("sparse.pt", "prune"))
    device = select_device(recipe.train.device)
    train_l, test_l = _loaders(recipe, device)
    input_size = loader_input_size(train_l)
    cfg = recipe.prune
    stats = scale_stats(model, cfg.report_threshold)
    model = model.to(device)
    scores = None
    if cfg.rank == "taylor" and cfg.threshold is None:  # on plain (not augmented) training batches
        plain = ((x, y) for x, y, _ in train_l.indexed(augment=False))
        scores = taylor_scores(model, itertools.islice(plain, cfg.taylor_batches))
    try:
        report = prune_(model.cpu(), cfg.to_prune_config(input_size), scores=scores)
    except ResPruneError:
        raise
    except ValueError as exc:  # prune_'s refusals of the rule (they name it and what to change)
        raise StageError(str(exc)) from exc
    loss, acc = evaluate(model.to(device).eval(), test_l)
    values = {"test_acc": acc, "test_loss": loss, "macs": report.macs_after, "params": report.params_after,
              "removed": len(report.removed), "removed_per_stage": report.removed_per_stage,
              "predicted_latency_ms": report.latency["predicted_after_ms"] if report.latency else None}
    if cfg.recalibrate_batches:  # BN statistics of the layers that remain, on the inputs they now see
        recalibrate_bn_(model, (x for x, _ in itertools.islice(train_l, cfg.recalibrate_batches)))
        values["before_recalibration"] = {"test_acc": acc, "test_loss": loss}
        values["test_loss"], values["test_acc"] = evaluate(model.eval(), test_l)
    model = model.cpu()
    with run.writing("prune", stage_config(recipe, "prune"), inputs=["sparse.pt"]):
        save(model, run / "pruned.pt", extra={"prune": report.to_dict(), "input_size": list(input_size)})
        run.write_json("prune.json", {**report.to_dict(), "scales": {
            "names": stats.names, "values": stats.values, "threshold": cfg.report_threshold},
            "taylor_scores": scores})
        run.update_metrics("pruned", values)
    recal = f" ({acc:.2f}% before BatchNorm recalibration)" if cfg.recalibrate_batches else ""
    logger.info("[prune] %s; test accuracy %.2f%%%s", report.summary(), values["test_acc"], recal)
    return values
