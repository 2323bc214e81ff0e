"""The training loop: one loop for sparse training, fine-tuning and layer-parallel engines.

* SGD with momentum / Nesterov; weight decay on conv and linear weights only (never on BN,
  biases or layer scales: the scales are driven by the L1 term alone).
* Learning rate per step: linear warm-up, then cosine to 0, step decay, or constant.
* Loss = cross entropy (optional label smoothing) + ``l1 · Σ|s|`` over removable scales.
  With ``l1_mode="prox"`` (default) the L1 term is applied as a proximal step after every
  optimiser step, ``s ← sign(s)·max(|s| − lr·λ/(1−momentum), 0)`` (ISTA; the ``1/(1−β)`` is
  the step a constant gradient ``λ`` would take under momentum ``β``, so ``λ`` means the same
  in both modes): scales whose task gradient stays below ``λ`` reach exactly 0, so removing
  them changes nothing. ``"subgradient"`` adds
  ``λ·Σ|s|`` to the loss instead, which only makes scales small and oscillating around 0.
* bf16 autocast and channels_last (``"auto"``: on CUDA, and on CPUs with native bf16
  instructions, where they roughly double training throughput; fp32 elsewhere). Parameters,
  the optimiser, the L1 prox step and BN running statistics stay float32. Evaluation runs in
  float32 on the CPU (bf16 there saves little and flips a few predictions), bf16 on CUDA.
  Optional ``torch.compile`` (CUDA).
* The test set is evaluated every ``eval_every`` epochs and after the last.
* A checkpoint after every epoch, written atomically (temporary file, then rename), that
  ``resume=True`` continues from: weights, the optimizer state keyed by parameter name (with
  an engine gathered from every rank, so it resumes on any number of ranks or serially), the
  scheduler, RNG states and the engine's loop state. A NaN/inf loss stops the run with an
  error that names the epoch, step and the last good checkpoint (never overwritten by a
  diverged state).
* TensorBoard scalars (loss, accuracy, lr, scales under the pruning threshold) and the
  layer-scale histogram; a progress bar on a terminal, one fixed-width row per epoch in logs.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..config import DEFAULT_THRESHOLD, TrainConfig
from ..errors import ResPruneError
from ..data import DeviceLoader
from ..parallel.engines import load_optimizer_state_by_name, optimizer_state_by_name
from ..serialization import CheckpointError, atomic_save, model_from_payload, model_payload
from ..sparsity import LayerScaleL1, LayerSmoothness, removable_scales, scale_stats
from .distill import distill_loss
from .progress import Progress

logger = logging.getLogger(__name__)

__all__ = [
    "Trainer", "EpochResult", "TrainingDiverged", "DeviceError", "evaluate", "select_device", "param_groups",
    "native_bf16", "resolve_precision",
]

CKPT_FORMAT = "resprune-train-state"
CHECK_EVERY = 50  # steps between NaN checks (each one waits for the device)
RECALIBRATE_BATCHES = 32  # training batches used to re-estimate BN statistics (engines with inexact ones)


class TrainingDiverged(ResPruneError, RuntimeError):
    """The loss became NaN or infinite."""


class DeviceError(ResPruneError, RuntimeError):
    """The device a recipe or ``--device`` asks for is not a device, or not one this machine has."""


@dataclass
class EpochResult:
    epoch: int
    train_loss: float
    train_acc: float
    test_loss: float
    test_acc: float
    lr: float
    scales_below: int
    wall_s: float


def select_device(spec: str = "auto") -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(spec)
    except RuntimeError as exc:  # torch: "Expected one of cpu, cuda, ... device type at start of ..."
        raise DeviceError(f"device {spec!r}: {exc}") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"device {spec!r} asked for, but CUDA is not available here")
    return dev


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 natively: any CUDA device torch supports bf16 on, or a
    CPU with AVX512-BF16 / AMX (oneDNN's own check; elsewhere bf16 is emulated and slower)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN
        return False


def resolve_precision(cfg: TrainConfig, device: torch.device) -> tuple[bool, bool]:
    """``(bf16, channels_last)`` for ``cfg`` on ``device``; ``"auto"`` means on where bf16 is
    native (channels_last follows bf16: in fp32 on the CPU it is not faster)."""
    bf16 = native_bf16(device) if cfg.bf16 == "auto" else bool(cfg.bf16)
    cl = bf16 if cfg.channels_last == "auto" else bool(cfg.channels_last)
    return bf16, cl


def param_groups(
    model: nn.Module, weight_decay: float, named: list[tuple[str, nn.Parameter]] | None = None
) -> list[dict]:
    """Two groups: decayed and not decayed.

    Decayed: conv and linear weights, and the BN affine parameters *inside ResConv layers*:
    ``s · (γ·x̂ + β)`` is unchanged when ``s`` shrinks and ``γ, β`` grow, so without decay on
    ``γ, β`` the L1 term on ``s`` could be dodged by rescaling and no scale would reach 0.
    Not decayed: the layer scales (driven by L1 alone), biases, other BN parameters.
    ``named`` restricts the groups to those parameters (a layer-parallel rank's own).
    """
    from ..layers import ResConv2d

    in_resconv = {id(m.bn.weight) for m in model.modules() if isinstance(m, ResConv2d)}
    in_resconv |= {id(m.bn.bias) for m in model.modules() if isinstance(m, ResConv2d)}
    decay, rest = [], []
    for name, p in (named if named is not None else model.named_parameters()):
        if not p.requires_grad:
            continue
        (decay if p.ndim > 1 or id(p) in in_resconv else rest).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def lr_lambda(cfg: TrainConfig, steps_per_epoch: int) -> Callable[[int], float]:
    """The lr factor of each step: warm-up then cosine/step/constant; with ``rewind_of`` the
    last ``epochs`` epochs of a ``rewind_of``-epoch cosine schedule (learning-rate rewinding)."""
    if cfg.rewind_of:
        span, offset = cfg.rewind_of * steps_per_epoch, (cfg.rewind_of - cfg.epochs) * steps_per_epoch
        return lambda step: 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step + offset) / span)))
    total = max(1, cfg.epochs * steps_per_epoch)
    warm = int(cfg.warmup_epochs * steps_per_epoch)

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if cfg.schedule == "cosine":
            t = (step - warm) / max(1, total - warm)
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))
        if cfg.schedule == "step":
            epoch = step / steps_per_epoch
            return cfg.gamma ** sum(epoch >= m for m in cfg.milestones)
        return 1.0

    return f


@torch.no_grad()
def evaluate(
    forward: Callable[[torch.Tensor], torch.Tensor], loader: DeviceLoader, bf16: bool = False
) -> tuple[float, float]:
    """(mean cross-entropy loss, top-1 accuracy in %) of ``forward`` over ``loader``."""
    loss_sum, correct, n = 0.0, 0, 0
    for x, y in loader:
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
            out = forward(x)
        out = out.float()
        loss_sum += float(F.cross_entropy(out, y, reduction="sum"))
        correct += int((out.argmax(1) == y).sum())
        n += len(y)
    return loss_sum / max(n, 1), 100.0 * correct / max(n, 1)


class Trainer:
    """Train ``model`` on ``train_loader``; evaluate on ``test_loader`` after every epoch.

    Args:
        model: the model (on any device; it is moved to ``cfg.device``).
        train_loader, test_loader: :class:`~resprune.data.DeviceLoader` on the same device.
        cfg: optimiser, schedule, L1 and precision settings.
        run_dir: where ``checkpoints/<stage>.pt`` and ``tb/`` go (None: no files).
        stage: name of this training stage ("sparse", "finetune") for files and logs.
        threshold: pruning threshold, for the "scales below threshold" statistic (default:
            the recipe's, :data:`resprune.config.DEFAULT_THRESHOLD`).
        engine: a layer-parallel engine (``resprune.parallel``); None trains serially.
        log: where per-epoch rows go (default: ``logger.info``).
        teacher: the model to distil from when ``cfg.distill > 0`` (serial training only): it
            sees the same augmented batch as the student, in eval mode, without gradient.
    """

    def __init__(
        self,
        model: nn.Module,
        train_loader: DeviceLoader,
        test_loader: DeviceLoader,
        cfg: TrainConfig,
        run_dir: str | Path | None = None,
        stage: str = "train",
        threshold: float = DEFAULT_THRESHOLD,
        engine: Any = None,
        log: Callable[[str], None] | None = None,
        teacher: nn.Module | None = None,
    ) -> None:
        self.cfg, self.stage, self.threshold, self.engine = cfg, stage, threshold, engine
        self.device = train_loader.device
        self.model = model.to(self.device)
        self.cuda = self.device.type == "cuda"
        # engines own their numerics (the converged MGRIT tests run in float64): fp32 there
        self.bf16, self.channels_last = resolve_precision(cfg, self.device) if engine is None else (False, False)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.train_loader, self.test_loader = train_loader, test_loader
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.is_main = engine is None or engine.rank == 0
        self.log = log or logger.info
        self.l1 = LayerScaleL1(cfg.l1)
        if cfg.distill > 0 and (teacher is None or engine is not None):
            raise ValueError("distill > 0 needs a teacher model and serial training (no engine)")
        self.teacher = teacher.to(self.device).eval() if teacher is not None and cfg.distill > 0 else None
        if self.teacher is not None and self.channels_last:
            self.teacher = self.teacher.to(memory_format=torch.channels_last)
        self.prox_scales = [m.scale for _, m in removable_scales(self.model)] if cfg.l1_mode == "prox" else []
        if engine is not None:  # only the scales this rank owns
            owned = {id(p) for _, p in engine.local_named_parameters()}
            self.prox_scales = [s for s in self.prox_scales if id(s) in owned]
        steps = len(train_loader)
        if engine is None:
            self.optimizer = torch.optim.SGD(
                param_groups(self.model, cfg.weight_decay), lr=cfg.lr, momentum=cfg.momentum,
                nesterov=cfg.nesterov and cfg.momentum > 0,
            )
        else:
            self.optimizer = engine.optimizer
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg, steps))
        self.forward = torch.compile(self.model) if (cfg.compile and self.cuda) else self.model
        self.history: list[EpochResult] = []
        self.start_epoch = 0
        self._tb = None

    # ------------------------------------------------------------------ checkpoints
    @property
    def ckpt_path(self) -> Path | None:
        return self.run_dir / "checkpoints" / f"{self.stage}.pt" if self.run_dir else None

    def gather_model(self) -> nn.Module | None:
        """The full, current model on rank 0 (collective with an engine); None elsewhere."""
        if self.engine is None:
            return self.model
        sd = self.engine.full_state_dict()
        if self.is_main:
            self.model.load_state_dict(sd)
            return self.model
        return None

    def save_checkpoint(self, epoch: int) -> None:
        """Write ``checkpoints/<stage>.pt`` on rank 0 (collective with an engine): weights, the
        optimizer state keyed by parameter name (gathered from every rank: it resumes on any
        number of ranks, or serially), scheduler, epoch, RNG states, history."""
        if self.ckpt_path is None:
            return
        owner = self.gather_model()
        optimizer = self._optimizer_state()
        if not self.is_main:
            return
        state = {
            "format": CKPT_FORMAT,
            "stage": self.stage,
            "epoch": epoch,
            "model": model_payload(owner),
            "optimizer": optimizer,
            "scheduler": self.scheduler.state_dict(),
            "engine": self.engine.loop_state() if self.engine is not None else {},
            "loader_rng": self.train_loader.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "history": [asdict(h) for h in self.history],
            "config": asdict(self.cfg),
        }
        atomic_save(state, self.ckpt_path)

    def _optimizer_state(self) -> dict | None:
        if self.engine is not None:
            return self.engine.full_optimizer_state()
        return optimizer_state_by_name(self.optimizer, list(self.model.named_parameters()))

    def _read_checkpoint(self) -> dict | None:
        """``checkpoints/<stage>.pt`` as saved, ``None`` when there is none."""
        p = self.ckpt_path
        if p is None or not p.is_file():
            return None
        try:
            state = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CheckpointError(f"{p}: cannot resume, checkpoint unreadable: {exc}") from exc
        if not isinstance(state, dict) or state.get("format") != CKPT_FORMAT or state.get("stage") != self.stage:
            raise CheckpointError(f"{p}: not a '{self.stage}' training checkpoint of resprune")
        return state

    def _saved_optimizer(self, state: dict) -> dict | None:
        """The checkpoint's optimizer state keyed by parameter name; a serial checkpoint of
        torch's own form (by index) is translated, ``None`` when the checkpoint has none."""
        saved = state.get("optimizer")
        if saved is None:
            self.log(f"[{self.stage}] warning: {self.ckpt_path} holds no optimizer state (an engine run of an "
                     "older resprune): momentum restarts from zero")
            return None
        if "state_by_name" in saved:
            return saved
        names = {id(p): n for n, p in self.model.named_parameters()}  # torch's index = position in the groups
        order = [names[id(p)] for g in param_groups(self.model, 0.0) for p in g["params"]]
        return {"state_by_name": {order[i]: v for i, v in saved["state"].items()},
                "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in saved["param_groups"]]}

    def resume(self) -> bool:
        """Load ``checkpoints/<stage>.pt`` if present; True when something was resumed. With an
        engine, collective: rank 0 reads the file and hands every rank its part."""
        state, error = None, None
        if self.is_main:
            try:
                state = self._read_checkpoint()
            except CheckpointError as exc:
                error = str(exc)
        if self.engine is not None:  # every rank learns what rank 0 found (the small entries)
            small = state and {k: v for k, v in state.items() if k not in ("model", "optimizer")}
            error, small = self.engine.comm.broadcast_object((error, small), 0)
            state = state if self.is_main else small
        if error is not None:
            raise CheckpointError(error)
        if state is None:
            return False
        saved_opt = self._saved_optimizer(state) if self.is_main else None
        if self.engine is None:
            self.model.load_state_dict(model_from_payload(state["model"], self.ckpt_path).state_dict())
            if saved_opt is not None:
                load_optimizer_state_by_name(self.optimizer, list(self.model.named_parameters()), saved_opt)
        else:
            sd = model_from_payload(state["model"], self.ckpt_path).state_dict() if self.is_main else None
            self.engine.load_full_state_dict(sd)
            self.engine.load_full_optimizer_state(saved_opt)
            self.engine.load_loop_state(state.get("engine") or {})
        self.scheduler.load_state_dict(state["scheduler"])
        self.train_loader.generator.set_state(state["loader_rng"])
        torch.set_rng_state(state["torch_rng"])
        self.history = [EpochResult(**h) for h in state["history"]]
        self.start_epoch = int(state["epoch"])
        self.log(f"[{self.stage}] resumed from {self.ckpt_path} after epoch {self.start_epoch}")
        return True

    # ------------------------------------------------------------------ logging
    def _tensorboard(self):
        if self._tb is None and self.is_main and self.run_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.run_dir / "tb" / self.stage))
        return self._tb

    def _log_epoch(self, r: EpochResult) -> None:
        if not self.is_main:
            return
        if not self.history or r is self.history[0]:
            self.log(f"[{self.stage}] {'epoch':>5} {'train_loss':>10} {'train_acc':>9} {'test_loss':>9} "
                     f"{'test_acc':>8} {'lr':>9} {'|s|<thr':>7} {'time_s':>7}")
        acc = f"{r.train_acc:>9.2f}" if math.isfinite(r.train_acc) else f"{'-':>9}"  # engines: not tracked
        below = f"{r.scales_below:>7}" if r.scales_below >= 0 else f"{'-':>7}"
        self.log(f"[{self.stage}] {r.epoch:>5} {r.train_loss:>10.4f} {acc} {r.test_loss:>9.4f} "
                 f"{r.test_acc:>8.2f} {r.lr:>9.5f} {below} {r.wall_s:>7.1f}")
        tb = self._tensorboard()
        if tb is not None:
            for k in ("train_loss", "train_acc", "test_loss", "test_acc", "lr", "scales_below"):
                tb.add_scalar(f"{self.stage}/{k}", getattr(r, k), r.epoch)
            st = scale_stats(self.model, self.threshold)
            if st.values:
                tb.add_histogram(f"{self.stage}/layer_scales", torch.tensor(st.values), r.epoch)
            tb.flush()

    # ------------------------------------------------------------------ training
    def _ramp_l1(self) -> None:
        """λ of this step: ``l1`` times the fraction of ``l1_warmup_epochs`` done so far."""
        warm = self.cfg.l1_warmup_epochs * len(self.train_loader)
        done = self.scheduler.last_epoch  # steps taken
        self.l1.lam = self.cfg.l1 * (min(1.0, (done + 1) / warm) if warm > 0 else 1.0)

    def _prox(self) -> None:
        if self.prox_scales and self.cfg.l1 > 0:
            self.l1.prox_(self.prox_scales, self.optimizer, reset_momentum=self.cfg.l1_reset_momentum)

    def _loss(self, out: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Cross entropy (label smoothing), blended with distillation from the teacher."""
        ce = F.cross_entropy(out.float(), y, label_smoothing=self.cfg.label_smoothing)
        if self.teacher is None:
            return ce
        with torch.no_grad():
            target = self.teacher(x).float()
        return distill_loss(out.float(), target, ce, self.cfg.distill, self.cfg.distill_temperature)

    def _step(self, x: torch.Tensor, y: torch.Tensor,
              index: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One optimiser step; returns (loss, correct) as tensors, without a device sync.
        ``index``: the samples' indices, for an engine's indexed epoch."""
        if self.engine is not None:
            value = self.engine.step(x, y) if index is None else self.engine.step(x, y, index=index)
            loss = torch.tensor(float(value))
            self._ramp_l1()
            self._prox()
            return loss, None
        self._ramp_l1()
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            out = self.forward(x)
            loss = self._loss(out, x, y)
        penalty = self.l1(self.model)
        if self.cfg.smooth > 0:  # γ·Σ‖θₙ₊₁ − θₙ‖² across consecutive layers (always in the loss)
            loss = loss + LayerSmoothness(self.cfg.smooth)(self.model)
        total = loss if self.prox_scales else loss + penalty
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        self.optimizer.step()
        if self.prox_scales:
            self._prox()
            total = loss + penalty
        return total.detach(), (out.argmax(1) == y).sum()

    def eval_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.engine is not None:
            return self.engine.eval_forward(x)
        return self.forward(x)

    def fit(self, resume: bool = False) -> list[EpochResult]:
        if resume:
            self.resume()
        for epoch in range(self.start_epoch + 1, self.cfg.epochs + 1):
            t0 = time.perf_counter()
            (self.engine or self.model).train()
            bar = Progress(len(self.train_loader), f"{self.stage} {epoch}/{self.cfg.epochs}", self.is_main)
            loss_sum = torch.zeros((), device=self.device)
            correct = torch.zeros((), device=self.device, dtype=torch.long)
            n, steps = 0, len(self.train_loader)
            # an engine with per-sample state (auxvar) may ask for fixed, indexed samples
            indexed = self.engine is not None and self.engine.indexed_epoch(epoch)
            batches = self.train_loader.indexed(augment=False) if indexed else (
                (x, y, None) for x, y in self.train_loader)
            for i, (x, y, idx) in enumerate(batches):
                loss, c = self._step(x, y, idx)
                self.scheduler.step()
                loss_sum += loss.to(self.device) * len(y)
                if c is not None:
                    correct += c
                n += len(y)
                # sync with the device only every CHECK_EVERY steps (and on a terminal's bar)
                if (i + 1) % CHECK_EVERY == 0 or i + 1 == steps or bar.bar is not None:
                    value = float(loss)
                    if not math.isfinite(value) or not math.isfinite(float(loss_sum)):
                        bar.close()
                        last = self.ckpt_path if self.ckpt_path and self.ckpt_path.is_file() else None
                        raise TrainingDiverged(
                            f"[{self.stage}] loss is {value} at epoch {epoch}, step {i + 1} "
                            f"(checked every {CHECK_EVERY} steps); last good checkpoint: {last or 'none'} "
                            "(untouched). Lower train.lr or train.l1."
                        )
                    bar.update(value, i + 1)
            bar.close()
            if self.engine is not None and not self.engine.exact_bn_stats:
                # simultaneous MGRIT accumulated BN statistics from inexact states: re-estimate
                # them by exact forward passes, or eval (which uses them) is far off
                self.engine.recalibrate_bn(x for x, _ in itertools.islice(self.train_loader, RECALIBRATE_BATCHES))
            (self.engine or self.model).eval()
            if epoch % self.cfg.eval_every == 0 or epoch == self.cfg.epochs:
                test_loss, test_acc = evaluate(self.eval_forward, self.test_loader, self.bf16 and self.cuda)
            else:
                test_loss, test_acc = float("nan"), float("nan")
            r = EpochResult(
                epoch, float(loss_sum) / n, 100.0 * int(correct) / n if self.engine is None else float("nan"),
                test_loss, test_acc, self.optimizer.param_groups[0]["lr"],
                scale_stats(self.model, self.threshold).below if self.engine is None else -1,
                time.perf_counter() - t0,
            )
            self.history.append(r)
            self._log_epoch(r)
            self.save_checkpoint(epoch)
        if self._tb is not None:
            self._tb.close()
        return self.history
