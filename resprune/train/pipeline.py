"""The stages of a run, each reading and writing files of a run directory (docs/run-dir.md).

``train`` (sparse training) → ``prune`` → ``finetune`` → ``fuse`` → ``export`` → ``bench`` →
``report``. Each stage can be run on its own on a run directory that holds the previous
stage's output; ``run_all`` runs them in order. Every stage reads through
:meth:`RunDir.need` and writes inside :meth:`RunDir.writing` (provenance; a re-run stage
invalidates the results of the later ones).
"""

from __future__ import annotations

import logging
import os
import platform
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import Recipe
from ..data import ArrayDataset, DeviceLoader, load_arrays
from ..fuse import fuse
from ..models import create_model
from ..profile import profile
from ..prune import prune_
from ..rundir import RunDir, RunDirError, stage_config
from ..serialization import load, load_payload, model_from_payload, save
from ..sparsity import scale_stats
from .loop import Trainer, evaluate, resolve_precision, select_device

logger = logging.getLogger(__name__)

__all__ = [
    "RunDir", "stage_train", "stage_prune", "stage_finetune", "stage_fuse", "run_all", "hardware",
]


def hardware() -> dict[str, Any]:
    """The machine and software a number was measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _loaders(recipe: Recipe, device: torch.device) -> tuple[DeviceLoader, DeviceLoader]:
    d, t = recipe.data, recipe.train
    tr, te = load_arrays(d.dataset, d.data_dir)
    if d.train_limit is not None and d.train_limit < len(tr):
        keep = np.sort(np.random.default_rng(0).permutation(len(tr))[: d.train_limit])
        tr = ArrayDataset(tr.images[keep], tr.labels[keep], tr.classes)
    cl = resolve_precision(t, device)[1] and recipe.engine == "serial"
    train = DeviceLoader.from_config(tr, d, train=True, device=device, seed=t.seed, channels_last=cl)
    mean, std = train.mean_std
    test = DeviceLoader.from_config(te, d, train=False, device=device, channels_last=cl, mean=mean, std=std)
    return train, test


def _input_size(loader: DeviceLoader) -> tuple[int, ...]:
    return (1, *loader.images.shape[1:])


def deploy_info(recipe: Recipe, loader: DeviceLoader) -> dict:
    """What a runtime needs besides the ONNX file to classify a raw image (the sidecar's
    ``preprocess``, ``classes`` and ``dataset``): uint8 pixels times ``scale``, minus
    ``mean``, over ``std``, per channel, in ``layout`` with channels in ``color`` order."""
    from ..data import resolve_data_dir

    src = resolve_data_dir(recipe.data.data_dir)
    return {
        "preprocess": {"scale": 1.0 / 255.0, "mean": loader.mean.flatten().tolist(),
                       "std": loader.std.flatten().tolist(), "layout": "NCHW",
                       "color": "RGB" if loader.in_chans == 3 else "L"},
        "classes": list(loader.classes),
        "dataset": {"name": recipe.data.dataset, "source": str(src.resolve()) if src else "built-in",
                    "split": "test", "images": len(loader.labels)},
    }


def _model_stats(model: torch.nn.Module, input_size) -> dict:
    p = profile(model, input_size)
    return {"macs": p.macs, "params": p.params}


def build_model(recipe: Recipe, train_loader: DeviceLoader) -> torch.nn.Module:
    kw = dict(recipe.model.kwargs)
    if train_loader.in_chans != 3 and not recipe.model.name.startswith("tv_"):
        kw.setdefault("in_chans", train_loader.in_chans)
    return create_model(recipe.model.name, num_classes=train_loader.num_classes, **kw)


def engine_config(recipe: Recipe, input_size: tuple[int, ...] | None = None):
    """The engine's config object from ``recipe.engine_options`` (``None`` for engines without
    one); bad names, keys or values raise :class:`RecipeError` naming them, so a run fails
    before any process starts or any file is written."""
    from ..config import RecipeError
    from ..parallel import engine_config as build

    try:
        return build(recipe.engine, recipe.engine_options, input_size)
    except ValueError as exc:
        raise RecipeError(str(exc)) from exc


def make_engine(model: torch.nn.Module, recipe: Recipe, input_size: tuple[int, ...] | None = None,
                train_cfg=None):
    """The layer-parallel engine a recipe asks for (collective: every rank calls it);
    ``train_cfg`` (default ``recipe.train``) sets the optimiser and the L1 term."""
    import torch.nn.functional as F

    from ..parallel import create_engine
    from ..sparsity import LayerScaleL1, LayerSmoothness, RegularizerSum
    from .loop import param_groups

    t = recipe.train if train_cfg is None else train_cfg

    def optimizer_factory(named):
        groups = param_groups(model, t.weight_decay, list(named))
        return torch.optim.SGD(groups, lr=t.lr, momentum=t.momentum, nesterov=t.nesterov and t.momentum > 0)

    def loss_fn(out, y):
        return F.cross_entropy(out.float(), y, label_smoothing=t.label_smoothing)

    config = engine_config(recipe, input_size)
    # prox mode: the trainer soft-thresholds the owned scales; subgradient: the engine adds it
    reg = LayerScaleL1(t.l1) if (t.l1 > 0 and t.l1_mode == "subgradient") else None
    smooth = t.smooth
    if smooth > 0:  # γ·Σ‖θₙ₊₁ − θₙ‖² (the engine exchanges the layers at rank boundaries)
        reg = LayerSmoothness(smooth) if reg is None else RegularizerSum(reg, LayerSmoothness(smooth))
    return create_engine(recipe.engine, model, loss_fn, optimizer_factory, config, regularizer=reg)


def engine_info(recipe: Recipe, engine) -> dict:
    """What the report says about the engine a stage trained with: name, processes, the
    engine's settings, and the partition (layer bounds per rank)."""
    cfg = getattr(engine, "config", None)
    return {"name": recipe.engine, "nproc": engine.world_size,
            "options": cfg.to_dict() if hasattr(cfg, "to_dict") else {},
            "bounds": list(getattr(engine, "bounds", []))}


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _agree(flag: bool) -> bool:
    """Rank 0's ``flag`` on every rank (so that all ranks skip a collective stage, or none)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return flag
    box = [flag]
    dist.broadcast_object_list(box, 0)
    return bool(box[0])


def _skip(run: RunDir, stage: str, resume: bool, config: dict | None = None, collective: bool = False) -> bool:
    """With ``--resume``: True (logged) when ``stage``'s results are current (``collective``:
    every rank calls this and gets rank 0's answer)."""
    if resume and (_agree if collective else bool)(_rank() == 0 and run.current(stage, config)):
        logger.info("[%s] results are current (--resume): not run again", stage)
        return True
    return False


def stage_train(recipe: Recipe, run: RunDir, resume: bool = False, engine_factory=None) -> dict:
    """Sparse training → ``sparse.pt``."""
    config = stage_config(recipe, "train")
    if _skip(run, "train", resume, config, collective=True):
        return run.read_json("metrics.json").get("stages", {}).get("sparse", {})
    torch.manual_seed(recipe.train.seed)
    device = select_device(recipe.train.device)
    train_l, test_l = _loaders(recipe, device)
    model = build_model(recipe, train_l)
    engine = engine_factory(model, recipe, _input_size(train_l)) if engine_factory else None
    t0 = time.perf_counter()
    trainer = Trainer(model, train_l, test_l, recipe.train, run.path, "sparse",
                      threshold=recipe.prune.report_threshold, engine=engine)
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
        **_model_stats(model, _input_size(train_l)), "device": str(device),
    }
    if engine is not None:
        values["engine"] = {**engine_info(recipe, engine), "layer_time_s": times}
    # --resume of a finished training (e.g. a directory without provenance): keep its sparse.pt
    adopt = resume and trainer.start_epoch == recipe.train.epochs and (run / "sparse.pt").is_file()
    with run.writing("train", config, inputs=()):
        if not adopt:
            save(model, run / "sparse.pt", extra={"metrics": {k: v for k, v in values.items() if k != "history"},
                                                  "input_size": list(_input_size(train_l))})
            run.update_metrics("sparse", values)
    return values


def stage_prune(recipe: Recipe, run: RunDir) -> dict:
    """``sparse.pt`` → prune → ``pruned.pt`` and ``prune.json`` (no fine-tuning yet)."""
    model = load(run.need("sparse.pt", "prune"))
    device = select_device(recipe.train.device)
    train_l, test_l = _loaders(recipe, device)
    input_size = _input_size(train_l)
    thr = recipe.prune.report_threshold
    stats = scale_stats(model, thr)
    report = prune_(model, recipe.prune.to_prune_config(input_size))
    loss, acc = evaluate(model.to(device).eval(), test_l)
    model = model.cpu()
    values = {"test_acc": acc, "test_loss": loss, "macs": report.macs_after, "params": report.params_after,
              "removed": len(report.removed), "removed_per_stage": report.removed_per_stage}
    with run.writing("prune", stage_config(recipe, "prune"), inputs=["sparse.pt"]):
        save(model, run / "pruned.pt", extra={"prune": report.to_dict(), "input_size": list(input_size)})
        run.write_json("prune.json", {**report.to_dict(), "scales": {
            "names": stats.names, "values": stats.values, "threshold": thr}})
        run.update_metrics("pruned", values)
    logger.info("[prune] %s; test accuracy %.2f%%", report.summary(), acc)
    return values


def _load_pruned(run: RunDir) -> torch.nn.Module:
    """``pruned.pt`` as ``prune`` wrote it (an older resprune fine-tuned it in place: refused)."""
    src = run.need("pruned.pt", "finetune")
    payload = load_payload(src)
    extra = payload.get("extra") or {}
    if "metrics" in extra and "prune" not in extra:
        raise RunDirError(f"{src} was fine-tuned in place by an older resprune, so fine-tuning would start "
                          f"from a fine-tuned model; re-run `resprune prune {run.path}` first")
    return model_from_payload(payload, src)


def stage_finetune(recipe: Recipe, run: RunDir, resume: bool = False, engine_factory=None) -> dict:
    """Fine-tune ``pruned.pt`` → ``finetuned.pt`` (``pruned.pt`` stays as pruned: a re-run
    starts from it again); with ``finetune.epochs == 0`` nothing is trained and an earlier
    ``finetuned.pt`` is moved away. With ``engine_factory`` collectively, on the pruned model
    re-partitioned over the ranks."""
    config = stage_config(recipe, "finetune")
    if _skip(run, "finetune", resume, config, collective=True):
        return run.read_json("metrics.json").get("stages", {}).get("finetuned", {})
    if recipe.finetune.epochs == 0:
        if _rank() == 0:
            with run.writing("finetune", config, inputs=(), outputs=()):
                run.drop_metrics("finetune")
        logger.info("[finetune] skipped (finetune.epochs = 0)")
        return {}
    torch.manual_seed(recipe.finetune.seed)
    device = select_device(recipe.finetune.device)
    train_l, test_l = _loaders(recipe, device)
    model = _load_pruned(run)
    t0 = time.perf_counter()
    engine = (engine_factory(model, recipe, _input_size(train_l), train_cfg=recipe.finetune)
              if engine_factory else None)
    rebalance = None
    if engine is not None and hasattr(engine, "repartition"):
        # the pruned model's stages, balanced by the per-layer times measured in training
        sparse = run.read_json("metrics.json").get("stages", {}).get("sparse", {}) if _rank() == 0 else {}
        times = engine.comm.broadcast_object((sparse.get("engine") or {}).get("layer_time_s"), 0)
        if times:
            rebalance = {k: v for k, v in engine.repartition(times).items()
                         if k in ("bounds_before", "bounds_after", "imbalance_before", "imbalance_after")}
    trainer = Trainer(model, train_l, test_l, recipe.finetune, run.path, "finetune",
                      threshold=recipe.prune.report_threshold, engine=engine)
    hist = trainer.fit(resume=resume)
    if engine is not None:
        trainer.gather_model()
        if engine.rank != 0:
            return {}
    model = trainer.model.cpu().to(memory_format=torch.contiguous_format)
    values = {"test_acc": hist[-1].test_acc, "test_loss": hist[-1].test_loss,
              "epochs": recipe.finetune.epochs, "from": {"file": "pruned.pt", "sha256": run.sha256("pruned.pt")},
              "wall_s": time.perf_counter() - t0, "history": [asdict(h) for h in hist],
              **_model_stats(model, _input_size(train_l))}
    if engine is not None:
        values["engine"] = {**engine_info(recipe, engine), "repartition": rebalance}
    with run.writing("finetune", config, inputs=["pruned.pt"]):
        save(model, run / "finetuned.pt", extra={"metrics": {k: v for k, v in values.items() if k != "history"},
                                                 "input_size": list(_input_size(train_l))})
        run.update_metrics("finetuned", values)
    return values


def stage_fuse(recipe: Recipe, run: RunDir) -> dict:
    """``finetuned.pt`` (``pruned.pt`` when there is none) → ``fused.pt``; ``sparse.pt`` →
    ``fused_unpruned.pt``; accuracies checked."""
    final = "finetuned.pt" if (run / "finetuned.pt").is_file() else "pruned.pt"
    if final == "pruned.pt" and (run.records().get("finetune") or {}).get("state") == "invalidated":
        logger.warning("[fuse] the fine-tuned model was invalidated (its pruned.pt was replaced): fusing the "
                       "pruned model without fine-tuning; run `resprune finetune %s` first to fine-tune it", run.path)
    out, models = {}, {}
    device = select_device(recipe.train.device)
    train_l, test_l = _loaders(recipe, device)
    for src, dst, key in (("sparse.pt", "fused_unpruned.pt", "unpruned_fused"), (final, "fused.pt", "fused")):
        model = load(run.need(src, "fuse")).to(device).eval()
        loss, acc = evaluate(model, test_l)
        fused = fuse(model)
        floss, facc = evaluate(fused, test_l)
        if abs(facc - acc) > 0.05:  # fusion is exact to float rounding: ≤ 1 flipped image in 2000
            raise RuntimeError(f"fused model disagrees with {src}: accuracy {facc:.2f}% vs {acc:.2f}%")
        models[dst] = (fused.cpu(), {**deploy_info(recipe, test_l), "test_accuracy": facc})
        out[key] = {"test_acc": facc, "test_loss": floss, "source_acc": acc, "from": src,
                    **_model_stats(fused.cpu(), _input_size(train_l))}
    with run.writing("fuse", {}, inputs=["sparse.pt", final]):
        for dst, (fused, deploy) in models.items():
            save(fused, run / dst, extra={"input_size": list(_input_size(train_l)), "deploy": deploy})
        for key, values in out.items():
            run.update_metrics(key, values)
    return out


def run_all(recipe: Recipe, run: RunDir, resume: bool = False, engine_factory=None) -> None:
    """Every stage in order; export/bench/report when the recipe asks for them."""
    from .. import report as report_mod  # late: report imports onnx tooling

    stage_train(recipe, run, resume=resume, engine_factory=engine_factory)
    if engine_factory is not None:  # layer-parallel: rank 0 prunes, every rank fine-tunes
        if _rank() == 0 and not _skip(run, "prune", resume, stage_config(recipe, "prune")):
            stage_prune(recipe, run)
        _barrier()
        stage_finetune(recipe, run, resume=resume, engine_factory=engine_factory)
        if _rank() != 0:
            return
    else:
        if not _skip(run, "prune", resume, stage_config(recipe, "prune")):
            stage_prune(recipe, run)
        stage_finetune(recipe, run, resume=resume)
    if not _skip(run, "fuse", resume):
        stage_fuse(recipe, run)
    if recipe.export.onnx:
        if not _skip(run, "export", resume):
            report_mod.export_run_dir(run.path, opset=recipe.export.opset, atol=recipe.export.atol,
                                      rtol=recipe.export.rtol)
        if recipe.export.bench and not _skip(run, "bench", resume):
            report_mod.bench_run_dir(
                run.path, batches=list(recipe.export.bench_batches), runs=recipe.export.bench_runs,
                warmup=recipe.export.bench_warmup, threads=recipe.export.bench_threads,
            )
    report_mod.write_report([run.path], run.path, latency=recipe.export.onnx and recipe.export.bench,
                            baseline=recipe.report.baseline)
