"""The ``train`` stage: sparse training of the recipe's model → ``sparse.pt`` (docs/run-dir.md)."""

from __future__ import annotations

import time
from dataclasses import asdict

import torch

from ..config import Recipe
from ..rundir import RunDir, stage_config
from ..serialization import save
from ..train.loop import Trainer, evaluate, select_device
from ..train.pipeline import _loaders, build_model, engine_info, loader_input_size, model_stats, skip, teacher_model

__all__ = ["stage_train"]


def stage_train(recipe: Recipe, run: RunDir, resume: bool = False, engine_factory=None) -> dict:
    """Sparse training → ``sparse.pt`` and the ``sparse`` entry of ``metrics.json``.

    ``resume``: continue from ``checkpoints/sparse.pt``, or skip the stage when its results
    are current. ``engine_factory(model, recipe, input_size)``: a layer-parallel engine
    (collective: every rank calls this; only rank 0 writes and returns the metrics)."""
    config = stage_config(recipe, "train")
    if skip(run, "train", resume, config, collective=True):
        return run.read_json("metrics.json").get("stages", {}).get("sparse", {})
    torch.manual_seed(recipe.train.seed)
    device = select_device(recipe.train.device)
    train_l, test_l = _loaders(recipe, device, shard=True)
    size = loader_input_size(train_l)
    model = build_model(recipe, train_l)
    engine = engine_factory(model, recipe, size) if engine_factory else None
    t0 = time.perf_counter()
    trainer = Trainer(model, train_l, test_l, recipe.train, run.path, "sparse",
                      threshold=recipe.prune.report_threshold, engine=engine,
                      teacher=teacher_model(recipe, recipe.train, run, train_l))
    hist = trainer.fit(resume=resume)
    if engine is not None:
        trainer.gather_model()  # collective: the full weights on rank 0
        times = engine.measured_layer_time() if hasattr(engine, "measured_layer_time") else {}
        if engine.rank != 0:
            return {}
    if hist:
        test_loss, test_acc = hist[-1].test_loss, hist[-1].test_acc
    else:
        test_loss, test_acc = evaluate(trainer.model.eval(), test_l)
    model = trainer.model.cpu().to(memory_format=torch.contiguous_format)
    values = {
        "test_acc": test_acc, "test_loss": test_loss, "epochs": recipe.train.epochs,
        "wall_s": time.perf_counter() - t0, "history": [asdict(h) for h in hist],
        **model_stats(model, size), "device": str(device),
    }
    if engine is not None:
        values["engine"] = {**engine_info(recipe, engine), "layer_time_s": times}
    # --resume of a finished training (e.g. a directory without provenance): keep its sparse.pt
    adopt = resume and trainer.start_epoch == recipe.train.epochs and (run / "sparse.pt").is_file()
    with run.writing("train", config, inputs=()):
        if not adopt:
            save(model, run / "sparse.pt", extra={"metrics": {k: v for k, v in values.items() if k != "history"},
                                                  "input_size": list(size)})
            run.update_metrics("sparse", values)
    return values
