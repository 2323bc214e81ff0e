"""Training over agents on a sparse graph: NEXT (convexified local steps + dynamic consensus)
and D-PSGD, behind the engine contract.

Every rank is an *agent*: it holds a full replica ``xᵢ`` of the model and its own shard of
the training data (the trainer gives it one, :mod:`resprune.data.shards`), and talks only to
its neighbours in a :class:`~resprune.parallel.graphs.Graph` (fixed or time-varying), with
point-to-point messages. Together the agents minimise the social cost
``U(x) = (1/N) Σᵢ ℓᵢ(x) + G(x)`` (``ℓᵢ``: the loss on agent ``i``'s data; the papers' ``Σᵢ fᵢ``
with ``fᵢ = ℓᵢ/N``; ``G``: ``reg`` = L2 ``λ/2‖x‖²`` or L1 ``λ‖x‖₁``, applied by its proximal map).

``method="next"`` (Di Lorenzo & Scutari, arXiv 1602.00591; Scardapane & Di Lorenzo, arXiv
1610.07448), per agent and step ``n`` (``W[n]`` the graph's doubly stochastic mixing matrix):

1. ``gᵢ = ∇ℓᵢ(xᵢ)`` on this step's batch; gradient tracking ``yᵢ = ŷᵢ + gᵢ − gᵢ_prev``
   (``yᵢ = gᵢ`` at the first step), where ``ŷᵢ = Σⱼ Wᵢⱼ yⱼ`` of the previous round: ``yᵢ``
   tracks the average gradient ``(1/N) Σⱼ ∇ℓⱼ`` and ``Σᵢ yᵢ = Σᵢ gᵢ`` holds exactly.
2. Local convexified step: ``x̃ᵢ = argmin_x f̃ᵢ(x; xᵢ) + π̃ᵢᵀ(x − xᵢ) + τ/2‖x − xᵢ‖² + G(x)``
   with ``π̃ᵢ = yᵢ − gᵢ/N`` (the papers' ``N·yᵢ − ∇fᵢ``: the other agents' gradients).
   ``inner_steps=1``: ``f̃ᵢ`` is ``ℓᵢ/N`` linearised, closed form
   ``x̃ᵢ = prox_{G/τ}(xᵢ − yᵢ/τ)``. ``inner_steps=k>1``: ``f̃ᵢ`` keeps ``ℓᵢ/N`` itself, block by
   block (each parameter tensor a block, the others held at ``xᵢ``: the papers' parallel
   scheme), solved by ``k`` fixed-point steps ``x_b ← prox(xᵢ_b − (∇_b ℓᵢ/N + π̃ᵢ_b)/τ)``
   (a contraction when ``τ`` exceeds the block's curvature of ``ℓᵢ/N``, by about their ratio
   per step: ``inner_steps`` must cover it, hundreds of steps at a ratio of 0.96); the blocks run on
   ``block_threads`` threads of the agent (each with its own copy of the model).
3. ``zᵢ = xᵢ + α[n](x̃ᵢ − xᵢ)``, ``α[n+1] = α[n](1 − μ·α[n])``.
4. Consensus ``xᵢ ← Σⱼ Wᵢⱼ zⱼ`` and ``ŷᵢ = Σⱼ Wᵢⱼ yⱼ``: ``(zᵢ, yᵢ)`` go out in one message per
   neighbour (two model-sized vectors).

``τ`` is ``tau``, or ``1/lr`` of the optimiser's first group (so a recipe's learning rate and
its schedule drive it; ``α/τ`` is then the step of the centralised equivalent). NEXT uses
the optimiser for nothing else (momentum and weight decay do not apply; use ``reg``).

``method="dpsgd"`` (decentralised SGD): the optimiser's step on the local gradient (momentum,
weight decay as configured), then ``xᵢ ← Σⱼ Wᵢⱼ xⱼ`` (one model-sized message per neighbour);
``reg`` is applied by its proximal map with step ``lr``.

The rest of the contract:

- ``step(x, y)`` is one iteration of the method on this agent's batch; it returns the
  *social* loss, the mean of the agents' batch losses at their own ``xᵢ`` before the step (one
  scalar all-reduce, the only collective of a training step; ``social_loss=False`` returns
  the agent's own loss and communicates with neighbours only). ``forward_backward`` computes
  the same loss and leaves ``∇ℓᵢ(xᵢ)`` in the parameters, without moving them.
- ``eval_forward`` and ``full_state_dict`` use the agents' **average** ``x̄ = (1/N) Σᵢ xᵢ``
  (BatchNorm running statistics averaged too; integer buffers are agent 0's): the point NEXT
  converges to, and the model a checkpoint holds. They are collective (a gather to rank 0).
- ``load_full_state_dict`` gives every agent the same weights and restarts gradient tracking.
- ``stats``: ``sent_bytes`` (this agent, this step), ``comm_wait_s``, ``alpha``, ``tau``,
  ``neighbours``; :meth:`consensus_error` (collective) measures ``(1/N) Σᵢ ‖xᵢ − x̄‖²``.

Example (one agent: NEXT with the linearised surrogate is proximal gradient descent):
    >>> import torch
    >>> from resprune.parallel import create_engine
    >>> eng = create_engine("consensus", torch.nn.Linear(3, 2), torch.nn.functional.cross_entropy,
    ...                     lambda p: torch.optim.SGD(p, lr=0.1), {"graph": "ring", "alpha0": 1.0})
    >>> loss = eng.step(torch.randn(8, 3), torch.randint(0, 2, (8,)))
    >>> eng.stats["tau"]
    10.0
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from ..data.shards import SPLITS
from .comm import Comm
from .engines import Engine, register_engine
from .graphs import GRAPHS, Graph, make_graph
from .stage import default_comm

logger = logging.getLogger(__name__)

__all__ = ["ConsensusConfig", "ConsensusEngine", "squared_error", "prox"]

MIX = 21  # message tag of the neighbour exchange
METHODS, REGS, LOSSES = ("next", "dpsgd"), ("none", "l2", "l1"), (None, "cross_entropy", "squared_error")


@dataclass(frozen=True)
class ConsensusConfig:
    """Settings of the ``consensus`` engine (module docstring for the method).

    Args:
        method: ``"next"`` or ``"dpsgd"``.
        graph: one of :data:`~resprune.parallel.graphs.GRAPHS`.
        graph_p: edge probability of ``erdos_renyi``.
        graph_seed: seed of ``erdos_renyi`` and ``random_matching``.
        torus_shape: ``(rows, cols)`` of ``torus`` (default: the most square factorisation).
        split: how the trainer shards the training set (:data:`resprune.data.shards.SPLITS`).
        tau: weight of the surrogate's proximal term (``None``: ``1/lr`` of the optimiser).
        alpha0, mu: step ``α[0]`` in (0, 1] and its decay ``α[n+1] = α[n](1 − μα[n])``, μ >= 0.
        reg, reg_weight: ``G`` = ``"l2"`` (``λ/2‖x‖²``), ``"l1"`` (``λ‖x‖₁``) or ``"none"``; λ >= 0.
        loss: ``None`` (the loss function the engine is given), ``"cross_entropy"`` or
            ``"squared_error"`` (mean squared error, integer labels one-hot encoded).
        inner_steps: fixed-point steps of the local surrogate (1: linearised, closed form).
        block_threads: threads that solve the surrogate's blocks in parallel (inner_steps > 1).
        social_loss: ``step`` returns the agents' mean loss (one scalar all-reduce) or its own.
        version: config format version.
    """

    method: str = "next"
    graph: str = "ring"
    graph_p: float = 0.5
    graph_seed: int = 0
    torus_shape: tuple[int, int] | None = None
    split: str = "iid"
    tau: float | None = None
    alpha0: float = 1.0
    mu: float = 0.0
    reg: str = "none"
    reg_weight: float = 0.0
    loss: str | None = None
    inner_steps: int = 1
    block_threads: int = 1
    social_loss: bool = True
    version: int = 1

    def __post_init__(self) -> None:
        for key, allowed in (("method", METHODS), ("graph", GRAPHS), ("split", SPLITS), ("reg", REGS),
                             ("loss", LOSSES)):
            if getattr(self, key) not in allowed:
                raise ValueError(f"{key} must be one of {', '.join(map(str, allowed))}; got {getattr(self, key)!r}")
        if not 0 < self.alpha0 <= 1:
            raise ValueError(f"alpha0 must be in (0, 1], got {self.alpha0!r}")
        if self.tau is not None and not self.tau > 0:
            raise ValueError(f"tau must be > 0 (or None: 1/lr), got {self.tau!r}")
        for k in ("mu", "reg_weight"):
            if not getattr(self, k) >= 0:
                raise ValueError(f"{k} must be >= 0, got {getattr(self, k)!r}")
        if not 0 < self.graph_p <= 1:
            raise ValueError(f"graph_p must be in (0, 1], got {self.graph_p!r}")
        for k in ("inner_steps", "block_threads"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{k} must be an int >= 1, got {v!r}")
        if self.torus_shape is not None:
            object.__setattr__(self, "torus_shape", tuple(int(s) for s in self.torus_shape))

    def to_dict(self) -> dict:
        return asdict(self)

    def make_graph(self, world_size: int) -> Graph:
        """This config's graph over ``world_size`` agents (:class:`~resprune.parallel.graphs.GraphError`
        when it cannot be built: a torus shape for another count, a disconnected random graph)."""
        return make_graph(self.graph, world_size, self.graph_p, self.graph_seed, self.torus_shape)

    def check_world_size(self, world_size: int) -> None:
        """Refuse, before any process starts, a graph that cannot be built for ``world_size`` ranks."""
        self.make_graph(world_size)


def squared_error(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean squared error of ``out`` against ``y``; integer class labels are one-hot encoded."""
    if not y.is_floating_point():
        y = F.one_hot(y, out.shape[-1]).to(out.dtype)
    return F.mse_loss(out, y)


def prox(v: torch.Tensor, reg: str, weight: float, step: float) -> torch.Tensor:
    """The proximal map of ``step·G`` at ``v``: L2 shrinks by ``1/(1 + step·λ)``, L1
    soft-thresholds by ``step·λ``; ``"none"`` (or λ = 0) is the identity."""
    if reg == "none" or weight == 0:
        return v
    if reg == "l2":
        return v / (1 + step * weight)
    return torch.sign(v) * (v.abs() - step * weight).clamp_min(0)


def _loss_fn(config: ConsensusConfig, given):
    return {None: given, "cross_entropy": F.cross_entropy, "squared_error": squared_error}[config.loss]


@register_engine("consensus", config=ConsensusConfig)
class ConsensusEngine(Engine):
    """One agent of NEXT or D-PSGD: a full replica, its own data, neighbour messages."""

    name = "consensus"

    def __init__(self, model, loss_fn, optimizer_factory, config: ConsensusConfig | None = None,
                 regularizer=None, comm: Comm | None = None) -> None:
        self.config = config if config is not None else ConsensusConfig()
        super().__init__(model, _loss_fn(self.config, loss_fn), optimizer_factory, regularizer)
        self.comm = comm if comm is not None else default_comm()
        self.rank, self.world_size = self.comm.rank, self.comm.world_size
        c = self.config
        self.graph = c.make_graph(self.world_size)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self._make_optimizer()
        self.iteration, self.alpha = 0, c.alpha0
        self.tracker: torch.Tensor | None = None  # yᵢ of the last step
        self.last_grad: torch.Tensor | None = None  # gᵢ of the last step
        self._mixed_y: torch.Tensor | None = None  # ŷᵢ = Σⱼ Wᵢⱼ yⱼ, for the next step
        self._average: tuple[int, nn.Module] | None = None  # (iteration, averaged model) for eval
        self.sent_bytes_total = 0
        self._pool = ThreadPoolExecutor(c.block_threads) if c.inner_steps > 1 else None
        self._replicas: dict[int, nn.Module] = {}  # per block-solving thread

    def local_named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        yield from ((n, p) for n, p in self.model.named_parameters() if p.requires_grad)

    # ---- local computation -----------------------------------------------------------------
    def _local_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = self.loss_fn(self.model(x), y)
        if self.regularizer is not None:
            loss = loss + self.regularizer(self.model)
        return loss

    def _social(self, loss: float) -> float:
        if not self.config.social_loss:
            return loss
        return self.comm.all_reduce_sum([loss])[0] / self.world_size

    def forward_backward(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """This agent's batch loss gradient into the parameters; returns the social loss."""
        self._zero_grad()
        loss = self._local_loss(x, y)
        loss.backward()
        return self._social(float(loss.detach()))

    def _grad_vector(self) -> torch.Tensor:
        return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                          for p in self.params])

    def tau(self) -> float:
        """``tau``, or ``1/lr`` of the optimiser's first parameter group."""
        return self.config.tau if self.config.tau is not None else 1.0 / self.optimizer.param_groups[0]["lr"]

    # ---- neighbour exchange ----------------------------------------------------------------
    def _mix(self, v: torch.Tensor) -> torch.Tensor:
        """``Σⱼ W[n]ᵢⱼ vⱼ``: ``v`` sent to this round's out-neighbours, theirs received."""
        w, me = self.graph.weights(self.iteration), self.rank
        handles = [self.comm.send_nowait(v, j, MIX) for j in self.graph.out_neighbours(me, self.iteration)]
        out = v * float(w[me, me])
        for j in self.graph.in_neighbours(me, self.iteration):
            out += float(w[me, j]) * self.comm.recv(tuple(v.shape), j, v, MIX)
        for h in handles:
            h.wait()
        self.comm.wait()
        return out

    # ---- one iteration ---------------------------------------------------------------------
    def step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        self.comm.reset_counters()
        t0 = time.perf_counter()
        self._zero_grad()
        loss = self._local_loss(x, y)
        loss.backward()
        local = float(loss.detach())
        if self.config.method == "next":
            self._next_step(x, y)
        else:
            self._dpsgd_step()
        self._average = None
        self.iteration += 1
        self.sent_bytes_total += self.comm.sent_bytes
        self.stats = {"sent_bytes": self.comm.sent_bytes, "comm_wait_s": self.comm.wait_s, "alpha": self.alpha,
                      "tau": self.tau(), "local_loss": local,
                      "neighbours": len(self.graph.in_neighbours(self.rank, self.iteration - 1)),
                      "times_s": {"total": time.perf_counter() - t0}}
        if self.config.method == "next":
            self.alpha *= 1 - self.config.mu * self.alpha
        return self._social(local)

    @torch.no_grad()
    def _next_step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        c, tau = self.config, self.tau()
        g = self._grad_vector()
        track = g.clone() if self._mixed_y is None else self._mixed_y + g - self.last_grad
        self.tracker, self.last_grad = track, g
        xi = parameters_to_vector(self.params).detach()
        xt = prox(xi - track / tau, c.reg, c.reg_weight, 1.0 / tau)
        if c.inner_steps > 1:
            xt = self._solve_blocks(x, y, xi, track - g / self.world_size, xt, tau)
        z = xi + self.alpha * (xt - xi)
        mixed = self._mix(torch.cat([z, track]))
        vector_to_parameters(mixed[:len(z)], self.params)
        self._mixed_y = mixed[len(z):]

    @torch.no_grad()
    def _dpsgd_step(self) -> None:
        c = self.config
        self.optimizer.step()
        if c.reg != "none":
            lr = self.optimizer.param_groups[0]["lr"]
            for p in self.params:
                p.copy_(prox(p, c.reg, c.reg_weight, lr))
        vector_to_parameters(self._mix(parameters_to_vector(self.params).detach()), self.params)

    def _solve_blocks(self, x, y, xi, pi, start, tau) -> torch.Tensor:
        """The block-wise surrogate (each parameter tensor a block, the others at ``xᵢ``),
        ``inner_steps − 1`` more fixed-point steps from ``start`` (the first step is the
        linearised one), the blocks on ``block_threads`` threads."""
        c, n = self.config, self.world_size
        names = [k for k, p in self.model.named_parameters() if p.requires_grad]
        sizes = [p.numel() for p in self.params]
        xs, pis, st = xi.split(sizes), pi.split(sizes), start.split(sizes)
        fixed = {k: v.reshape(p.shape) for k, v, p in zip(names, xs, self.params)}
        buffers = {k: b.clone() for k, b in self.model.named_buffers()}  # inner passes leave BN statistics alone

        def solve(b: int) -> torch.Tensor:
            model = self._replica()
            xb = st[b].reshape(self.params[b].shape).clone()
            for _ in range(c.inner_steps - 1):
                leaf = xb.detach().requires_grad_(True)
                state = {**fixed, names[b]: leaf, **{k: v.clone() for k, v in buffers.items()}}
                with torch.enable_grad():
                    out = torch.func.functional_call(model, state, (x,))
                    loss = self.loss_fn(out, y)
                    (grad,) = torch.autograd.grad(loss, leaf)
                v = xs[b] - (grad.reshape(-1) / n + pis[b]) / tau
                xb = prox(v, c.reg, c.reg_weight, 1.0 / tau).reshape(xb.shape)
            return xb.reshape(-1)

        return torch.cat(list(self._pool.map(solve, range(len(sizes)))))

    def _replica(self) -> nn.Module:
        """This thread's copy of the model for the block solves (``functional_call`` swaps a
        module's tensors while it runs, so threads must not share one; its own weights are
        never used: every tensor is passed in)."""
        key = threading.get_ident()
        if key not in self._replicas:
            self._replicas[key] = copy.deepcopy(self.model)
        self._replicas[key].train(self.model.training)
        return self._replicas[key]

    # ---- the agents' average: evaluation and checkpoints -----------------------------------
    def _float_state(self) -> "OrderedDict[str, torch.Tensor]":
        return OrderedDict((k, v.detach().cpu()) for k, v in self.model.state_dict().items()
                           if v.is_floating_point())

    def _averaged_state(self) -> "OrderedDict[str, torch.Tensor] | None":
        """Collective: ``(1/N) Σᵢ`` of every agent's floating-point state on rank 0, else ``None``."""
        parts = self.comm.gather_object(self._float_state())
        if parts is None:
            return None
        sd = OrderedDict((k, v.detach().cpu().clone()) for k, v in self.model.state_dict().items())
        for k in parts[0]:
            sd[k] = torch.stack([p[k].to(torch.float64) for p in parts]).mean(0).to(sd[k].dtype)
        return sd

    def full_state_dict(self) -> "OrderedDict[str, torch.Tensor] | None":
        """The agents' average model on rank 0 (collective), ``None`` elsewhere."""
        return self._averaged_state()

    def load_full_state_dict(self, sd) -> None:
        """Every agent gets rank 0's ``sd``; gradient tracking restarts at the next step."""
        sd = self.comm.broadcast_object(sd if self.rank == 0 else None, 0)
        self.model.load_state_dict(sd)
        self._mixed_y = self.tracker = self.last_grad = None
        self._average = None

    def averaged_model(self) -> nn.Module:
        """A copy of the model holding the agents' average, on every rank (collective; cached
        until the next step)."""
        if self._average is None or self._average[0] != self.iteration:
            sd = self.comm.broadcast_object(self._averaged_state(), 0)
            avg = copy.deepcopy(self.model)
            avg.load_state_dict(sd)
            self._average = (self.iteration, avg)
        return self._average[1]

    @torch.no_grad()
    def _exact_forward(self, x: torch.Tensor) -> torch.Tensor:
        avg = self.averaged_model()
        avg.train(self.model.training)
        return avg(x)

    @torch.no_grad()
    def consensus_error(self) -> float:
        """Collective: ``(1/N) Σᵢ ‖xᵢ − x̄‖²`` over the trainable parameters, on every rank."""
        mine = parameters_to_vector(self.params).detach().cpu().to(torch.float64)
        parts = self.comm.gather_object(mine)
        err = None
        if parts is not None:
            stack = torch.stack(parts)
            err = float(((stack - stack.mean(0)) ** 2).sum(1).mean())
        return float(self.comm.broadcast_object(err, 0))

    def loop_state(self) -> dict:
        return {"iteration": self.iteration, "alpha": self.alpha}

    def load_loop_state(self, state: dict) -> None:
        self.iteration = int(state.get("iteration", self.iteration))
        self.alpha = float(state.get("alpha", self.alpha))

