"""What the stages that train and evaluate share (:mod:`resprune.stages`): the data loaders
of a recipe, its model, the layer-parallel engine, and the ranks of a multi-process run.

The stages themselves (``train`` → ``prune`` → ``finetune`` → ``fuse`` → ``export`` →
``bench`` → ``report``) are one function each, in :mod:`resprune.stages`.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from ..config import Recipe, RecipeError
from ..data import ArrayDataset, DeviceLoader, load_arrays
from ..data.shards import shard_indices
from ..models import create_model
from ..profile import profile
from ..prune import removal_units, remove_units_
from ..rundir import RunDir
from .loop import resolve_precision

logger = logging.getLogger(__name__)

__all__ = [
    "loader_input_size", "deploy_info", "model_stats", "build_model", "init_model_", "teacher_model", "engine_config", "make_engine", "engine_info",
    "barrier", "rank", "world_size", "agree", "skip",
]


def _loaders(recipe: Recipe, device: torch.device, shard: bool = False) -> tuple[DeviceLoader, DeviceLoader]:
    """The recipe's training and test loaders. ``shard``: in a multi-process run of an engine
    whose config has a ``split`` (``consensus``: every rank an agent with its own data), the
    training loader holds this rank's shard only (:func:`resprune.data.shards.shard_indices`;
    normalised with the whole training set's statistics)."""
    d, t = recipe.data, recipe.train
    tr, te = load_arrays(d.dataset, d.data_dir)
    if d.train_limit is not None and d.train_limit < len(tr):
        keep = np.sort(np.random.default_rng(0).permutation(len(tr))[: d.train_limit])
        tr = ArrayDataset(tr.images[keep], tr.labels[keep], tr.classes)
    cl = resolve_precision(t, device)[1] and recipe.engine == "serial"
    train = DeviceLoader.from_config(tr, d, train=True, device=device, seed=t.seed, channels_last=cl)
    mean, std = train.mean_std
    split = getattr(engine_config(recipe), "split", None) if shard else None
    if split is not None and world_size() > 1:
        keep = shard_indices(tr.labels, rank(), world_size(), split, seed=t.seed)
        part = ArrayDataset(tr.images[keep], tr.labels[keep], tr.classes)
        train = DeviceLoader.from_config(part, d, train=True, device=device, seed=t.seed + rank(),
                                         channels_last=cl, mean=mean, std=std)
    test = DeviceLoader.from_config(te, d, train=False, device=device, channels_last=cl, mean=mean, std=std)
    return train, test


def loader_input_size(loader: DeviceLoader) -> tuple[int, ...]:
    """The input shape of one sample with batch 1, as every checkpoint records it."""
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


def model_stats(model: torch.nn.Module, input_size) -> dict:
    p = profile(model, input_size)
    return {"macs": p.macs, "params": p.params}


def _fresh_model(recipe: Recipe, loader: DeviceLoader) -> torch.nn.Module:
    """The recipe's model for the loader's channels and classes, newly initialised."""
    kw = dict(recipe.model.kwargs)
    if loader.in_chans != 3 and not recipe.model.name.startswith("tv_"):
        kw.setdefault("in_chans", loader.in_chans)
    return create_model(recipe.model.name, num_classes=loader.num_classes, **kw)


def build_model(recipe: Recipe, train_loader: DeviceLoader) -> torch.nn.Module:
    """The recipe's model with ``model.init`` and ``model.remove`` applied."""
    return init_model_(_fresh_model(recipe, train_loader), recipe.model)


def init_model_(model: torch.nn.Module, cfg) -> torch.nn.Module:
    """``model`` with ``model.init``'s trained weights, then without the units ``model.remove``
    names (``cfg``: the recipe's :class:`~resprune.config.ModelConfig`); weights that do not
    fit the architecture are a :class:`RecipeError` naming what differs."""
    from ..serialization import CheckpointError, load_weights_

    if cfg.init:
        try:
            load_weights_(model, cfg.init)
        except CheckpointError as exc:
            raise RecipeError(f"model.init: {exc}") from exc
    return remove_named_units_(model, cfg.remove)


def teacher_model(recipe: Recipe, cfg, run: RunDir, loader: DeviceLoader) -> torch.nn.Module | None:
    """The model a stage with ``cfg`` (``recipe.train`` or ``recipe.finetune``) distils from:
    ``None`` without distillation, the run's unpruned ``sparse.pt`` (``teacher = "sparse"``)
    or the recipe's model with ``model.init``'s weights and nothing removed (``"init"``)."""
    from ..serialization import CheckpointError, load, load_weights_

    if cfg.distill <= 0:
        return None
    if cfg.teacher == "sparse":
        return load(run.need("sparse.pt", "finetune"))
    try:
        return load_weights_(_fresh_model(recipe, loader), recipe.model.init)
    except CheckpointError as exc:
        raise RecipeError(f"model.init (the teacher): {exc}") from exc


def remove_named_units_(model: torch.nn.Module, names) -> torch.nn.Module:
    """``model`` without the units ``model.remove`` names; a name that is not one of the
    model's removal units is a :class:`RecipeError` that lists them."""
    if not names:
        return model
    known = [u.name for u in removal_units(model)]
    unknown = [n for n in names if n not in known]
    if unknown:
        what = "is not a removal unit" if len(unknown) == 1 else "are not removal units"
        raise RecipeError(f"model.remove: {', '.join(unknown)} {what} of {type(model).__name__}; "
                          f"units: {', '.join(known)}")
    return remove_units_(model, list(names))


def engine_config(recipe: Recipe, input_size: tuple[int, ...] | None = None):
    """The engine's config object from ``recipe.engine_options`` (``None`` for engines without
    one); bad names, keys or values raise :class:`RecipeError` naming them, so a run fails
    before any process starts or any file is written."""
    from ..config import RecipeError
    from ..parallel import engine_config as build

    try:
        cfg = build(recipe.engine, recipe.engine_options, input_size)
        check = getattr(cfg, "check_world_size", None)  # e.g. a graph over the ranks
        if check is not None:
            check(recipe.nproc)
        return cfg
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


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def agree(flag: bool) -> bool:
    """Rank 0's ``flag`` on every rank (so that all ranks skip a collective stage, or none)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return flag
    box = [flag]
    dist.broadcast_object_list(box, 0)
    return bool(box[0])


def skip(run: RunDir, stage: str, resume: bool, config: dict | None = None, collective: bool = False) -> bool:
    """With ``--resume``: True (logged) when ``stage``'s results are current (``collective``:
    every rank calls this and gets rank 0's answer)."""
    if resume and (agree if collective else bool)(rank() == 0 and run.current(stage, config)):
        logger.info("[%s] results are current (--resume): not run again", stage)
        return True
    return False
