"""Converged-equivalence checks of the mgrit engine's ODE-regime options against the serial
engine (float64), shared by tests/dist_worker_ode.py (torchrun, 2 and 4 processes) and
tests/test_parallel_ode.py (simulated ranks as threads).

``run_checks(comm, check)`` builds the same models on every rank (same seeds) and calls
``check(name, ok, detail)`` once per check, identically on every rank:

1. gated chain (``h·tanh(g/h)``) with L1 + smoothness (``γ·Σ‖θₙ₊₁ − θₙ‖²``, pairs across rank
   boundaries included), converged, 2 SGD steps: loss and every gradient equal serial's;
2. 3 levels, F on the fine level and FCF on the coarse ones: equal serial;
3. class-mean warm start over 3 steps on different batches: equal serial at every step;
4. adaptive mode with a tolerance below rounding and caps = coarse intervals: equal serial;
5. iteration counts are cycles: ``fwd_iters=k`` runs k cycles after the start;
6. pruning-aware re-partition: after 2 steps, zero some gates, ``engine.prune_`` (gather,
   remove, re-balance by measured time): bounds change, every surviving parameter's
   momentum kept, the next step equals serial's on the same pruned model, and the loads'
   imbalance does not grow.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

import resprune as rp
from resprune.parallel import MGRITConfig, create_engine
from resprune.prune import PruneConfig, prune_
from resprune.sparsity import LayerSmoothness, RegularizerSum

TOL = 1e-5
IN = (1, 3, 8, 8)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def sgd(p):
    return torch.optim.SGD(p, lr=0.05, momentum=0.9)


def gated_chain(depth: int = 12, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    m = rp.create_model("resconv_chain", num_classes=4, depth=depth, width=4, horizon=2.0, gate="tanh").double()
    with torch.no_grad():
        for b in m.blocks:
            b.scale.uniform_(0.5 * b.step, 1.5 * b.step)  # gates differ from layer to layer
    return m


def batches(n: int, seed: int = 1, b: int = 8):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(b, 3, 8, 8, generator=g, dtype=torch.float64), torch.arange(b) % 4) for _ in range(n)]


def compare(comm, base, cfg, data, reg=None):
    """Step serial and mgrit side by side; worst relative loss/gradient error over ranks."""
    ser = create_engine("serial", copy.deepcopy(base), F.cross_entropy, sgd, regularizer=reg)
    eng = create_engine("mgrit", copy.deepcopy(base), F.cross_entropy, sgd, cfg, regularizer=reg, comm=comm)
    worst = 0.0
    for x, y in data:
        ls, lm = ser.forward_backward(x, y), eng.forward_backward(x, y)
        sg = dict(ser.local_named_parameters())
        g = max(rel(p.grad, sg[n].grad) for n, p in eng.local_named_parameters())
        worst = max(worst, g, abs(lm - ls) / abs(ls))
        ser.optimizer.step()
        eng.optimizer.step()
    worst = comm.all_reduce_sum([worst])[0]  # a bound on the max over ranks
    return worst, ser, eng


def run_checks(comm, check, base=None, data=None) -> None:
    """``base``/``data`` default to :func:`gated_chain` / :func:`batches`; simulated ranks
    (threads) must build them beforehand (the global RNG is shared between threads)."""
    P = comm.world_size
    base = gated_chain() if base is None else base
    data = batches(3) if data is None else data
    reg = RegularizerSum(rp.LayerScaleL1(1e-3), LayerSmoothness(0.05))
    conv = dict(mode="converged", cf=2, fwd_iters=60, bwd_iters=60, tol=1e-13, input_size=IN)

    # 1. gate + L1 + smoothness
    err, _, eng = compare(comm, base, MGRITConfig(**conv), data[:2], reg)
    check("gate+L1+smoothness converged", err <= TOL * P, f"worst relative error {err:.2e}")

    # 2. three levels, F fine / FCF coarse
    err, _, eng = compare(comm, base, MGRITConfig(**{**conv, "levels": 3, "relax": "F,FCF"}), data[:1], reg)
    check("3 levels F,FCF converged", err <= TOL * P and len(eng.fwd_levels) == 3,
          f"worst relative error {err:.2e}, {len(eng.fwd_levels)} levels")

    # 3. class-mean warm start
    err, _, eng = compare(comm, base, MGRITConfig(**{**conv, "warm_start": "class_mean"}), data, reg)
    check("class-mean warm start converged", err <= TOL * P and eng._store.numel() > 0,
          f"worst relative error {err:.2e} over 3 steps; {eng._store.numel()} stored numbers")

    # 4. adaptive mode: caps = coarse intervals make every step exact
    probe = create_engine("mgrit", copy.deepcopy(base), F.cross_entropy, sgd,
                          MGRITConfig(cf=2, input_size=IN), comm=comm)
    ncf, ncb = probe.fwd_levels[1].n_steps, probe.bwd_levels[1].n_steps
    acfg = MGRITConfig(mode="adaptive", cf=2, fwd_iters=ncf, bwd_iters=ncb, tol=1e-30, input_size=IN)
    err, _, eng = compare(comm, base, acfg, data[:2], reg)
    check("adaptive exact at the caps", err <= TOL * P and eng.stats["fwd_iters"] == ncf,
          f"worst relative error {err:.2e}, {eng.stats['fwd_iters']} / {ncf} cycles")

    # 5. iterations are cycles after the start
    e = create_engine("mgrit", copy.deepcopy(base), F.cross_entropy, sgd,
                      MGRITConfig(cf=2, fwd_iters=2, bwd_iters=1, input_size=IN), comm=comm)
    e.forward_backward(*data[0])
    st = e.stats
    check("iterations are cycles", st["fwd_iters"] == 2 and len(st["fwd_residuals"]) == 2
          and st["bwd_iters"] == 1 and len(st["bwd_residuals"]) == 1,
          f"fwd {st['fwd_iters']} ({len(st['fwd_residuals'])} residuals), bwd {st['bwd_iters']}")

    # 6. pruning-aware re-partition
    ser = create_engine("serial", copy.deepcopy(base), F.cross_entropy, sgd, regularizer=reg)
    eng = create_engine("mgrit", copy.deepcopy(base), F.cross_entropy, sgd, MGRITConfig(**conv),
                        regularizer=reg, comm=comm)
    for x, y in data[:2]:
        ser.step(x, y)
        eng.step(x, y)
    dead = [1, 2, 3, 7] if P <= 2 else [1, 2, 3, 4, 5]
    for m in (ser.model, eng.model):  # the owners' zeros survive the gather in prune_
        with torch.no_grad():
            for i in dead:
                m.blocks[i].scale.zero_()
    pcfg = PruneConfig(threshold=1e-9, input_size=IN)
    xe = data[2][0]
    before = ser.eval_forward(xe)
    prune_(ser.model, pcfg)
    exact = rel(ser.eval_forward(xe), before)
    bounds_old = list(eng.bounds)
    report, info = eng.prune_(pcfg)
    mom_s = {n: ser.optimizer.state[p]["momentum_buffer"] for n, p in ser.model.named_parameters()}
    kept = max(rel(eng.optimizer.state[p]["momentum_buffer"], mom_s[n]) for n, p in eng.local_named_parameters())
    kept = comm.all_reduce_sum([kept])[0]
    x, y = data[2]
    ls, lm = ser.forward_backward(x, y), eng.forward_backward(x, y)
    sg = dict(ser.model.named_parameters())
    g = max(rel(p.grad, sg[n].grad) for n, p in eng.local_named_parameters())
    ser.optimizer.step()
    eng.optimizer.step()
    sd = eng.full_state_dict()
    ok_sd = True
    if sd is not None:
        ssd = ser.full_state_dict()
        ok_sd = list(sd) == list(ssd) and max(rel(sd[k], ssd[k]) for k in ssd if ssd[k].is_floating_point()) <= TOL
    err = comm.all_reduce_sum([max(g, abs(lm - ls) / abs(ls))])[0]
    ok_sd = comm.all_reduce_sum([0.0 if ok_sd else 1.0])[0] == 0
    owned = comm.all_reduce_sum([float(len(list(eng.local_named_parameters())))])[0]
    check("prune keeps the output", len(report.removed) == len(dead) and exact <= 1e-12,
          f"removed {len(report.removed)}, output change {exact:.1e}")
    check("repartition equals serial", err <= TOL * P and ok_sd and int(owned) == len(sg),
          f"bounds {bounds_old} -> {info['bounds_after']}, worst relative error {err:.2e}, "
          f"state after step equal {ok_sd}")
    check("repartition keeps optimizer state", kept <= 1e-12 * P and info["optimizer_states_kept"] > 0,
          f"momentum error {kept:.1e}, {info['optimizer_states_kept']} states on this rank")
    check("repartition balances", info["imbalance_after"] <= info["imbalance_before"] + 1e-12,
          f"imbalance {info['imbalance_before']:.3f} -> {info['imbalance_after']:.3f} "
          f"(unpruned {info['imbalance_unpruned']:.3f})")


N_CHECKS = 9
