"""Local parallelism (Laskin et al. 2020, "Parallel training of deep networks with local updates").

The net (``layer_sequence()``) is cut into ``K`` contiguous chunks, one per rank (balanced
by counted cost). Every chunk but the last gets a small auxiliary head (global average
pooling and a linear layer, or a hidden layer first: ``aux_hidden``) and trains on its own
loss; the last chunk's head is the model's own head. Gradients never cross a chunk boundary,
so ranks run asynchronously: a rank receives its chunk's input from the rank before,
sends its output on (at most ``queue`` sends outstanding: a bounded queue), then computes
its local loss, backpropagates it through its chunk only and steps. Nothing flows backward
but a scalar loss (and, in the overlapping variant, the overlap gradients).

- **Greedy** (``variant="greedy"``): chunk ``k`` trains on chunk ``k−1``'s detached output.
- **Overlapping** (``variant="overlap"``): chunk ``k``'s loss also trains the last
  ``overlap`` layers of chunk ``k−1``. Rank ``k−1`` sends the input of those layers and
  their current parameters; rank ``k`` runs them (a replica) before its own chunk, and sends
  their gradient back; the owner adds it to its own gradient ``queue`` steps later (the
  same staleness the activations have).
- **Reported loss.** Every rank returns the same number at the same step: the model's loss
  (the last chunk's task loss plus every chunk's regularizer) of ``delay = (K−1)·queue``
  steps before (step 0's until then), so no rank waits for the last one in steady state.
  ``stats["local_loss"]`` is this rank's own loss of this step.
- **Export.** ``full_state_dict()`` is the model without the auxiliary heads (pruning,
  fusion and export work on it as usual); the heads travel in ``loop_state()`` (checkpoints)
  and are trained by the engine's optimizer (``local_named_parameters()`` lists them under
  ``aux.<k>.…``). Collective calls (evaluation, gathers) first drain every queue.
- ``K = 1`` is serial training (one chunk, the model's head, no messages).

Regularizers see only the rank's own layers: a smoothness penalty's pairs across chunk
boundaries are dropped (exchanging them would couple the ranks every step).

Example (one process: serial, so the reported loss is this step's own, no delay):
    >>> import torch, resprune as rp
    >>> from resprune.parallel import create_engine, LocalConfig
    >>> cfg = LocalConfig(variant="overlap", queue=2)
    >>> eng = create_engine("local", rp.create_model("resnet20"), torch.nn.functional.cross_entropy,
    ...                     lambda p: torch.optim.SGD(p, lr=0.1), cfg)
    >>> loss = eng.step(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3]))
    >>> eng.delay, loss == eng.stats["local_loss"]
    (0, True)
"""

from __future__ import annotations

import copy
import logging
import time
from collections import deque
from dataclasses import dataclass

import torch
from torch import nn

from .comm import Comm
from .engines import register_engine
from .stage import PhaseClock, StageConfig, StagedEngine, tensor_bytes

logger = logging.getLogger(__name__)

__all__ = ["LocalConfig", "LocalEngine", "AuxHead"]

ACT, LOSS, GRAD = 11, 12, 13  # message tags: activations forward, losses and overlap gradients back


@dataclass(frozen=True)
class LocalConfig(StageConfig):
    """Settings of the ``local`` engine.

    Args:
        variant: ``"greedy"`` (chunk k trains on chunk k−1's detached output) or
            ``"overlap"`` (chunk k's loss also trains the last ``overlap`` layers of chunk k−1).
        overlap: layers of the previous chunk the overlapping variant trains, >= 1.
        queue: the most activations a rank has in flight to the next one (bounded queue of
            non-blocking sends), >= 1; also the delay of the overlap gradients.
        aux_hidden: auxiliary heads: 0 = pooling + linear; > 0 = pooling + linear to
            ``aux_hidden`` + ReLU + linear.
        aux_seed: seed of the auxiliary heads' initialisation (head k uses ``aux_seed + k``).
        input_size: sample input shape the partition is balanced for (default: the model's
            input channels at 32×32).
        version: config format version.

    Example:
        >>> LocalConfig(variant="overlap", queue=4).overlap
        1
    """

    variant: str = "greedy"
    overlap: int = 1
    queue: int = 2
    aux_hidden: int = 0
    aux_seed: int = 0
    input_size: tuple[int, ...] | None = None
    version: int = 1

    def __post_init__(self) -> None:
        if self.variant not in ("greedy", "overlap"):
            raise ValueError(f"variant must be 'greedy' or 'overlap', got {self.variant!r}")
        for k, low in (("overlap", 1), ("queue", 1), ("aux_hidden", 0)):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"{k} must be an int >= {low}, got {v!r}")
        self._check_input_size()


class AuxHead(nn.Module):
    """Auxiliary classifier on a chunk's output: global average pooling (for feature maps)
    then a linear layer (``hidden > 0``: linear, ReLU, linear)."""

    def __init__(self, in_shape: tuple[int, ...], num_classes: int, hidden: int = 0) -> None:
        super().__init__()
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()) if len(in_shape) == 3 else nn.Flatten()
        c = in_shape[0] if len(in_shape) == 3 else int(torch.Size(in_shape).numel())
        layers: list[nn.Module] = [nn.Linear(c, hidden), nn.ReLU(), nn.Linear(hidden, num_classes)] if hidden \
            else [nn.Linear(c, num_classes)]
        self.fc = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(x))


def _flat(params) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in params])


@register_engine("local", config=LocalConfig)
class LocalEngine(StagedEngine):
    """Local parallelism: a chunk per rank, each with its own loss, ranks asynchronous."""

    name = "local"

    def __init__(self, model, loss_fn, optimizer_factory, config: LocalConfig | None = None,
                 regularizer=None, comm: Comm | None = None) -> None:
        self._t = 0  # steps done
        self._losses: dict[int, float] = {}  # model loss by step (what step() returns, delayed)
        self._sends: deque = deque()  # outstanding activation sends, per step (at most config.queue)
        self._back_sends: deque = deque()  # outstanding loss / overlap-gradient sends
        self._grads_in: dict[int, torch.Tensor] = {}  # overlap gradients received, by step
        self._grads_next = 0  # step of the next overlap gradient to receive
        self._grads_from = 0  # the first step whose overlap gradient exists (a resume skips the rest)
        self._gathered_aux: dict[str, torch.Tensor] = {}
        super().__init__(model, loss_fn, optimizer_factory, config, regularizer, comm)

    # ---- chunks and heads ------------------------------------------------------------------
    @property
    def delay(self) -> int:
        """Steps between a step and the model loss it returns: ``(K − 1)·queue``."""
        return (self.world_size - 1) * self.config.queue

    @property
    def overlap(self) -> int:
        """Layers of the previous chunk this rank's loss trains (0: greedy or first chunk)."""
        if self.config.variant != "overlap":
            return 0
        return min(self.config.overlap, self.bounds[self.rank] - self.bounds[self.rank - 1]) if self.rank else 0

    def _overlap_out(self) -> int:
        """Layers at the end of this chunk the next rank's loss also trains."""
        if self.config.variant != "overlap" or self.rank == self.world_size - 1:
            return 0
        return min(self.config.overlap, self.hi - self.lo)

    def _on_partition(self) -> None:
        """Auxiliary head of this chunk (kept when its input shape is unchanged) and the
        replica of the previous chunk's overlap layers."""
        old = getattr(self, "aux", None)
        self.aux = None
        if self.rank < self.world_size - 1:
            shape = self.info.out_shapes[self.hi - 1]
            classes = self.info.out_shapes[-1][0]
            if old is not None and old.shape == (shape, classes):
                self.aux = old
            else:
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(self.config.aux_seed + self.rank)
                    head = AuxHead(shape, classes, self.config.aux_hidden)
                p = next(self.part.parameters(), None)
                self.aux = head.to(device=self.stage.device, dtype=p.dtype if p is not None else None)
                self.aux.shape = (shape, classes)
        o = self.overlap
        self.replica = nn.ModuleList(copy.deepcopy([m for _, m in self.seq[self.lo - o:self.lo]])) if o else None

    def _extra_modules(self) -> list[tuple[str, nn.Module]]:
        return [(f"aux.{self.rank}", self.aux)] if self.aux is not None else []

    def _ensure_released(self) -> None:
        """As the base; the head and the replica follow the stage (the training loop may
        have moved the model after the engine was built; the optimizer keeps its tensors)."""
        super()._ensure_released()
        for m in (self.aux, self.replica):
            if m is not None:
                m.to(self.stage.device)

    # ---- one step ----------------------------------------------------------------------------
    def forward_backward(self, x: torch.Tensor, y: torch.Tensor) -> float:
        self._ensure_released()
        self._zero_grad()
        self.comm.reset_counters()
        clock = PhaseClock()
        t, me, last = self._t, self.rank, self.world_size - 1
        reg = self.regularizer(self.part) if self.regularizer is not None else None
        h, cum = self._receive_input(x, 0.0 if reg is None else float(reg.detach()))
        clock.lap("recv")
        out, mid = self._forward_chunk(h)
        clock.lap("forward")
        if me < last:
            self._send_output(mid, cum)
        logits = self.aux(out) if me < last else out
        task = self.loss_fn(logits, y)
        loss = task + reg if reg is not None and reg.requires_grad else task
        loss.backward()
        self._send_overlap_grads()
        self._add_overlap_grads(t)
        clock.lap("backward")
        if me == last:
            self._publish_loss(t, float(task.detach()) + cum)
        value = self._model_loss(max(0, t - self.delay))
        clock.lap("loss_wait")
        self._t += 1
        self.stats = self._step_stats(clock, local_loss=float(loss.detach()), step=t,
                                      loss_step=max(0, t - self.delay))
        return value

    def _receive_input(self, x: torch.Tensor, reg: float) -> tuple[torch.Tensor, float]:
        """This chunk's input (``x`` on rank 0; the previous rank's message otherwise, run
        through the overlap replica with the parameters it sent) and the sum of the
        regularizers of the chunks up to this one."""
        if self.rank == 0:
            return x, reg
        o, B = self.overlap, x.shape[0]
        h = self.comm.recv(self._layer_info(x).point_shape(self.lo - o, B), self.rank - 1, x, tag=ACT)
        cum = self.comm.recv((1,), self.rank - 1, torch.zeros(1, dtype=torch.float64), tag=ACT)
        if o:
            like = _flat(self.replica.parameters())
            flat = self.comm.recv(tuple(like.shape), self.rank - 1, like, tag=ACT)
            with torch.no_grad():
                i = 0
                for p in self.replica.parameters():
                    p.copy_(flat[i:i + p.numel()].view_as(p))
                    p.grad = None
                    i += p.numel()
            for m in self.replica:
                h = m(h)
        return h, float(cum) + reg

    def _forward_chunk(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The chunk's output and what the next rank receives: the output, or (overlapping
        variant) the state entering this chunk's last ``overlap`` layers."""
        send_at = self.hi - self._overlap_out()
        mid, ltime = h, {}
        for n in range(self.lo, self.hi):
            if n == send_at:
                mid = h
            t0 = time.perf_counter()
            h = self.seq[n][1](h)
            ltime[n] = time.perf_counter() - t0
        self._record_layer_time(ltime)  # forward seconds per layer (re-partition after pruning)
        return h, (h if send_at == self.hi else mid)

    def _send_output(self, msg: torch.Tensor, cum: float) -> None:
        """Send the next chunk its input (and, overlapping, the overlap layers' parameters);
        at most ``queue`` steps' sends stay outstanding."""
        msgs = [msg, torch.tensor([cum], dtype=torch.float64)]
        o = self._overlap_out()
        if o:
            msgs.append(_flat(p for _, m in self.seq[self.hi - o:self.hi] for p in m.parameters()))
        self._sends.append([self.comm.send_nowait(m, self.rank + 1, tag=ACT) for m in msgs])
        while len(self._sends) > self.config.queue:
            for handle in self._sends.popleft():
                handle.wait()

    def _send_overlap_grads(self) -> None:
        if self.overlap:
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.replica.parameters()]
            self._back_sends.append(self.comm.send_nowait(_flat(grads), self.rank - 1, tag=GRAD))

    def _overlap_params(self) -> list[nn.Parameter]:
        o = self._overlap_out()
        return [p for _, m in self.seq[self.hi - o:self.hi] for p in m.parameters()] if o else []

    def _recv_overlap_grad(self) -> None:
        """Receive the next overlap gradient in step order (kept until it is due)."""
        like = _flat(self._overlap_params())
        self._grads_in[self._grads_next] = self.comm.recv(tuple(like.shape), self.rank + 1, like, tag=GRAD)
        self._grads_next += 1

    def _add_overlap_grads(self, t: int) -> None:
        """Add the next rank's gradient of this chunk's last layers from ``queue`` steps ago."""
        s = t - self.config.queue
        if not self._overlap_out() or s < self._grads_from:
            return
        while s not in self._grads_in:
            self._recv_overlap_grad()
        g, i = self._grads_in.pop(s), 0
        for p in self._overlap_params():
            part = g[i:i + p.numel()].view_as(p)
            p.grad = part.clone() if p.grad is None else p.grad + part
            i += p.numel()

    def _publish_loss(self, t: int, value: float) -> None:
        """Last rank: keep the model loss of step ``t`` and send it to every other rank."""
        self._losses[t] = value
        msg = torch.tensor([value], dtype=torch.float64)
        for r in range(self.world_size - 1):
            self._back_sends.append(self.comm.send_nowait(msg, r, tag=LOSS))
        while len(self._back_sends) > 4 * (self.delay + self.config.queue + 1) * self.world_size:
            self._back_sends.popleft().wait()

    def _model_loss(self, s: int) -> float:
        """The model loss of step ``s`` (received from the last rank in step order)."""
        while s not in self._losses:
            nxt = max(self._losses, default=-1) + 1
            v = self.comm.recv((1,), self.world_size - 1, torch.zeros(1, dtype=torch.float64), tag=LOSS)
            self._losses[nxt] = float(v)
        for k in [k for k in self._losses if k < s - self.delay]:
            del self._losses[k]
        return self._losses[s]

    # ---- collective calls: drain the queues first ------------------------------------------
    def _drain(self) -> None:
        """Complete every message of the steps done so far: after it nothing is in flight
        (collectives, checkpoints and a new engine on the same ranks start clean)."""
        for handles in self._sends:
            for h in handles:
                h.wait()
        self._sends.clear()
        if self._t > 0 and self.rank < self.world_size - 1:
            self._model_loss(self._t - 1)
        if self._overlap_out():
            while self._grads_next < self._t:
                self._recv_overlap_grad()
        for h in self._back_sends:
            h.wait()
        self._back_sends.clear()

    def train(self, mode: bool = True) -> "LocalEngine":
        super().train(mode)
        for m in (self.aux, self.replica):
            if m is not None:
                m.train(mode)
        return self

    def _exact_forward(self, x: torch.Tensor) -> torch.Tensor:
        self._drain()
        return super()._exact_forward(x)

    def full_state_dict(self):
        """The model without the auxiliary heads on rank 0 (collective); the heads are
        gathered too and kept for :meth:`loop_state`."""
        self._drain()
        aux = ({f"aux.{self.rank}.{k}": v.detach().cpu().clone() for k, v in self.aux.state_dict().items()}
               if self.aux is not None else {})
        parts = self.comm.gather_object((self.stage.state_dict(), aux))
        if parts is None:
            return None
        merged: dict[str, torch.Tensor] = {}
        self._gathered_aux = {}
        for sd, heads in parts:
            merged.update(sd)
            self._gathered_aux.update(heads)
        return self._ordered(self.model, merged)

    def full_optimizer_state(self) -> dict | None:
        self._drain()
        return super().full_optimizer_state()

    def load_full_state_dict(self, sd) -> None:
        self._drain()
        super().load_full_state_dict(sd)

    def sync_model(self) -> None:
        self._drain()
        super().sync_model()

    def memory_bytes(self) -> dict[str, int]:
        """As the base, plus the replica of the previous chunk's overlap layers."""
        mem = super().memory_bytes()
        if self.replica is not None:
            extra = tensor_bytes(self.replica.parameters()) + tensor_bytes(self.replica.buffers())
            mem["params"] += extra
            mem["total"] += extra
        return mem

    def loop_state(self) -> dict:
        """Step count, the model losses the next steps return, and the auxiliary heads
        (gathered by the last :meth:`full_state_dict`)."""
        return {"step": self._t, "losses": dict(self._losses), "aux_heads": dict(self._gathered_aux)}

    def load_loop_state(self, state: dict) -> None:
        if "step" in state:
            self._t = int(state["step"])
            self._losses = {int(k): float(v) for k, v in state.get("losses", {}).items()}
            self._grads_next = self._grads_from = self._t  # gradients in flight at the checkpoint are lost
        pre = f"aux.{self.rank}."
        heads = {k[len(pre):]: v for k, v in (state.get("aux_heads") or {}).items() if k.startswith(pre)}
        if heads and self.aux is not None:
            self.aux.load_state_dict(heads)

    def describe(self) -> str:
        return (f"local ({self.config.variant}): {self.world_size} chunks, bounds {self.bounds}, queue "
                f"{self.config.queue}, returns the model loss of {self.delay} steps before")
