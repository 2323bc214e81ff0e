"""Serial-parallel hybrid training with auxiliary variables (the ``auxvar`` engine).

After Sun et al., "A practical layer-parallel training algorithm for residual networks"
(arXiv 2009.01462) and its follow-up on auxiliary-variable networks (arXiv 2112.05387). No
reference code exists; what follows is this engine's reading of the papers' descriptions.

The net (``layer_sequence()``) is cut into ``K`` stages, one per rank (balanced by counted
cost). Stage ``k`` (0-based, rank ``k``) maps its input state to its output, ``F_k(·; θ_k)``.
Every boundary state between stages gets a **per-sample auxiliary variable** ``λ_k`` (the
input of stage ``k``, ``k = 1..K−1``; ``λ_0`` is the data), stored on rank ``k``, the rank that
owns the stage input. The training problem becomes

    min over θ, λ of  ℓ(F_{K−1}(λ_{K−1}), y) + Σ_{k=1}^{K−1} mean[(β/2)(P F_{k−1}(λ_{k−1}) − P λ_k)² + μ_k·(P F_{k−1} − P λ_k)]

(``mean``: over the batch and a state's elements, so β means the same at every boundary
size and filter; ``μ = 0`` in the penalty variant). With λ fixed every stage's sub-problem is
independent, so the ranks run in parallel:

1. rank ``k ≥ 1`` reads ``λ_k`` of the batch's samples and sends rank ``k−1`` its target
   ``P λ_k − μ_k/β`` (the augmented-Lagrangian term is the penalty around a shifted target,
   up to a constant); every rank runs its stage forward and sends ``P F_k`` to rank ``k+1``;
2. rank ``k < K−1`` minimises ``(β/2)·mean(P F_k − target)²`` over ``θ_k``; the last rank its
   task loss from ``λ_{K−1}``; every rank ``k ≥ 1`` also takes the gradient ``g`` of the two
   terms that couple its ``λ_k`` (its own stage's term through the input, and the previous
   stage's term through the target) and steps ``λ_k ← λ_k − (aux_step/β)·(B·d_k)·g``
   (``B·d_k``: the batch's elements of λ_k; the previous stage's term alone then moves λ a
   fraction ``aux_step`` of the way to ``P F``);
3. the augmented-Lagrangian variant then updates ``μ_k ← μ_k + β (P F_{k−1} − P λ_k)``.

``P`` is the **downsampling filter** on what crosses a boundary: average pooling by
``downsample`` (``f``; 1 = none) over the spatial dimensions. The coupling is measured between
the filtered states (on the coarse grid, which is the same as comparing both upsampled by
nearest neighbour): the received coarse state is, in effect, upsampled on arrival, and the
λ gradient through ``P`` is exactly that upsampling (autograd). Bytes sent per parallel step:
two coarse states per boundary (``stats["sent_bytes"]``); ``μ`` lives on the coarse grid.

**Initialisation.** The first time a sample is met (``index`` given, sample not yet seen) the
batch runs one ordinary serial forward, stage after stage: each rank stores what it receives
as ``λ_k`` (full resolution), so every penalty term is exactly zero; that step's parameter
gradients are zero on every stage but the last, whose gradients are serial training's, and
the gradient of ``λ_{K−1}`` is serial backprop's gradient of that activation.

**Serial correction.** Epochs ``1..parallel_epochs`` are parallel: :meth:`indexed_epoch` tells
the training loop to feed fixed, non-augmented samples with their indices
(``DeviceLoader.indexed(augment=False)``, ``step(x, y, index=...)``). Later epochs are
ordinary serial forward-backward through the stages (activations forward, gradients back,
data augmentation as configured): bitwise the serial engine's arithmetic (without a
regularizer; with one, the terms may be summed in another order).

Taken from the papers' descriptions: auxiliary boundary states per sample; the penalty
and augmented-Lagrangian formulations and the multiplier update; parallel sub-problems with λ
fixed, then the λ (and μ) update; initialisation by a serial forward; downsampling filters on
the communicated auxiliary variables; the final serial correction with augmentation; the
speed-up bound. This engine's own choices: the objective's scaling (means over a state's
elements and the batch); coupling between the *filtered* states on both sides (comparing a
full state with an upsampled coarse one would penalise the lost detail and never be zero);
one gradient step on λ per visit with the step above (in the linear regime the previous
stage's penalty gradient is then ``aux_step`` times backprop's, whatever β; β sets how far λ
strays from ``F`` under the task loss's pull, and how stiff the stages' sub-problems are: a
large β needs a small learning rate); lazy initialisation (a sample is initialised with the
weights of the moment it is first met, so parallel epoch 1 is that serial forward plus a λ
step); β growing geometrically per parallel epoch (``beta_growth``, capped by ``beta_max``); λ
and μ are not checkpointed (after a resume, weight load or re-partition they are
re-initialised by a serial forward); BN running statistics of parallel epochs come from λ
inputs, so the loop re-estimates them by exact forwards after each parallel epoch
(``exact_bn_stats`` False).

**Memory.** Rank ``k ≥ 1`` holds ``N·d_k`` floats for ``λ_k`` (``d_k`` elements of the state
entering stage ``k``, ``N`` training samples) plus ``N·d_k/f²`` for ``μ_k`` (AL) and two
bytes per sample per store for flags (``memory_bytes()["aux"]``); rank 0 holds two bytes per
sample. ResNet-20 at K = 2 (boundary 32×16×16, float32): 32 KiB per sample, 1.6 GB for the
50 000 CIFAR-10 images (plus 0.4 GB of μ at ``downsample=2``).

Example (one process: no boundary, so every step is a serial step of the whole net):
    >>> import torch, resprune as rp
    >>> from resprune.parallel import create_engine, AuxVarConfig
    >>> eng = create_engine("auxvar", rp.create_model("resnet20"), torch.nn.functional.cross_entropy,
    ...                     lambda p: torch.optim.SGD(p, lr=0.1), AuxVarConfig(variant="al"))
    >>> loss = eng.step(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3]), index=torch.arange(4))
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .comm import Comm
from .engines import register_engine
from .stage import PhaseClock, StageConfig, StagedEngine, tensor_bytes

logger = logging.getLogger(__name__)

__all__ = ["AuxVarConfig", "AuxVarEngine", "SampleStore"]

FWD, TGT, INIT, GRAD = 21, 22, 23, 24  # message tags: stage outputs, targets, initial states, gradients


@dataclass(frozen=True)
class AuxVarConfig(StageConfig):
    """Settings of the ``auxvar`` engine.

    Args:
        variant: ``"penalty"`` or ``"al"`` (augmented Lagrangian: multipliers μ per sample).
        parallel_epochs: ``E_p``, the epochs trained in parallel on fixed samples (from the
            first); the remaining epochs of the run are the serial correction ``E_s``, >= 0.
        beta: the penalty weight β of the first parallel epoch, > 0. The default 8 is a
            stability estimate, not tuned: ResNet-20's task gradient moves λ by about 5.4/β
            RMS per visit at initialisation (activations 1.4 RMS), and a stage's sub-problem
            stiffens with β (a small chain diverged at β = 50 with SGD lr 0.05).
        beta_growth: β is multiplied by this after every parallel epoch, >= 1.
        beta_max: cap of β, >= beta.
        aux_step: λ step, in units of 1/β per element (the fraction of the residual the
            previous stage's term alone closes), in (0, 1].
        downsample: average-pooling factor of the communicated states (1: full resolution);
            every boundary's spatial size must be divisible by it.
        input_size: sample input shape the partition is balanced for (default: the model's
            input channels at 32×32).
        version: config format version.

    Example:
        >>> AuxVarConfig(variant="al", downsample=2).beta
        8.0
    """

    variant: str = "penalty"
    parallel_epochs: int = 1
    beta: float = 8.0
    beta_growth: float = 1.0
    beta_max: float = 1e6
    aux_step: float = 0.5
    downsample: int = 1
    input_size: tuple[int, ...] | None = None
    version: int = 1

    def __post_init__(self) -> None:
        if self.variant not in ("penalty", "al"):
            raise ValueError(f"variant must be 'penalty' or 'al', got {self.variant!r}")
        for k, low in (("parallel_epochs", 0), ("downsample", 1)):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"{k} must be an int >= {low}, got {v!r}")
        checks = (("beta", self.beta > 0, "> 0"), ("beta_growth", self.beta_growth >= 1, ">= 1"),
                  ("beta_max", self.beta_max >= self.beta, ">= beta"),
                  ("aux_step", 0 < self.aux_step <= 1, "in (0, 1]"))
        for k, ok, want in checks:
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not ok:
                raise ValueError(f"{k} must be a finite number {want}, got {v!r}")
        self._check_input_size()


class SampleStore:
    """One tensor per training sample (all of one shape), addressed by sample index; grows on
    demand. ``seen`` marks the samples written so far."""

    def __init__(self, shape: tuple[int, ...], like: torch.Tensor) -> None:
        self.shape = tuple(shape)
        self.data = like.new_zeros((0, *self.shape))
        self.seen = torch.zeros(0, dtype=torch.bool, device=like.device)

    def _grow(self, n: int) -> None:
        if n > len(self.seen):
            extra = n - len(self.seen)
            self.data = torch.cat([self.data, self.data.new_zeros((extra, *self.shape))])
            self.seen = torch.cat([self.seen, self.seen.new_zeros(extra)])

    def all_seen(self, index: torch.Tensor) -> bool:
        return bool(len(index)) and int(index.max()) < len(self.seen) and bool(self.seen[index].all())

    def get(self, index: torch.Tensor) -> torch.Tensor:
        return self.data[index]

    def put(self, index: torch.Tensor, value: torch.Tensor) -> None:
        self._grow(int(index.max()) + 1)
        self.data[index] = value.detach().to(self.data.device, self.data.dtype)
        self.seen[index] = True

    def nbytes(self) -> int:
        return tensor_bytes([self.data, self.seen])


@register_engine("auxvar", config=AuxVarConfig)
class AuxVarEngine(StagedEngine):
    """Auxiliary-variable stages in parallel on fixed samples, then serial correction."""

    name = "auxvar"

    def __init__(self, model, loss_fn, optimizer_factory, config: AuxVarConfig | None = None,
                 regularizer=None, comm: Comm | None = None) -> None:
        self.epoch, self.parallel = 1, True
        self.aux_grad: torch.Tensor | None = None  # gradient of this rank's λ of the last parallel step
        super().__init__(model, loss_fn, optimizer_factory, config, regularizer, comm)

    # ---- schedule ----------------------------------------------------------------------------
    def indexed_epoch(self, epoch: int) -> bool:
        """Epoch ``epoch`` (1-based) of the training loop begins: True for the parallel epochs
        (the loop then feeds non-augmented samples with their indices), False for the serial
        correction. Sets β for the epoch."""
        self.parallel = epoch <= self.config.parallel_epochs
        if self.parallel:
            self.epoch = epoch
        return self.parallel

    @property
    def beta(self) -> float:
        c = self.config
        return min(c.beta * c.beta_growth ** (self.epoch - 1), c.beta_max)

    @property
    def exact_bn_stats(self) -> bool:  # type: ignore[override]
        """False after a parallel epoch: BN statistics were accumulated on λ inputs."""
        return not self.parallel

    # ---- per-sample state ------------------------------------------------------------------
    def _on_partition(self) -> None:
        self._check_downsample()
        self._clear_aux()

    def _on_load(self) -> None:
        self._clear_aux()

    def load_loop_state(self, state: dict) -> None:
        self._clear_aux()

    def _clear_aux(self) -> None:
        """Forget λ and μ: the next visit of each sample re-initialises them (serial forward)."""
        self.lam: SampleStore | None = None
        self.mu: SampleStore | None = None
        self.seen: SampleStore | None = None

    def _check_downsample(self) -> None:
        f = self.config.downsample
        if f == 1:
            return
        for p in self.bounds[1:-1]:
            shape = self.info.point_shape(p, 1)[1:]
            if len(shape) != 3 or shape[1] % f or shape[2] % f:
                raise ValueError(f"downsample={f}: the state entering layer {p} ({self.seq[p][0]}) has shape "
                                 f"{shape}, not (C, H, W) with H and W divisible by {f}")

    def _pool(self, t: torch.Tensor) -> torch.Tensor:
        f = self.config.downsample
        return t if f == 1 else F.avg_pool2d(t, f)

    def _coarse(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        f = self.config.downsample
        return shape if f == 1 else (*shape[:-2], shape[-2] // f, shape[-1] // f)

    def memory_bytes(self) -> dict[str, int]:
        """As the base, plus ``aux``: the per-sample λ, μ and seen-flags this rank stores."""
        mem = super().memory_bytes()
        mem["aux"] = sum(s.nbytes() for s in (self.lam, self.mu, self.seen) if s is not None)
        mem["total"] += mem["aux"]
        return mem

    # ---- one step ----------------------------------------------------------------------------
    def step(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor | None = None) -> float:
        """``forward_backward`` then the optimizer step; returns the loss."""
        loss = self.forward_backward(x, y, index)
        self.optimizer.step()
        return loss

    def forward_backward(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor | None = None) -> float:
        """``index`` (the samples' indices in the training set): a parallel step, which also
        updates this rank's λ (and μ) of those samples; ``None``: a serial step. Returns the
        objective summed over ranks (task loss + coupling terms + regularizer)."""
        self._ensure_released()
        self._zero_grad()
        self.comm.reset_counters()
        clock = PhaseClock()
        if index is None:
            parts = self._serial_step(x, y, clock)
        else:
            index = index.to(x.device)
            if self.seen is None:
                self.seen = SampleStore((), torch.zeros((), dtype=torch.uint8, device=x.device))
            init = not self.seen.all_seen(index)
            parts = (self._init_step if init else self._parallel_step)(x, y, index, clock)
            self.seen.put(index, torch.ones(len(index), dtype=torch.uint8))
        task, penalty, reg = self.comm.all_reduce_sum(parts)
        clock.lap("loss_wait")
        self.stats = self._step_stats(clock, task_loss=task, penalty=penalty, beta=self.beta,
                                      phase="serial" if index is None else "parallel")
        return task + penalty + reg

    def _regularizer(self) -> torch.Tensor | None:
        return self.regularizer(self.part) if self.regularizer is not None else None

    def _backward(self, terms: list[torch.Tensor | None], grads: list[torch.Tensor | None] | None = None) -> float:
        """Backpropagate the terms that carry a graph; the regularizer's value (last term)."""
        pairs = [(t, None if grads is None else g) for t, g in zip(terms, grads or [None] * len(terms))
                 if t is not None and t.requires_grad]
        if pairs:
            torch.autograd.backward([t for t, _ in pairs], [g for _, g in pairs] if grads else None)
        reg = terms[-1]
        return 0.0 if reg is None else float(reg.detach())

    def _serial_step(self, x: torch.Tensor, y: torch.Tensor, clock: PhaseClock) -> list[float]:
        """Exact forward-backward through the stages: activations forward, gradients back."""
        me, last, B = self.rank, self.world_size - 1, x.shape[0]
        h = x
        if me > 0:
            h = self.comm.recv(self._layer_info(x).point_shape(self.lo, B), me - 1, x, tag=FWD).requires_grad_()
        out = self.stage.forward(h)
        clock.lap("forward")
        reg, sends, task = self._regularizer(), [], 0.0
        if me < last:
            sends.append(self.comm.send_nowait(out, me + 1, tag=FWD))
            g = self.comm.recv(tuple(out.shape), me + 1, out, tag=GRAD)
            reg_v = self._backward([out, reg], [g, None])
        else:
            loss = self.loss_fn(out, y)
            total = loss + reg if reg is not None and reg.requires_grad else loss
            total.backward()
            task, reg_v = float(loss.detach()), 0.0 if reg is None else float(reg.detach())
        if me > 0:
            sends.append(self.comm.send_nowait(h.grad, me - 1, tag=GRAD))
        for s in sends:
            s.wait()
        clock.lap("backward")
        return [task, 0.0, reg_v]

    def _init_step(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor, clock: PhaseClock) -> list[float]:
        """First visit of these samples: a serial forward stores the boundary states as λ (every
        coupling term zero); the stage terms are then minimised as in a parallel step."""
        me, last, B = self.rank, self.world_size - 1, x.shape[0]
        h, sends = x, []
        if me > 0:
            h = self.comm.recv(self._layer_info(x).point_shape(self.lo, B), me - 1, x, tag=INIT)
            self._store_aux(index, h)
            h = h.clone().requires_grad_()
        out = self.stage.forward(h)
        clock.lap("forward")
        if me < last:
            sends.append(self.comm.send_nowait(out, me + 1, tag=INIT))
            term = self._stage_penalty(out, self._pool(out.detach()))
        else:
            term = self.loss_fn(out, y)
        reg = self._regularizer()
        reg_v = self._backward([term, reg])
        clock.lap("backward")
        if me > 0:
            self._update_aux(index, h, None)
        for s in sends:
            s.wait()
        clock.lap("aux_update")
        return [float(term.detach()) if me == last else 0.0, 0.0, reg_v]

    def _parallel_step(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor,
                       clock: PhaseClock) -> list[float]:
        """λ fixed: every stage minimises its own term, then λ (and μ) take their step."""
        me, last, B, beta = self.rank, self.world_size - 1, x.shape[0], self.beta
        h, sends, coupling = x, [], None
        if me > 0:
            lam = self.lam.get(index)
            target = self._pool(lam)
            if self.mu is not None:
                target = target - self.mu.get(index) / beta
            sends.append(self.comm.send_nowait(target, me - 1, tag=TGT))
            h = lam.requires_grad_()
        out = self.stage.forward(h)
        clock.lap("forward")
        if me < last:
            pf = self._pool(out.detach())
            sends.append(self.comm.send_nowait(pf, me + 1, tag=FWD))
            term = self._stage_penalty(out, self.comm.recv(tuple(pf.shape), me + 1, pf, tag=TGT))
        else:
            term = self.loss_fn(out, y)
        prev = None
        if me > 0:
            shape = self._coarse(self._layer_info(x).point_shape(self.lo, B))
            prev = self.comm.recv(shape, me - 1, x, tag=FWD)
            coupling = self._coupling(prev, h, index)
        clock.lap("exchange")
        reg = self._regularizer()
        reg_v = self._backward([term, coupling, reg])
        clock.lap("backward")
        if me > 0:
            self._update_aux(index, h, prev)
        for s in sends:
            s.wait()
        clock.lap("aux_update")
        task = float(term.detach()) if me == last else 0.0
        return [task, 0.0 if coupling is None else float(coupling.detach()), reg_v]

    def _stage_penalty(self, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``(β/2)·mean(P out − target)²``: what θ_k minimises."""
        return 0.5 * self.beta * (self._pool(out) - target).pow(2).mean()

    def _coupling(self, prev: torch.Tensor, lam: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """The previous stage's term as a function of this rank's λ: ``mean[(β/2)c² + μ·c]``
        with ``c = P F_{k−1} − P λ_k`` (the value the loss reports)."""
        c = prev - self._pool(lam)
        value = 0.5 * self.beta * c.pow(2).mean()
        if self.mu is not None:
            value = value + (self.mu.get(index) * c).mean()
        return value

    def _store_aux(self, index: torch.Tensor, state: torch.Tensor) -> None:
        """Initial λ of these samples (and μ = 0 in the AL variant)."""
        if self.lam is None:
            self.lam = SampleStore(tuple(state.shape[1:]), state)
            if self.config.variant == "al":
                self.mu = SampleStore(self._coarse(tuple(state.shape[1:])), state)
        self.lam.put(index, state)
        if self.mu is not None:
            self.mu.put(index, torch.zeros((len(index), *self.mu.shape), dtype=state.dtype))

    @torch.no_grad()
    def _update_aux(self, index: torch.Tensor, lam: torch.Tensor, prev: torch.Tensor | None) -> None:
        """``λ ← λ − (aux_step/β)·(B·d)·∇λ``; AL: ``μ ← μ + β(P F − P λ)``
        with the new λ (``prev`` = ``P F_{k−1}``; ``None`` at initialisation, where it is λ)."""
        grad = lam.grad if lam.grad is not None else torch.zeros_like(lam)
        self.aux_grad = grad
        new = lam.detach() - (self.config.aux_step / self.beta) * lam.numel() * grad
        self.lam.put(index, new)
        if self.mu is not None and prev is not None:
            self.mu.put(index, self.mu.get(index) + self.beta * (prev - self._pool(new)))

    def describe(self) -> str:
        return (f"auxvar: {len(self.seq)} layers over {self.world_size} ranks, bounds {self.bounds}, "
                f"{self.config.variant}, {self.config.parallel_epochs} parallel epochs, beta {self.beta:g}")
