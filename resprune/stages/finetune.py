"""The ``finetune`` stage: ``pruned.pt`` → ``finetuned.pt`` (docs/run-dir.md)."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict

import torch

from ..config import Recipe
from ..rundir import RunDir, RunDirError, stage_config
from ..serialization import load_payload, model_from_payload, save
from ..train.loop import Trainer, select_device
from ..train.pipeline import _loaders, engine_info, loader_input_size, model_stats, rank, skip, teacher_model

logger = logging.getLogger(__name__)

__all__ = ["stage_finetune"]


def _load_pruned(run: RunDir) -> torch.nn.Module:
    """``pruned.pt`` as ``prune`` wrote it (an older resprune fine-tuned it in place: refused)."""
    src = run.need("pruned.pt", "finetune")
    payload = load_payload(src)
    extra = payload.get("extra") or {}
    if "metrics" in extra and "prune" not in extra:
        raise RunDirError(f"{src} was fine-tuned in place by an older resprune, so fine-tuning would start "
                          f"from a fine-tuned model; re-run `resprune prune {run.path}` first")
    return model_from_payload(payload, src)


def _repartition(engine, run: RunDir) -> dict | None:
    """Re-balance a layer-parallel engine over the pruned model's layers by the per-layer
    times measured in training (collective); what changed, None when nothing was measured."""
    if not hasattr(engine, "repartition"):
        return None
    sparse = run.read_json("metrics.json").get("stages", {}).get("sparse", {}) if rank() == 0 else {}
    times = engine.comm.broadcast_object((sparse.get("engine") or {}).get("layer_time_s"), 0)
    if not times:
        return None
    return {k: v for k, v in engine.repartition(times).items()
            if k in ("bounds_before", "bounds_after", "imbalance_before", "imbalance_after")}


def stage_finetune(recipe: Recipe, run: RunDir, resume: bool = False, engine_factory=None) -> dict:
    """Fine-tune ``pruned.pt`` for ``finetune.epochs`` epochs → ``finetuned.pt`` and the
    ``finetuned`` entry of ``metrics.json``. ``pruned.pt`` stays as pruned: a re-run starts
    from it again. With ``finetune.epochs == 0`` nothing is trained and an earlier
    ``finetuned.pt`` is moved away. With ``engine_factory`` collectively, on the pruned model
    re-partitioned over the ranks."""
    config = stage_config(recipe, "finetune")
    if skip(run, "finetune", resume, config, collective=True):
        return run.read_json("metrics.json").get("stages", {}).get("finetuned", {})
    if recipe.finetune.epochs == 0:
        if rank() == 0:
            with run.writing("finetune", config, inputs=(), outputs=()):
                run.drop_metrics("finetune")
        logger.info("[finetune] skipped (finetune.epochs = 0)")
        return {}
    torch.manual_seed(recipe.finetune.seed)
    device = select_device(recipe.finetune.device)
    train_l, test_l = _loaders(recipe, device, shard=True)
    size = loader_input_size(train_l)
    model = _load_pruned(run)
    t0 = time.perf_counter()
    engine = engine_factory(model, recipe, size, train_cfg=recipe.finetune) if engine_factory else None
    rebalance = _repartition(engine, run) if engine is not None else None
    trainer = Trainer(model, train_l, test_l, recipe.finetune, run.path, "finetune",
                      threshold=recipe.prune.report_threshold, engine=engine,
                      teacher=teacher_model(recipe, recipe.finetune, run, train_l))
    hist = trainer.fit(resume=resume)
    if engine is not None:
        trainer.gather_model()
        if engine.rank != 0:
            return {}
    model = trainer.model.cpu().to(memory_format=torch.contiguous_format)
    values = {"test_acc": hist[-1].test_acc, "test_loss": hist[-1].test_loss,
              "epochs": recipe.finetune.epochs, "from": {"file": "pruned.pt", "sha256": run.sha256("pruned.pt")},
              "wall_s": time.perf_counter() - t0, "history": [asdict(h) for h in hist], **model_stats(model, size)}
    if engine is not None:
        values["engine"] = {**engine_info(recipe, engine), "repartition": rebalance}
    teacher = ["sparse.pt"] if recipe.finetune.distill > 0 and recipe.finetune.teacher == "sparse" else []
    with run.writing("finetune", config, inputs=["pruned.pt", *teacher]):
        save(model, run / "finetuned.pt", extra={"metrics": {k: v for k, v in values.items() if k != "history"},
                                                 "input_size": list(size)})
        run.update_metrics("finetuned", values)
    return values
