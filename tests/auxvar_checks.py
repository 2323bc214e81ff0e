"""Checks of the auxvar engine that run on any communicator: simulated ranks (threads, in
tests/test_parallel_auxvar.py) and gloo processes (tests/dist_worker_auxvar.py).

Each check runs collectively on every rank and returns ``(ok, detail)`` for this rank; the
callers require every rank's ``ok``. A float64 ResConv chain (8×8 states, so ``downsample=2``
applies) on a random batch; tolerances are stated per check.
"""

from __future__ import annotations

import copy
import threading

import torch
import torch.nn.functional as F

import resprune as rp
from resprune.parallel import AuxVarConfig
from resprune.parallel.auxvar import AuxVarEngine
from resprune.parallel.engines import SerialEngine

B = 16
IN = (1, 3, 8, 8)


_LOCK = threading.Lock()
_BASE: dict = {}


def chain(dtype=torch.float64):
    """The same initial model on every rank (built once per process: simulated ranks are
    threads sharing torch's global generator)."""
    with _LOCK:
        if dtype not in _BASE:
            torch.manual_seed(0)
            _BASE[dtype] = rp.create_model("resconv_chain", num_classes=4, depth=8, width=8, horizon=1.0).to(dtype)
        return copy.deepcopy(_BASE[dtype])


def batch(seed: int = 1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 3, 8, 8, generator=g, dtype=dtype), torch.randint(0, 4, (B,), generator=g)


def make(comm, base, lr: float = 0.05, momentum: float = 0.0, **cfg) -> AuxVarEngine:
    return AuxVarEngine(copy.deepcopy(base), F.cross_entropy,
                        lambda p: torch.optim.SGD(p, lr=lr, momentum=momentum),
                        AuxVarConfig(input_size=IN, **cfg), comm=comm)


def _max_rel(pairs) -> float:
    return max(float((a - b).abs().max() / b.abs().max().clamp_min(1e-30)) for a, b in pairs)


def init_matches_serial(comm, downsample: int = 1) -> tuple[bool, str]:
    """First visit of a batch (λ from the serial forward, every coupling term zero): the last
    stage's parameter gradients are serial backprop's and so is the gradient of λ_{K−1};
    every other stage's gradients are exactly zero. Tolerance: relative 1e-12 (float64)."""
    base, (x, y) = chain(), batch()
    eng = make(comm, base, downsample=downsample)
    eng.forward_backward(x, y, torch.arange(B))
    ref, start = copy.deepcopy(base), eng.bounds[-2]
    h, act = x, None
    for n, (_, m) in enumerate(ref.layer_sequence()):
        if n == start:
            act = h = h.detach().requires_grad_()
        h = m(h)
    F.cross_entropy(h, y).backward()
    refp = dict(ref.named_parameters())
    mine = list(eng.local_named_parameters())
    if eng.rank < eng.world_size - 1:
        nonzero = [n for n, p in mine if p.grad is not None and bool(p.grad.ne(0).any())]
        return not nonzero and float(eng.stats["penalty"]) == 0.0, f"non-zero gradients {nonzero[:3]}"
    err = _max_rel((p.grad, refp[n].grad) for n, p in mine)
    aux = _max_rel([(eng.aux_grad, act.grad)])
    return err < 1e-12 and aux < 1e-12, f"last stage grads rel {err:.1e}, dλ rel {aux:.1e}"


def perturbed(comm, base, x, y, scale: float = 0.3, **cfg) -> AuxVarEngine:
    """An engine after the first visit of the batch, with λ moved off the forward states."""
    eng = make(comm, base, **cfg)
    eng.step(x, y, torch.arange(B))
    if eng.lam is not None:
        g = torch.Generator().manual_seed(10 + eng.rank)
        eng.lam.data += scale * torch.randn(eng.lam.data.shape, generator=g, dtype=eng.lam.data.dtype)
    return eng


def penalty_decreases(comm, variant: str = "penalty", downsample: int = 1, steps: int = 10) -> tuple[bool, str]:
    """λ perturbed, then ``steps`` steps on the same batch (β = 10, SGD lr 0.05): the coupling
    penalty (summed over boundaries, the same on every rank) falls below a third of its first
    value."""
    base, (x, y) = chain(), batch()
    eng = perturbed(comm, base, x, y, variant=variant, downsample=downsample, beta=10.0)
    idx, pen, losses = torch.arange(B), [], []
    for _ in range(steps):
        losses.append(eng.step(x, y, idx))
        pen.append(eng.stats["penalty"])
    same = comm.all_reduce_sum([losses[-1]])[0] == comm.world_size * losses[-1]
    return pen[0] > 0 and pen[-1] < pen[0] / 3 and same, f"penalty {pen[0]:.3g} -> {pen[-1]:.3g}, same loss {same}"


def al_updates(comm, downsample: int = 2) -> tuple[bool, str]:
    """AL variant after one parallel step (μ ≠ 0): (a) stage k−1's parameter gradient is that of
    mean[(β/2)(P F − P λ_k)² + μ_k·(P F − P λ_k)] with λ_k, μ_k before the step; (b) the
    multiplier update is μ_k ← μ_k + β (P F_{k−1} − P λ_k) with the new λ_k. Relative 1e-12."""
    base, (x, y) = chain(), batch()
    eng = perturbed(comm, base, x, y, variant="al", downsample=downsample, beta=2.0)
    idx, me, last = torch.arange(B), eng.rank, eng.world_size - 1
    eng.step(x, y, idx)  # μ becomes non-zero
    mine = (eng.lam.get(idx), eng.mu.get(idx)) if me > 0 else None
    states = comm.broadcast_object(comm.gather_object(mine), 0)
    h = x if me == 0 else states[me][0]
    beta, ok, detail = eng.beta, True, ""
    params = [p for _, p in eng.local_named_parameters()]
    pf = None
    if me < last:
        with torch.no_grad():
            pf = eng._pool(eng.stage.forward(h))  # train-mode BN: the batch statistics, as in the step
        lam_next, mu_next = states[me + 1]
        c = eng._pool(eng.stage.forward(h)) - eng._pool(lam_next)
        ref = torch.autograd.grad(0.5 * beta * c.pow(2).mean() + (mu_next * c).mean(), params)
    eng.forward_backward(x, y, idx)
    outs = comm.broadcast_object(comm.gather_object(pf), 0)
    if me < last:
        err = _max_rel((p.grad, r) for p, r in zip(params, ref))
        ok, detail = err < 1e-12, f"AL stage gradient rel {err:.1e}"
    if me > 0:
        want = mine[1] + beta * (outs[me - 1] - eng._pool(eng.lam.get(idx)))
        err = _max_rel([(eng.mu.get(idx), want)])
        ok, detail = ok and err < 1e-12 and bool(mine[1].ne(0).any()), detail + f"; μ update rel {err:.1e}"
    return ok, detail


def correction_is_serial(comm, steps: int = 4) -> tuple[bool, str]:
    """Serial correction epochs (``parallel_epochs=0``): losses and every weight and BN buffer
    after ``steps`` momentum-SGD steps are bitwise those of the serial engine (float32)."""
    base = chain(torch.float32)
    eng = make(comm, base, lr=0.1, momentum=0.9, parallel_epochs=0)
    ser = SerialEngine(copy.deepcopy(base), F.cross_entropy, lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9))
    assert not eng.indexed_epoch(1)
    same_loss = True
    for s in range(steps):
        x, y = batch(s, torch.float32)
        same_loss &= eng.step(x, y) == ser.step(x, y)
    sd, ref = eng.full_state_dict(), ser.full_state_dict()
    if sd is None:
        return same_loss, "losses bitwise equal"
    diff = [k for k in ref if not torch.equal(sd[k], ref[k])]
    return same_loss and not diff and list(sd) == list(ref), f"losses equal {same_loss}, differing {diff[:3]}"


CHECKS = {
    "init_matches_serial": init_matches_serial,
    "init_matches_serial_downsampled": lambda comm: init_matches_serial(comm, 2),
    "penalty_decreases": penalty_decreases,
    "penalty_decreases_al_downsampled": lambda comm: penalty_decreases(comm, "al", 2),
    "al_updates": al_updates,
    "correction_is_serial": correction_is_serial,
}
