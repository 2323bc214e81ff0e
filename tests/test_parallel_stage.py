"""Stages and the engine registry (single process; P simulated ranks as threads): a rank
keeps storage only for its own layers (memory per rank falls as P grows), released layers
come back when weights are loaded into them, engines register with their config class,
blocks declare their residual form through a protocol, and schedules are plain data."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import resprune as rp
from resprune.parallel import (LocalConfig, MGRITConfig, PipelineConfig, create_engine, engine_config,
                               engine_config_class, list_engines)
from resprune.parallel.mgrit_schedule import describe_levels
from resprune.parallel.residual import coarse_step, relu_after_sum, residual_form
from resprune.parallel.stage import tensor_bytes
from test_parallel_mgrit import run_threads


def _sgd(p):
    return torch.optim.SGD(p, lr=0.05, momentum=0.9)


def _chain(depth=16):
    torch.manual_seed(0)
    return rp.create_model("resconv_chain", depth=depth, width=8, horizon=1.0)


# ---- registry ---------------------------------------------------------------------------------
def test_engines_register_with_their_config_class():
    assert list_engines() == ["auxvar", "consensus", "local", "mgrit", "pipeline", "serial"]
    assert engine_config_class("mgrit") is MGRITConfig and engine_config_class("serial") is None
    assert engine_config_class("pipeline") is PipelineConfig and engine_config_class("local") is LocalConfig
    cfg = engine_config("pipeline", {"microbatches": 2}, (1, 1, 16, 16))
    assert cfg == PipelineConfig(2, input_size=(1, 1, 16, 16))
    assert engine_config("serial") is None
    for name, opts, match in [("pipeline", {"micro": 2}, "unknown engine_options key.*valid: input_size, microbatches"),
                              ("local", {"variant": "x"}, "engine_options: variant must be"),
                              ("serial", {"cf": 2}, "takes none"), ("magic", {}, "unknown engine 'magic'")]:
        with pytest.raises(ValueError, match=match):
            engine_config(name, opts)
    eng = create_engine("pipeline", _chain(4), F.cross_entropy, _sgd, {"microbatches": 2})  # a dict works too
    assert eng.config.microbatches == 2 and eng.config.input_size is None and eng.input_size == (1, 3, 32, 32)
    assert create_engine("local", _chain(4), F.cross_entropy, _sgd).config == LocalConfig()  # None: defaults
    with pytest.raises(TypeError, match="pipeline engine needs PipelineConfig settings, got MGRITConfig"):
        create_engine("pipeline", _chain(4), F.cross_entropy, _sgd, MGRITConfig())


@pytest.mark.parametrize("cls,kw", [(PipelineConfig, dict(microbatches=0)), (PipelineConfig, dict(schedule="zb")),
                                    (LocalConfig, dict(queue=0)), (LocalConfig, dict(overlap=0)),
                                    (LocalConfig, dict(aux_hidden=-1)), (LocalConfig, dict(input_size=(3,))),
                                    (PipelineConfig, dict(input_size=(3,))), (MGRITConfig, dict(input_size=(3,)))])
def test_config_validation(cls, kw):
    with pytest.raises(ValueError):
        cls(**kw)
    c = cls()
    assert cls(**c.to_dict()) == c
    assert cls(input_size=None).input_size is None  # the engine infers it from the model
    assert cls(input_size=[1, 3, 8, 8]).input_size == (1, 3, 8, 8)


def test_recipes_know_every_registered_engine():
    from resprune.config import RecipeError, load_recipe

    for name in list_engines():
        assert load_recipe("quickstart", [f"engine={name}"]).engine == name
    r = load_recipe("quickstart", ["engine=local", "engine_options.variant=overlap"])
    assert r.engine_options == {"variant": "overlap"}
    with pytest.raises(RecipeError, match="available: auxvar, consensus, local, mgrit, pipeline, serial"):
        load_recipe("quickstart", ["engine=magic"])
    with pytest.raises(RecipeError, match="unknown engine_options key.*for engine 'pipeline'"):
        load_recipe("quickstart", ["engine=pipeline", "engine_options.cf=2"])


# ---- the residual protocol ----------------------------------------------------------------------
class _Block(nn.Module):
    """A user block that declares its residual form (no resprune type involved)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.body = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return F.relu(x + self.body(x))

    def residual_form(self):
        return self.body, True


def test_blocks_declare_their_residual_form():
    r, relu = residual_form(rp.ResConv2d(4, 4))
    assert relu and residual_form(rp.ResConv2d(4, 8, stride=2)) is None
    assert residual_form(nn.Conv2d(4, 4, 3)) is None and not relu_after_sum(nn.ReLU())
    b, u = _Block(4), torch.randn(2, 4, 5, 5)
    with torch.no_grad():
        assert torch.equal(coarse_step(b, 3, u), F.relu(u + 3 * b.body(u)))  # act(u + m·r(u))
        plain = nn.Conv2d(4, 4, 3, padding=1)
        assert torch.equal(coarse_step(plain, 3, u), u + 3 * (plain(u) - u))  # generic step


def test_mgrit_converges_on_a_user_block():
    """The engine learns the residual structure from the protocol: a chain of user blocks
    converges to serial's gradients (two simulated ranks)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), *[_Block(4) for _ in range(8)],
                        nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)))
    with torch.no_grad():
        for b in net[1:9]:
            b.body.weight.mul_(0.1)
    net.layer_sequence = lambda: [(str(i), m) for i, m in enumerate(net)]
    x, y = torch.randn(4, 3, 6, 6), torch.tensor([0, 1, 2, 0])
    ser = create_engine("serial", copy.deepcopy(net), F.cross_entropy, _sgd)
    ser.forward_backward(x, y)
    ref = {n: p.grad for n, p in ser.local_named_parameters()}
    cfg = MGRITConfig(cf=2, mode="converged", tol=1e-7, input_size=(1, 3, 6, 6))

    def fn(r, comm):
        m = copy.deepcopy(net)
        m.layer_sequence = lambda: [(str(i), mm) for i, mm in enumerate(m)]
        e = create_engine("mgrit", m, F.cross_entropy, _sgd, cfg, comm=comm)
        e.forward_backward(x, y)
        return {n: p.grad.clone() for n, p in e.local_named_parameters()}, e.stats["fwd_iters"]

    out = run_threads(2, fn)
    grads = {k: v for o in out for k, v in o[0].items()}
    assert set(grads) == set(ref)
    assert max(float((grads[n] - ref[n]).norm() / ref[n].norm()) for n in ref) <= 1e-5


# ---- stages: ownership and memory ------------------------------------------------------------------
def _param_bytes(model):
    return tensor_bytes(model.parameters())


@pytest.mark.parametrize("name,cfg", [("mgrit", MGRITConfig(cf=2, input_size=(1, 3, 8, 8))),
                                      ("local", LocalConfig(input_size=(1, 3, 8, 8)))])
def test_memory_per_rank_falls_as_ranks_are_added(name, cfg):
    base = _chain(16)
    full = _param_bytes(base)
    x, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    worst = {}
    for P in (1, 2, 4):
        def fn(r, comm):
            e = create_engine(name, copy.deepcopy(base), F.cross_entropy, _sgd, cfg, comm=comm)
            e.step(x, y)
            metas = [n for n, m in e.seq if any(p.is_meta for p in m.parameters())]
            mem = e.memory_bytes()
            e._drain() if hasattr(e, "_drain") else None
            return mem, metas, e.lo, e.hi

        out = run_threads(P, fn)
        for mem, metas, lo, hi in out:
            assert len(metas) == 16 + 2 - (hi - lo)  # every layer another rank owns is released
            assert mem["grads"] > 0 and mem["optimizer"] > 0 and mem["total"] == sum(
                v for k, v in mem.items() if k != "total")
        worst[P] = max(o[0]["params"] for o in out)
    assert worst[1] >= full and worst[2] < 0.7 * worst[1] and worst[4] < 0.7 * worst[2], (worst, full)


def test_released_layers_come_back_when_loaded():
    """After a step rank 1 holds only its layers; loading a whole state dict into its model
    (as the trainer does on rank 0 after a gather) brings the others back, and the next
    step releases them again; the gathered state equals serial's after the same step."""
    base = _chain(6).double()
    x, y = torch.randn(4, 3, 8, 8, dtype=torch.float64), torch.tensor([0, 1, 2, 3])
    ser = create_engine("serial", copy.deepcopy(base), F.cross_entropy, _sgd)
    ser.step(x, y)
    cfg = MGRITConfig(cf=2, mode="converged", tol=1e-11, input_size=(1, 3, 8, 8))

    def fn(r, comm):
        e = create_engine("mgrit", copy.deepcopy(base), F.cross_entropy, _sgd, cfg, comm=comm)
        e.step(x, y)
        sd = comm.broadcast_object(e.full_state_dict(), 0)
        released = sum(p.is_meta for p in e.model.parameters())
        e.model.load_state_dict(sd)  # released layers take storage again
        back = sum(p.is_meta for p in e.model.parameters())
        out = e.model(x)
        e.eval_forward(x)
        again = sum(p.is_meta for p in e.model.parameters())
        return sd, released, back, again, out

    ref = ser.full_state_dict()
    for sd, released, back, again, out in run_threads(2, fn):
        assert released > 0 and back == 0 and again == released
        assert max(float((sd[k].double() - ref[k].double()).abs().max()) for k in ref) <= 1e-9
        with torch.no_grad():
            assert torch.allclose(out, ser.model(x), atol=1e-9)


# ---- communication ----------------------------------------------------------------------------------
def test_reversed_comm_renumbers_every_call():
    """The adjoint's communicator implements the whole Comm interface, rank r appearing as
    P−1−r in every call (point to point and collectives)."""
    from resprune.parallel.comm import Comm, ReversedComm

    names = ("isend", "send_nowait", "recv", "wait", "all_reduce_sum", "broadcast", "gather_object",
             "broadcast_object")
    assert all(getattr(ReversedComm, n) is not getattr(Comm, n) for n in names)

    def fn(rank, comm):
        rc = ReversedComm(comm)
        me, got = rc.rank, None
        if me < 2:
            rc.isend(torch.tensor([float(rank)]), me + 1)
        rc.wait()
        if me > 0:
            got = float(rc.recv((1,), me - 1, torch.zeros(1)))
        return (me, got, float(rc.broadcast(torch.tensor([float(rank)]), 0)), rc.gather_object(me),
                rc.broadcast_object(rank, 1), rc.all_reduce_sum([1.0]))

    out = run_threads(3, fn)
    assert [o[0] for o in out] == [2, 1, 0]
    assert [o[1] for o in out] == [1.0, 2.0, None]  # base rank 1 hears from 2, rank 0 from 1
    assert all(o[2] == 2.0 and o[4] == 1 and o[5] == [3.0] for o in out)  # reversed 0 and 1: base 2 and 1
    assert [o[3] for o in out] == [None, None, [0, 1, 2]]  # gathered on reversed rank 0, in its order


# ---- schedules as data -----------------------------------------------------------------------------
def test_schedules_print_without_processes():
    from resprune.parallel.mgrit_solver import build_hierarchy
    from resprune.parallel.pipeline import schedule_order

    levels = build_hierarchy([False] + [True] * 6 + [False], [0, 4, 8], cf=3, max_levels=2)
    text = describe_levels(levels, ["stem"] + [f"b{i}" for i in range(6)] + ["head"])
    assert text.splitlines()[1] == "level 1: rank 0: stem | b0 ×3   rank 1: b3 ×3 | head"
    gpipe, ofob = schedule_order("gpipe", 4, 4), schedule_order("1f1b", 4, 4)
    for order in (gpipe, ofob):  # every rank runs each micro-batch forward, then backward
        for r, acts in order.items():
            assert sorted(acts) == sorted([f"{r}F{i}" for i in range(4)] + [f"{r}B{i}" for i in range(4)])
            assert all(acts.index(f"{r}F{i}") < acts.index(f"{r}B{i}") for i in range(4))
    assert ofob[3] == ["3F0", "3B0", "3F1", "3B1", "3F2", "3B2", "3F3", "3B3"]  # last stage: strict 1F1B
    assert schedule_order("1f1b", 4, 2) == schedule_order("gpipe", 4, 2)  # too few micro-batches: GPipe
