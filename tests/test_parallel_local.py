"""The local engine (local parallelism, Laskin et al. 2020): one chunk per rank, each with its
own loss; single process and P simulated ranks as threads here, 2 and 4 gloo processes in
tests/dist_worker_local.py (training, the same reported loss on every rank, export)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import resprune as rp
from resprune.parallel import LocalConfig, create_engine
from resprune.parallel.local import AuxHead
from test_parallel_mgrit import run_threads

WORKER = Path(__file__).with_name("dist_worker_local.py")
IN = (1, 3, 8, 8)


def _sgd(p):
    return torch.optim.SGD(p, lr=0.05, momentum=0.9)


def _chain(depth=8):
    torch.manual_seed(0)
    return rp.create_model("resconv_chain", num_classes=4, depth=depth, width=8, horizon=1.0).double()


def _batches(n, b=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(b, 3, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 4, (b,), generator=g))
            for _ in range(n)]


@pytest.mark.parametrize("variant", ["greedy", "overlap"])
def test_one_chunk_is_serial(variant):
    """K = 1: one chunk, the model's own head, no messages: exactly the serial engine."""
    base, data = _chain(), _batches(3)
    reg = rp.LayerScaleL1(1e-3)
    ser = create_engine("serial", copy.deepcopy(base), F.cross_entropy, _sgd, regularizer=reg)
    loc = create_engine("local", copy.deepcopy(base), F.cross_entropy, _sgd,
                        LocalConfig(variant=variant, input_size=IN), regularizer=reg)
    for x, y in data:
        assert loc.step(x, y) == ser.step(x, y)
    sd, ssd = loc.full_state_dict(), ser.full_state_dict()
    assert list(sd) == list(ssd) and all(torch.equal(sd[k], ssd[k]) for k in ssd)  # BN buffers too
    assert loc.aux is None and loc.delay == 0


def _standalone(base, bounds, x, y, k):
    """Chunk ``k``'s gradient computed alone: the input is the chunks before it run forward
    (no graph), the loss that of its auxiliary head (the model's head for the last chunk)."""
    model = copy.deepcopy(base)
    seq = model.layer_sequence()
    h = x
    with torch.no_grad():
        for n in range(bounds[k]):
            h = seq[n][1](h)
    for n in range(bounds[k], bounds[k + 1]):
        h = seq[n][1](h)
    if k < len(bounds) - 2:
        torch.manual_seed(k)  # aux_seed 0 + k
        head = AuxHead(tuple(h.shape[1:]), 4).double()
        h = head(h)
    F.cross_entropy(h, y).backward()
    return {f"{name}.{pn}": p.grad for name, m in seq[bounds[k]:bounds[k + 1]] for pn, p in m.named_parameters()}


@pytest.mark.parametrize("P", [2, 3])
def test_greedy_gradients_never_cross_chunks(P):
    """Each rank's first gradient equals its chunk trained alone on the detached input; the
    messages back to earlier ranks are the reported losses only (8 bytes per rank per step)."""
    base = _chain(9)
    x, y = _batches(1)[0]

    def fn(r, comm):
        e = create_engine("local", copy.deepcopy(base), F.cross_entropy, _sgd, LocalConfig(input_size=IN), comm=comm)
        loss = e.forward_backward(x, y)
        grads = {n: p.grad.clone() for n, p in e.stage.named_parameters()}
        sent = e.stats["sent_bytes"]
        e._drain()
        return e.bounds, grads, sent, loss

    out = run_threads(P, fn)
    bounds = out[0][0]
    for k, (_, grads, sent, _) in enumerate(out):
        ref = _standalone(base, bounds, x, y, k)
        assert set(grads) == set(ref)
        assert max(float((grads[n] - ref[n]).abs().max()) for n in ref) <= 1e-12, k
        if k == P - 1:
            assert sent == 8 * (P - 1)  # the model loss to every other rank, nothing else
    assert len({o[3] for o in out}) == 1  # the same reported loss on every rank


def test_overlap_trains_the_previous_chunks_last_layers():
    """Overlapping variant: rank 0's last layer gets rank 1's gradient ``queue`` steps
    later (before: equal to greedy), and every rank reports the same delayed loss."""
    base, data = _chain(8), _batches(4)

    def run(variant):
        def fn(r, comm):
            e = create_engine("local", copy.deepcopy(base), F.cross_entropy, _sgd,
                              LocalConfig(variant=variant, queue=2, input_size=IN), comm=comm)
            last = e.stage.layers[-1][1] if r == 0 else None
            grads, losses = [], []
            for x, y in data:
                e.forward_backward(x, y)
                losses.append(e.stats["loss_step"])
                if last is not None:
                    grads.append(last.conv.weight.grad.clone())
                e.optimizer.step()
            e._drain()
            return grads, losses
        return run_threads(2, fn)

    greedy, over = run("greedy"), run("overlap")
    g0, o0 = greedy[0][0], over[0][0]
    assert torch.equal(g0[0], o0[0]) and torch.equal(g0[1], o0[1])  # nothing arrived yet (queue 2)
    assert not torch.allclose(g0[2], o0[2])  # step 2 adds rank 1's gradient of step 0
    assert over[0][1] == over[1][1] == [0, 0, 0, 1]  # the loss of step t − (K−1)·queue


def test_checkpoint_and_resume_continue_exactly():
    """full_state_dict (no auxiliary heads) + optimizer state + loop_state (heads, step,
    pending losses) into fresh engines: the next steps equal those of the engines that went on."""
    base, data = _chain(8), _batches(5)
    cfg = LocalConfig(queue=1, input_size=IN)

    def fn(r, comm):
        a = create_engine("local", copy.deepcopy(base), F.cross_entropy, _sgd, cfg, comm=comm)
        for x, y in data[:3]:
            a.step(x, y)
        sd, opt = a.full_state_dict(), a.full_optimizer_state()
        loop = comm.broadcast_object(a.loop_state() if r == 0 else None, 0)
        b = create_engine("local", copy.deepcopy(base), F.cross_entropy, _sgd, cfg, comm=comm)
        b.load_full_state_dict(sd)
        b.load_full_optimizer_state(opt)
        b.load_loop_state(loop)
        la = [a.step(x, y) for x, y in data[3:]]
        a._drain()  # its last messages are in flight on the same simulated ranks
        lb = [b.step(x, y) for x, y in data[3:]]
        same = all(torch.equal(p, q) for (_, p), (_, q) in zip(a.local_named_parameters(), b.local_named_parameters()))
        a._drain(), b._drain()
        return sd, la, lb, same

    out = run_threads(2, fn)
    sd = out[0][0]
    assert list(sd) == list(base.state_dict()) and not any(k.startswith("aux") for k in sd)
    for _, la, lb, same in out:
        assert la == lb and same


@pytest.mark.dist
@pytest.mark.parametrize("nproc", [2, 4])
def test_local_trains_and_exports(nproc: int) -> None:
    """tests/dist_worker_local.py: both variants train, every rank reports the same loss,
    the model (without auxiliary heads) fuses and exports to ONNX."""
    from dist_worker_local import N_CHECKS
    from test_parallel_dist import torchrun_results

    torchrun_results(WORKER, nproc, N_CHECKS)
