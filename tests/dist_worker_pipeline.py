"""Rank process for tests/test_parallel_pipeline.py: the pipeline engine against the serial
reference (torchrun, gloo, CPU).

What "exact" means here: in train mode BatchNorm normalises each micro-batch with its own
statistics and updates its running statistics once per micro-batch (GPipe's semantics), so
the reference is one process accumulating gradients over the same micro-batches
(``microbatched_step`` on a whole copy of the model; the same batches, the same order). With
``microbatches=1`` the reference is the serial engine itself (full-batch BN). Every rank runs
the reference locally and compares its own parameters: loss, every gradient, and after the
optimizer steps every parameter and BN buffer (the gathered ``full_state_dict``), eval logits.
Tolerances: float64 1e-10, float32 1e-5 (relative, max over ranks).

Prints one ``RESULT`` line per check on rank 0 (:data:`N_CHECKS` in all).
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
import torch.nn.functional as F

import resprune as rp
from resprune.parallel import PipelineConfig, create_engine
from resprune.parallel.pipeline import microbatched_step, schedule_order
from resprune.sparsity import LayerSmoothness, RegularizerSum

from helpers import RankChecks, run_rank

N_CHECKS = 9


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def sgd(p):
    return torch.optim.SGD(p, lr=0.05, momentum=0.9)


def worst_over_ranks(v: float) -> float:
    t = torch.tensor([v], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def compare(base, cfg, batches, reg=None, reference="microbatched"):
    """Step the pipeline engine and the local reference side by side; the worst relative
    error of loss and owned gradients over the steps and ranks, the two engines."""
    eng = create_engine("pipeline", copy.deepcopy(base), F.cross_entropy, sgd, cfg, regularizer=reg)
    ref_model = copy.deepcopy(base)
    ser = create_engine("serial", ref_model, F.cross_entropy, sgd, regularizer=reg)
    worst = 0.0
    for x, y in batches:
        lp = eng.forward_backward(x, y)
        if reference == "serial":
            lr = ser.forward_backward(x, y)
        else:
            ser._zero_grad()
            lr = microbatched_step(ref_model, F.cross_entropy, x, y, cfg.microbatches)
            if reg is not None:
                r = reg(ref_model)
                r.backward()
                lr += float(r.detach())
        g = dict(ser.local_named_parameters())
        worst = max(worst, abs(lp - lr) / abs(lr), *(rel(p.grad, g[n].grad) for n, p in eng.local_named_parameters()))
        eng.optimizer.step()
        ser.optimizer.step()
    return worst_over_ranks(worst), eng, ser


def state_error(eng, ser) -> float:
    """Relative error of the gathered state (parameters and BN buffers) on rank 0."""
    sd = eng.full_state_dict()
    if sd is None:
        return 0.0
    ssd = ser.full_state_dict()
    assert list(sd) == list(ssd)
    return max(rel(sd[k], ssd[k]) if ssd[k].is_floating_point() else float(not torch.equal(sd[k], ssd[k]))
               for k in ssd)


def main() -> int:
    check = RankChecks()
    rank, world = check.rank, check.world

    torch.manual_seed(0)
    base = rp.create_model("resnet20").double()  # BasicBlocks with BN, option-A shortcuts
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(b, 3, 16, 16, generator=g, dtype=torch.float64), torch.randint(0, 10, (b,), generator=g))
            for b in (16, 16, 12)]  # 12 samples: 4 micro-batches of 3
    reg = RegularizerSum(rp.LayerScaleL1(1e-3), LayerSmoothness(1e-2))  # smoothness pairs cross stage bounds
    kw = dict(input_size=(1, 3, 16, 16))

    # 1. 1F1B, 4 micro-batches, float64, L1 + smoothness: loss and gradients at every step
    cfg = PipelineConfig(microbatches=4, schedule="1f1b", **kw)
    err, eng, ser = compare(base, cfg, data, reg)
    check("1f1b float64 loss+grads", err <= 1e-10, f"worst relative error {err:.1e} over 3 steps (tolerance 1e-10)")
    # 2. after the steps: every parameter and BN running statistic (gathered), eval logits
    serr = state_error(eng, ser)
    check("1f1b float64 state", serr <= 1e-10, f"parameters and BN buffers after 3 steps: {serr:.1e}")
    eng.eval(), ser.eval()
    x = data[0][0]
    eerr = worst_over_ranks(rel(eng.eval_forward(x), ser.eval_forward(x)))
    eval13 = worst_over_ranks(rel(eng.eval_forward(x[:13]), ser.eval_forward(x[:13])))  # prime size: 1 micro-batch
    check("eval_forward", eerr <= 1e-10 and eval13 <= 1e-10, f"logits {eerr:.1e}, batch of 13 {eval13:.1e}")
    # 3. GPipe, a batch of 10 (2 micro-batches of 5: the largest divisor of 10 not above 4)
    gcfg = PipelineConfig(microbatches=4, schedule="gpipe", **kw)
    data10 = [(data[0][0][:10], data[0][1][:10])]
    err, eng, _ = compare(base, gcfg, data10 + data[:1], reg)
    check("gpipe float64", err <= 1e-10 and eng.stats["microbatches"] == 4,
          f"worst relative error {err:.1e} (batches of 10 and 16)")
    # 4. one micro-batch: the serial engine itself (full-batch BN)
    err, _, _ = compare(base, PipelineConfig(microbatches=1, **kw), data[:2], reg, reference="serial")
    check("microbatches=1 equals serial", err <= 1e-10, f"worst relative error {err:.1e}")
    # 5. float32
    err, eng, _ = compare(copy.deepcopy(base).float(), PipelineConfig(microbatches=4, **kw),
                          [(x.float(), y) for x, y in data[:2]], reg)
    check("1f1b float32", err <= 1e-5, f"worst relative error {err:.1e} (tolerance 1e-5)")
    # 6. the printable schedule is the order torch's schedule runs (logged from its stage)
    run = next(r for k, r in eng._runs.items() if k[3])
    log, st = [], run._stage
    fwd, bwd = st.forward_one_chunk, st.backward_one_chunk
    st.forward_one_chunk = lambda i, *a, **k: (log.append(f"{rank}F{i}"), fwd(i, *a, **k))[1]
    st.backward_one_chunk = lambda i, *a, **k: (log.append(f"{rank}B{i}"), bwd(i, *a, **k))[1]
    eng.forward_backward(data[0][0].float(), data[0][1])
    mine = schedule_order("1f1b", world, 4)[rank]
    same = worst_over_ranks(float(log != mine)) == 0
    check("schedule_order is what runs", same, f"rank {rank}: {log}")
    # 7. memory: each rank holds its stage only; stats carry bytes and phase times
    mem = eng.gather_memory_bytes()
    full = sum(p.numel() * 4 for p in base.parameters())  # float32
    st = eng.stats
    if rank == 0:
        params = [m["params"] for m in mem]
        # each rank keeps the scalars of the layers it does not own (layer scales, BN counters)
        ok = max(params) < full and full <= sum(params) <= 1.01 * full and st["sent_bytes"] > 0 \
            and st["times_s"]["total"] > 0
        check("memory per rank", ok, f"parameter bytes per rank {params} (whole model {full}); "
              f"rank 0 sent {st['sent_bytes']} B, step {st['times_s']['total']:.3f} s")
    else:
        check("memory per rank", True, "")
    # 8. prune_ + re-partition: the next step still equals the reference on the pruned model
    pe = create_engine("pipeline", copy.deepcopy(base), F.cross_entropy, sgd, cfg)
    ref = copy.deepcopy(base)
    with torch.no_grad():
        for m in (pe.model, ref):
            for b in (m.layer1[1], m.layer2[2], m.layer3[1]):
                b.conv2.scale.zero_()
    pcfg = rp.PruneConfig(threshold=1e-9, input_size=(1, 3, 16, 16))
    report, info = pe.prune_(pcfg)
    rp.prune_(ref, pcfg)
    xb, yb = data[0]
    lp = pe.forward_backward(xb, yb)
    lr = microbatched_step(ref, F.cross_entropy, xb, yb, 4)
    gr = dict(ref.named_parameters())
    perr = worst_over_ranks(max(abs(lp - lr) / lr, *(rel(p.grad, gr[n].grad) for n, p in pe.local_named_parameters())))
    check("prune_ and repartition", len(report.removed) == 3 and perr <= 1e-10,
          f"removed {len(report.removed)}, bounds {info['bounds_before']} -> {info['bounds_after']}, error {perr:.1e}")
    return check.exit_code


if __name__ == "__main__":
    run_rank(main)
