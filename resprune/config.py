"""Run configuration: frozen dataclasses, recipe files (TOML or JSON) and ``--set`` overrides.

A recipe holds model, data, schedule (``train``), sparsity (``train.l1``), pruning rule,
fine-tune schedule and export settings. ``--set section.key=value`` overrides any field;
values are parsed as JSON when they parse (``5``, ``0.1``, ``true``, ``[1, 8]``, ``null``)
and as strings otherwise. Unknown sections or keys are errors that list the valid ones.

Example:
    >>> from resprune.config import load_recipe
    >>> r = load_recipe("quickstart", ["train.epochs=2"])
    >>> r.train.epochs, r.model.name
    (2, 'resnet20')
"""

from __future__ import annotations

import json
import math
import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from .data import DATASETS, DEFAULT_FLIP, DEFAULT_PAD
from .errors import ResPruneError
from .onnx import DEFAULT_ATOL, DEFAULT_RTOL
from .quantize import (ACTIVATIONS, DEFAULT_ACTIVATIONS, DEFAULT_IMAGES, DEFAULT_METHOD, DEFAULT_MIN_AGREEMENT,
                       METHODS)
from .sparsity import DEFAULT_THRESHOLD

__all__ = [
    "ModelConfig", "DataConfig", "TrainConfig", "PruneStageConfig", "ExportConfig", "QuantizeConfig", "ReportConfig",
    "Recipe",
    "RecipeError", "load_recipe", "recipe_from_dict", "apply_overrides", "recipe_dirs", "list_recipes",
    "DEFAULT_THRESHOLD",
]

CONFIG_VERSION = 1
BUDGETS = ("target_macs", "target_latency_ms")  # pruning rules that replace the default threshold


class RecipeError(ResPruneError, ValueError):
    """A recipe file or override that does not make sense."""


def _positive(name: str, v: float, allow_zero: bool = False) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
        raise RecipeError(f"{name} must be a finite number {'>= 0' if allow_zero else '> 0'}, got {v!r}")


@dataclass(frozen=True)
class ModelConfig:
    name: str = "resnet20"
    kwargs: dict = field(default_factory=dict)  # passed to create_model (e.g. {"resconv": false})
    # units removed before training: a pruned architecture trained from scratch (the control
    # for a pruning result). Unit names, or the path of a run's prune.json (its "removed" list).
    remove: tuple = ()
    # start from trained weights (prune a trained net): a .safetensors file, a .pt state dict or
    # resprune checkpoint, or a run directory (its sparse.pt); checked against the architecture
    init: str | None = None

    def __post_init__(self) -> None:
        from .models import is_model, list_models

        if not is_model(self.name):
            raise RecipeError(f"model.name={self.name!r} is not registered; known: {', '.join(list_models())}")
        if self.init is not None and (not isinstance(self.init, str) or not Path(self.init).exists()):
            raise RecipeError(f"model.init={self.init!r}: no such weights file or run directory")
        remove = self.remove
        if isinstance(remove, str):
            try:
                remove = json.loads(Path(remove).read_text())["removed"]
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise RecipeError(f"model.remove={self.remove!r}: not a readable prune.json with a "
                                  f"\"removed\" list ({type(exc).__name__}: {exc})") from exc
        if not isinstance(remove, (list, tuple)) or not all(isinstance(n, str) for n in remove):
            raise RecipeError(f"model.remove must be a list of unit names or a prune.json path, got {self.remove!r}")
        object.__setattr__(self, "remove", tuple(remove))


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "digits"
    data_dir: str | None = None  # default: $RESPRUNE_DATA
    batch_size: int = 128
    eval_batch_size: int = 1000
    augment: bool = True
    pad: int = DEFAULT_PAD
    flip: bool = DEFAULT_FLIP
    train_limit: int | None = None  # use a fixed random subset of this many training images

    def __post_init__(self) -> None:
        if self.train_limit is not None and (isinstance(self.train_limit, bool) or not isinstance(self.train_limit, int)
                                             or self.train_limit < 1):
            raise RecipeError(f"data.train_limit must be an int >= 1 or null, got {self.train_limit!r}")
        if self.dataset not in DATASETS:
            raise RecipeError(f"data.dataset={self.dataset!r} is unknown; known: {', '.join(DATASETS)}")
        for k in ("batch_size", "eval_batch_size"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise RecipeError(f"data.{k} must be an int >= 1, got {v!r}")


@dataclass(frozen=True)
class TrainConfig:
    """Optimiser and schedule. Weight decay applies to conv/linear weights and to the BN
    affine parameters inside ResConv layers (so a scale cannot escape ``l1`` through γ), never
    to biases, other BN or the layer scales (governed by ``l1`` alone)."""

    epochs: int = 10
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    schedule: str = "cosine"  # cosine | step | constant
    warmup_epochs: float = 0.0
    milestones: tuple = ()  # step schedule: epochs at which lr *= gamma
    gamma: float = 0.1
    label_smoothing: float = 0.0
    l1: float = 0.0  # λ of the L1 penalty on removable layer scales
    l1_mode: str = "prox"  # prox: soft-threshold after each step (exact zeros) | subgradient: in the loss
    l1_warmup_epochs: float = 0.0  # λ ramps linearly from 0 to l1 over these epochs (0: full λ from step 1)
    l1_reset_momentum: bool = False  # prox: clear the momentum of scales at 0, so momentum cannot revive them
    distill: float = 0.0  # weight α of knowledge distillation: (1−α)·CE + α·T²·KL(teacher ‖ student)
    distill_temperature: float = 4.0  # T of the distillation term
    teacher: str = "sparse"  # with distill > 0: "sparse" (this run's unpruned sparse.pt) | "init" (model.init)
    rewind_of: int = 0  # LR rewinding: lr follows the last `epochs` epochs of a cosine schedule of this many
    smooth: float = 0.0  # γ of the smoothness penalty γ·Σ‖θₙ₊₁ − θₙ‖² across consecutive layers
    bf16: bool | str = "auto"  # bf16 autocast: auto = on CUDA and on CPUs with native bf16
    channels_last: bool | str = "auto"  # auto = wherever bf16 autocast is on
    eval_every: int = 1  # evaluate the test set every N epochs (and always after the last)
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    compile: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.epochs, bool) or not isinstance(self.epochs, int) or self.epochs < 0:
            raise RecipeError(f"epochs must be an int >= 0, got {self.epochs!r}")
        _positive("lr", self.lr)
        for k in ("momentum", "weight_decay", "warmup_epochs", "label_smoothing", "l1", "gamma", "smooth"):
            _positive(k, getattr(self, k), allow_zero=True)
        if self.l1_mode not in ("prox", "subgradient"):
            raise RecipeError(f"l1_mode must be prox or subgradient, got {self.l1_mode!r}")
        if self.schedule not in ("cosine", "step", "constant"):
            raise RecipeError(f"schedule must be cosine, step or constant, got {self.schedule!r}")
        if self.label_smoothing >= 1:
            raise RecipeError("label_smoothing must be < 1")
        _positive("l1_warmup_epochs", self.l1_warmup_epochs, allow_zero=True)
        _positive("distill_temperature", self.distill_temperature)
        if isinstance(self.distill, bool) or not isinstance(self.distill, (int, float)) or not 0 <= self.distill <= 1:
            raise RecipeError(f"distill must be a weight in [0, 1], got {self.distill!r}")
        if self.teacher not in ("sparse", "init"):
            raise RecipeError(f"teacher must be \"sparse\" (the run's unpruned sparse.pt) or \"init\" (model.init's "
                              f"weights), got {self.teacher!r}")
        if isinstance(self.rewind_of, bool) or not isinstance(self.rewind_of, int) or self.rewind_of < 0:
            raise RecipeError(f"rewind_of must be an int >= 0 (0: off), got {self.rewind_of!r}")
        if self.rewind_of and (self.rewind_of < self.epochs or self.schedule != "cosine" or self.warmup_epochs):
            raise RecipeError(f"rewind_of={self.rewind_of} rewinds a cosine schedule without warm-up to its last "
                              f"{self.epochs} epochs: it needs schedule = \"cosine\", warmup_epochs = 0 and "
                              f"rewind_of >= epochs")
        for k in ("bf16", "channels_last"):
            if getattr(self, k) not in (True, False, "auto"):
                raise RecipeError(f"{k} must be true, false or \"auto\", got {getattr(self, k)!r}")
        if isinstance(self.eval_every, bool) or not isinstance(self.eval_every, int) or self.eval_every < 1:
            raise RecipeError(f"eval_every must be an int >= 1, got {self.eval_every!r}")
        object.__setattr__(self, "milestones", tuple(self.milestones))


@dataclass(frozen=True)
class PruneStageConfig:
    """The pruning rule (see :class:`resprune.PruneConfig`): one of threshold / target_macs /
    target_latency_ms (the last with ``latency_table``, a table from export/latency_table.py;
    a ``latency_table`` with another rule adds the predicted latency to the report)."""

    threshold: float | None = DEFAULT_THRESHOLD
    target_macs: float | int | None = None
    target_latency_ms: float | None = None
    latency_table: str | None = None
    rank: str = "scale"
    min_layers_per_stage: int = 1
    recalibrate_batches: int = 0  # re-estimate BatchNorm statistics on this many training batches after removal
    taylor_batches: int = 16  # training batches (no augmentation) that rank = "taylor" averages over

    @property
    def report_threshold(self) -> float:
        """The |scale| threshold statistics are reported against (:data:`DEFAULT_THRESHOLD`
        in budget mode)."""
        return self.threshold if self.threshold is not None else DEFAULT_THRESHOLD

    def to_prune_config(self, input_size: tuple[int, ...] | None = None):
        """The :class:`resprune.PruneConfig` of this rule (``input_size``: PruneConfig's default
        when not given)."""
        from .prune import PruneConfig

        size = {} if input_size is None else {"input_size": input_size}
        return PruneConfig(threshold=self.threshold, target_macs=self.target_macs,
                           target_latency_ms=self.target_latency_ms, latency_table=self.latency_table,
                           rank=self.rank, min_layers_per_stage=self.min_layers_per_stage, **size)

    def __post_init__(self) -> None:
        for k in ("recalibrate_batches", "taylor_batches"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int) or v < (0 if k == "recalibrate_batches" else 1):
                raise RecipeError(f"prune.{k} must be an int >= {0 if k == 'recalibrate_batches' else 1}, got {v!r}")
        try:
            self.to_prune_config()
        except ValueError as exc:
            raise RecipeError(f"prune: {exc}") from exc


@dataclass(frozen=True)
class ExportConfig:
    """ONNX export and latency benchmark of a run: the one place their defaults are defined
    (``resprune export``/``bench`` and the ``export``/``bench`` stages take them from here).

    ``atol``, ``rtol``: the onnxruntime check fails when the max |difference| of the logits
    exceeds ``atol + rtol·max|logit|`` (the relative part keeps float32 rounding of nets with
    huge logits, e.g. after a very short training run, from failing it; 1e-6 is ~6× the
    rounding floor measured on such a ResNet-56).
    """

    onnx: bool = True
    opset: int | None = None
    atol: float = DEFAULT_ATOL
    rtol: float = DEFAULT_RTOL
    bench: bool = True
    bench_batches: tuple = (1, 64)
    bench_runs: int = 30
    bench_warmup: int = 5
    bench_threads: int | None = None  # None or 0: the physical cores (ort_bench sets and records it)

    def __post_init__(self) -> None:
        object.__setattr__(self, "bench_batches", tuple(self.bench_batches))


@dataclass(frozen=True)
class QuantizeConfig:
    """INT8 models of the exported ONNX files (``resprune quantize``; ``resprune run`` after
    export when ``enabled``): the one place the quantizer's defaults are defined for runs.

    ``method`` (minmax, percentile, entropy) and ``images`` (training images it calibrates
    on) default to the measurement in benchmarks/results/int8_calibration.md; ``activations``
    int8 (S8S8) or uint8 (U8S8); ``keep_fp32`` nodes left in fp32 (``first``, ``last`` or node
    names); the INT8 model must agree with the fp32 one on the top-1 class of at least
    ``min_agreement`` of ``check_images`` test images (null: all of them).
    """

    enabled: bool = False
    method: str = DEFAULT_METHOD
    images: int = DEFAULT_IMAGES
    activations: str = DEFAULT_ACTIVATIONS
    keep_fp32: tuple = ()
    check_images: int | None = None
    min_agreement: float = DEFAULT_MIN_AGREEMENT

    def __post_init__(self) -> None:
        if not isinstance(self.enabled, bool):
            raise RecipeError(f"quantize.enabled must be true or false, got {self.enabled!r}")
        if self.method not in METHODS:
            raise RecipeError(f"quantize.method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.activations not in ACTIVATIONS:
            raise RecipeError(f"quantize.activations must be one of {', '.join(ACTIVATIONS)}, got {self.activations!r}")
        for k in ("images", "check_images"):
            v = getattr(self, k)
            if (v is not None or k == "images") and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise RecipeError(f"quantize.{k} must be an int >= 1{' or null' if k != 'images' else ''}, got {v!r}"
                                  + (" (calibration needs training images)" if k == "images" else ""))
        m = self.min_agreement
        if isinstance(m, bool) or not isinstance(m, (int, float)) or not 0 < m <= 1:
            raise RecipeError(f"quantize.min_agreement must be a fraction in (0, 1], got {m!r}")
        keep = self.keep_fp32
        if isinstance(keep, str) or not isinstance(keep, (list, tuple)) or not all(isinstance(k, str) for k in keep):
            raise RecipeError(f"quantize.keep_fp32 must be a list of node names, \"first\" or \"last\", got {keep!r}")
        object.__setattr__(self, "keep_fp32", tuple(keep))


@dataclass(frozen=True)
class ReportConfig:
    """What the report compares the pruned model with.

    ``baseline``: the same net trained on the same schedule without L1 and not pruned, as a
    run directory (its trained and final accuracy, MACs and params become the report's
    baseline column) or as a number (its final test accuracy in %, e.g. a published figure).
    """

    baseline: str | float | None = None

    def __post_init__(self) -> None:
        b = self.baseline
        if b is not None and (isinstance(b, bool) or not isinstance(b, (str, int, float))
                              or (not isinstance(b, str) and not 0 <= b <= 100)):
            raise RecipeError(f"report.baseline must be a run directory or an accuracy in % (0-100), got {b!r}")


@dataclass(frozen=True)
class Recipe:
    name: str = "custom"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    prune: PruneStageConfig = field(default_factory=PruneStageConfig)
    finetune: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=0, lr=0.01, l1=0.0))
    export: ExportConfig = field(default_factory=ExportConfig)
    quantize: QuantizeConfig = field(default_factory=QuantizeConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    engine: str = "serial"
    nproc: int = 1
    engine_options: dict = field(default_factory=dict)  # fields of the engine's config (e.g. MGRITConfig)
    version: int = CONFIG_VERSION

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)


SECTIONS = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig, "prune": PruneStageConfig,
            "finetune": TrainConfig, "export": ExportConfig, "quantize": QuantizeConfig, "report": ReportConfig}


def _build(cls, values: dict, where: str):
    valid = {f.name for f in fields(cls)}
    unknown = set(values) - valid
    if unknown:
        raise RecipeError(f"unknown key(s) {', '.join(sorted(unknown))} in [{where}]; valid: {', '.join(sorted(valid))}")
    try:
        return cls(**values)
    except TypeError as exc:
        raise RecipeError(f"[{where}]: {exc}") from exc


def recipe_from_dict(d: dict) -> Recipe:
    top = {f.name for f in fields(Recipe)}
    unknown = set(d) - top
    if unknown:
        raise RecipeError(f"unknown recipe section(s) {', '.join(sorted(unknown))}; valid: {', '.join(sorted(top))}")
    kw: dict[str, Any] = {}
    for k, v in d.items():
        if k in SECTIONS:
            if not isinstance(v, dict):
                raise RecipeError(f"[{k}] must be a table of keys")
            if k == "prune" and any(v.get(b) is not None for b in BUDGETS) and "threshold" not in v:
                v = {**v, "threshold": None}  # a budget replaces the default threshold
            kw[k] = _build(SECTIONS[k], v, k)
        else:
            kw[k] = v
    nproc = kw.get("nproc", 1)
    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise RecipeError(f"nproc must be an int >= 1, got {nproc!r}")
    _check_engine(kw.get("engine", "serial"), kw.get("engine_options", {}))
    if "quantize" in kw and kw["quantize"].enabled and not kw.get("export", ExportConfig()).onnx:
        raise RecipeError("quantize.enabled needs the ONNX export it quantizes (export.onnx = true)")
    recipe = Recipe(**kw)
    _check_teacher(recipe)
    return recipe


def _check_teacher(recipe: Recipe) -> None:
    """Distillation needs a teacher that exists by then: ``model.init`` for ``"init"``; the
    run's own ``sparse.pt`` (``"sparse"``) only once training has made it, i.e. in [finetune]."""
    for sec in ("train", "finetune"):
        t = getattr(recipe, sec)
        if t.distill <= 0:
            continue
        if recipe.engine != "serial":
            raise RecipeError(f"{sec}.distill: distillation trains serially only, not with engine={recipe.engine!r}")
        if t.teacher == "init" and recipe.model.init is None:
            raise RecipeError(f"{sec}.teacher = \"init\" distils from model.init's weights, but model.init is not set")
        if t.teacher == "sparse" and sec == "train":
            raise RecipeError("train.teacher = \"sparse\" would distil from the model being trained; use "
                              "\"init\" (model.init's weights) or distil in [finetune]")


def _check_engine(name: Any, options: Any) -> None:
    """The engine must be registered (``resprune.parallel.list_engines``) and its options
    valid for its config class, so that a bad recipe fails before any process starts."""
    from .parallel.engines import engine_config, list_engines

    if not isinstance(options, dict):
        raise RecipeError("engine_options must be a table (dict)")
    if name not in list_engines():
        raise RecipeError(f"engine={name!r} is unknown; available: {', '.join(list_engines())}")
    try:
        engine_config(name, options)
    except ValueError as exc:
        raise RecipeError(str(exc)) from None


def _parse_value(raw: str) -> Any:
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def apply_overrides(recipe: Recipe, overrides: list[str]) -> Recipe:
    """Apply ``section.key=value`` (or ``key=value`` for top-level fields) overrides."""
    d = recipe.to_dict()
    for item in overrides:
        if "=" not in item:
            raise RecipeError(f"--set expects key=value, got {item!r}")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if parts[0] == "engine_options" and len(parts) <= 2:  # free-form; the engine validates it
            if len(parts) == 1:
                d["engine_options"] = _parse_value(raw)
            else:
                d["engine_options"][parts[1]] = _parse_value(raw)
        elif len(parts) == 1:
            if parts[0] not in d or parts[0] in SECTIONS:
                raise RecipeError(f"unknown recipe key {key!r}; top-level keys: engine, engine_options, name, nproc; "
                                  f"sections: {', '.join(SECTIONS)}")
            d[parts[0]] = _parse_value(raw)
        elif len(parts) == 2 or (len(parts) == 3 and parts[1] == "kwargs"):
            sec = parts[0]
            if sec not in SECTIONS:
                raise RecipeError(f"unknown recipe section {sec!r} in {key!r}; sections: {', '.join(SECTIONS)}")
            if parts[1] not in d[sec]:
                raise RecipeError(
                    f"unknown recipe key {key!r}; keys of [{sec}]: {', '.join(sorted(d[sec]))}"
                )
            if len(parts) == 3:
                d[sec]["kwargs"][parts[2]] = _parse_value(raw)
            else:
                d[sec][parts[1]] = _parse_value(raw)
        else:
            raise RecipeError(f"unknown recipe key {key!r}")
    given = {o.split("=", 1)[0].strip() for o in overrides}
    if d["engine"] != recipe.engine and not any(k.split(".")[0] == "engine_options" for k in given):
        d["engine_options"] = {}  # the recipe's options belong to its own engine, not the new one
    prune_given = {k.removeprefix("prune.") for k in given if k.startswith("prune.")}
    rules = {"threshold", *BUDGETS}
    if prune_given & rules:  # setting one pruning rule switches the others off unless they were given too
        for r in rules - prune_given:
            d["prune"][r] = None
    return recipe_from_dict(d)


def recipe_dirs() -> list[Path]:
    """Where recipe names are looked up: ./recipes, then the recipes/ beside the package."""
    return [Path.cwd() / "recipes", Path(__file__).resolve().parent.parent / "recipes"]


def list_recipes() -> list[str]:
    names = set()
    for d in recipe_dirs():
        if d.is_dir():
            names.update(p.stem for p in d.glob("*.toml"))
    return sorted(names)


def load_recipe(name_or_path: str, overrides: list[str] | None = None) -> Recipe:
    """Load a recipe by name (``recipes/NAME.toml``) or path (``.toml``/``.json``)."""
    p = Path(name_or_path)
    if not p.is_file():
        for d in recipe_dirs():
            if (d / f"{name_or_path}.toml").is_file():
                p = d / f"{name_or_path}.toml"
                break
        else:
            raise RecipeError(f"no recipe {name_or_path!r}: not a file and not one of {', '.join(list_recipes())}")
    try:
        text = p.read_text()
        d = json.loads(text) if p.suffix == ".json" else tomllib.loads(text)
    except (OSError, ValueError) as exc:
        raise RecipeError(f"{p}: cannot read recipe: {exc}") from exc
    d.setdefault("name", p.stem)
    recipe = recipe_from_dict(d)
    return apply_overrides(recipe, overrides or [])

