"""The ``consensus`` engine (NEXT, D-PSGD) with agents simulated as threads (ThreadComm), its
graphs and the data shards; tests/test_parallel_dist.py runs it under torchrun.

Convex problems run in float64: multinomial logistic regression (a linear model, cross
entropy) on a different Gaussian mixture per agent, so the agents' optima differ (non-iid)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.nn.utils import parameters_to_vector

from resprune.data import DataError
from resprune.data.shards import shard_indices
from resprune.parallel import ConsensusConfig, GraphError, create_engine, engine_config, make_graph
from resprune.parallel.consensus import prox, squared_error
from resprune.parallel.graphs import GRAPHS

from helpers import run_threads

D, C, M = 5, 3, 40  # features, classes, samples per agent


def agent_data(n: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Agent i's samples: classes drawn with agent-specific frequencies, class means shifted per agent."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(C, D, generator=g, dtype=torch.float64)
    out = []
    for i in range(n):
        probs = torch.softmax(torch.randn(C, generator=g, dtype=torch.float64) * 2, 0)
        y = torch.multinomial(probs, M, replacement=True, generator=g)
        x = means[y] + 0.3 * i + torch.randn(M, D, generator=g, dtype=torch.float64)
        out.append((x, y))
    return out


def seeded(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """``model`` with every parameter drawn from its own generator (U(±1/√fan_in), as torch's
    default for Linear). Not ``torch.manual_seed``: agents run as threads, which share torch's
    global RNG, so one thread's seeding and drawing can interleave with another's and the
    agents would start from different points."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            bound = 1 / np.sqrt(p.shape[-1] if p.dim() > 1 else p.shape[0])
            p.copy_((torch.rand(p.shape, generator=g, dtype=p.dtype) * 2 - 1) * bound)
    return model


def linear() -> torch.nn.Module:
    return seeded(torch.nn.Linear(D, C).double())


def sgd(lr: float):
    return lambda p: torch.optim.SGD(p, lr=lr)


def run_agents(n: int, cfg: dict, steps: int, data=None, lr: float = 0.5, probe=None):
    """Every agent's final parameter vector (and what ``probe(engine)`` returned after each step)."""
    data = data or agent_data(n)

    def fn(rank, comm):
        eng = create_engine("consensus", linear(), F.cross_entropy, sgd(lr), {"social_loss": False, **cfg},
                            comm=comm)
        seen = []
        for _ in range(steps):
            eng.step(*data[rank])
            if probe is not None:
                seen.append(probe(eng))
        return parameters_to_vector(eng.model.parameters()).detach(), seen

    return run_threads(n, fn)


def centralised(data, steps: int, tau: float, alpha0: float = 1.0, mu: float = 0.0, reg="none", lam=0.0,
                loss=F.cross_entropy):
    """Proximal gradient on U = (1/N) Σᵢ ℓᵢ + G with the relaxed step x + α(prox(x − ∇/τ) − x)."""
    model, alpha = linear(), alpha0
    for _ in range(steps):
        model.zero_grad()
        total = sum(loss(model(x), y) for x, y in data) / len(data)
        total.backward()
        with torch.no_grad():
            for p in model.parameters():
                p += alpha * (prox(p - p.grad / tau, reg, lam, 1 / tau) - p)
        alpha *= 1 - mu * alpha
    return parameters_to_vector(model.parameters()).detach()


# ---- NEXT against centralised descent ---------------------------------------------------------
@pytest.mark.parametrize("reg", ["none", "l2"])
def test_complete_graph_is_centralised_descent(reg):
    """Exact averaging (W = 11ᵀ/N) with a linear prox: every agent follows centralised proximal
    gradient descent on the pooled cost step by step; float64, max |Δ| <= 1e-12."""
    n, steps, lam = 4, 25, 0.05
    cfg = dict(graph="complete", alpha0=0.9, mu=0.05, reg=reg, reg_weight=lam)
    ref = centralised(agent_data(n), steps, tau=2.0, alpha0=0.9, mu=0.05, reg=reg, lam=lam)
    for x, _ in run_agents(n, cfg, steps, lr=0.5):
        assert (x - ref).abs().max() <= 1e-12


def regression_data(n: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Agent i's least-squares problem: its own true weights (non-iid), well conditioned."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randn(M, D, generator=g, dtype=torch.float64)
        w = torch.randn(D, C, generator=g, dtype=torch.float64)
        out.append((x, x @ w + 0.1 * torch.randn(M, C, generator=g, dtype=torch.float64)))
    return out


@pytest.mark.parametrize("graph", ["ring", "torus", "exponential", "random_matching"])
def test_sparse_graph_reaches_the_centralised_l1_solution_in_consensus(graph):
    """Ring / 2×2 torus / time-varying graphs, squared error, L1 regulariser (prox), 4 agents
    with different optima: the consensus error falls below 1e-9 of its peak and every agent
    ends within 1e-6 of the centralised proximal-gradient solution (float64).

    The step budget is set by the slowest graph, the one-peer exponential one. Each of its
    rounds leaves some disagreement untouched (n = 4: the hop-2 round does not mix the
    alternating mode at all), so there only the local step contracts it, by about the agents'
    curvature / τ per two rounds, and the agents' curvatures here (largest Hessian eigenvalues
    0.90-1.25) are close to τ = 1. The linearised iteration (active set fixed) contracts by
    0.947 per step on the exponential graph against 0.666 on the ring (spectral radius of the
    two-round map, computed for this data): after 100 steps the exponential graph's consensus
    error is still 1.5e-8 of its peak (measured), after 300 it is 5e-17 and every agent is
    within 5e-9 of the solution. Hence 300 steps for every graph, not a looser tolerance."""
    n, lam, data = 4, 0.1, regression_data(4)
    cfg = dict(graph=graph, reg="l1", reg_weight=lam, tau=1.0, loss="squared_error")
    out = run_agents(n, cfg, 300, data=data, probe=lambda e: e.consensus_error() if e.iteration % 10 == 1 else None)
    ref = centralised(data, 600, tau=1.0, reg="l1", lam=lam, loss=squared_error)
    errors = [e for e in out[0][1] if e is not None]
    assert max(errors) > 1e-4 and errors[-1] < 1e-9 * max(errors), errors
    assert (ref == 0).sum() >= 3  # the L1 term is active: some weights exactly zero
    for x, _ in out:
        assert (x - ref).abs().max() < 1e-6


def test_gradient_tracking_keeps_the_sum():
    """Σᵢ yᵢ = Σᵢ ∇ℓᵢ(xᵢ) after every step (ring, a small MLP, a new mini-batch each step);
    float64, relative error <= 1e-12."""
    n, g = 4, torch.Generator().manual_seed(1)
    batches = [[(torch.randn(8, D, generator=g, dtype=torch.float64), torch.randint(0, C, (8,), generator=g))
                for _ in range(12)] for _ in range(n)]

    def fn(rank, comm):
        mlp = seeded(torch.nn.Sequential(torch.nn.Linear(D, 16), torch.nn.Tanh(), torch.nn.Linear(16, C)).double())
        eng = create_engine("consensus", mlp, F.cross_entropy, sgd(0.3), {"graph": "ring"}, comm=comm)
        out = []
        for x, y in batches[rank]:
            eng.step(x, y)
            out.append((eng.tracker.clone(), eng.last_grad.clone()))
        return out

    res = run_threads(n, fn)
    for k in range(12):
        ys, gs = sum(r[k][0] for r in res), sum(r[k][1] for r in res)
        assert (ys - gs).abs().max() <= 1e-12 * gs.abs().max()
    assert (res[0][-1][0] - res[1][-1][0]).abs().max() > 1e-6  # agents' trackers differ: not trivially equal


def test_dpsgd_on_complete_graph_is_centralised_gradient_descent():
    """D-PSGD with plain SGD and exact averaging: x − lr·(1/N)Σᵢ∇ℓᵢ, as centralised; float64 1e-12."""
    n = 3
    ref = centralised(agent_data(n), 20, tau=1 / 0.4)
    for x, _ in run_agents(n, dict(method="dpsgd", graph="complete"), 20, lr=0.4):
        assert (x - ref).abs().max() <= 1e-12


def test_dpsgd_sparse_graph_stays_biased_on_non_iid_data_where_next_does_not():
    """With a constant step, D-PSGD's agents stop at different points (consensus error > 1e-4)
    on a ring with non-iid data; NEXT's reach consensus (< 1e-16)."""
    data = regression_data(4)
    err = {m: run_agents(4, dict(method=m, graph="ring", tau=1.0, loss="squared_error"), 100, lr=1.0, data=data,
                         probe=lambda e: e.consensus_error() if e.iteration == 100 else None)[0][1][-1]
           for m in ("dpsgd", "next")}
    assert err["dpsgd"] > 1e-4 and err["next"] < 1e-16, err


# ---- the local surrogate, solved by blocks ----------------------------------------------------
def test_inner_steps_solve_the_strongly_convex_surrogate():
    """One agent, squared error, no bias (one block), L2: with α = 1 the step lands on the
    surrogate's closed-form minimiser (A + (τ+λ)I)⁻¹((2/m)Xᵀt + τw₀), A = (2/m)XᵀX;
    float64, rel. error <= 1e-10.

    The inner iteration w ← prox(w₀ − ∇ℓ(w)/τ) = (τw₀ − ∇ℓ(w))/(τ + λ) is linear here with
    Jacobian −A/(τ + λ): it contracts by ρ = ‖A‖/(τ + λ) per step, 0.956 on this data
    (‖A‖ = 2.96, τ + λ = 3.1), so the error after k steps is ρ^(k−1) times the first
    (linearised) step's. The step count follows from ρ: enough for ρ^(k−1) < 1e-12 (about
    600 steps; 60 would leave 8 % of the first error)."""
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(30, D, generator=g, dtype=torch.float64), torch.randn(30, 1, generator=g, dtype=torch.float64)
    tau, lam = 3.0, 0.1
    model = torch.nn.Linear(D, 1, bias=False).double()
    w0 = model.weight.detach().clone().reshape(-1)
    a = 2 / (30 * 1) * x.T @ x  # Hessian of mean((Xw − t)²)
    rho = float(torch.linalg.matrix_norm(a, 2)) / (tau + lam)
    assert rho < 1  # a contraction: the fixed point is found
    steps = 1 + int(np.ceil(np.log(1e-12) / np.log(rho)))
    cfg = dict(graph="ring", tau=tau, reg="l2", reg_weight=lam, inner_steps=steps, loss="squared_error")
    eng = create_engine("consensus", model, None, sgd(0.1), cfg)
    eng.step(x, t)
    want = torch.linalg.solve(a + (tau + lam) * torch.eye(D, dtype=torch.float64),
                              2 / 30 * x.T @ t.reshape(-1) + tau * w0)
    got = model.weight.detach().reshape(-1)
    assert (got - want).abs().max() <= 1e-10 * want.abs().max()


def test_block_threads_do_not_change_the_result():
    """The blocks solved on 1 or 3 threads give the same agent update (bitwise)."""
    data = agent_data(2)
    res = [run_agents(2, dict(graph="ring", tau=4.0, inner_steps=4, block_threads=k), 3, data=data)[0][0]
           for k in (1, 3)]
    assert torch.equal(res[0], res[1])


# ---- the contract: average model, bytes, losses ------------------------------------------------
def test_eval_and_state_dict_use_the_agents_average():
    n, data = 4, agent_data(4)

    def fn(rank, comm):
        eng = create_engine("consensus", linear(), F.cross_entropy, sgd(0.5), {"graph": "ring"}, comm=comm)
        losses = [eng.step(*data[rank]) for _ in range(5)]
        sd = eng.full_state_dict()
        logits = eng.eval_forward(data[0][0])
        return parameters_to_vector(eng.model.parameters()).detach(), sd, logits, losses, eng.stats

    res = run_threads(n, fn)
    mean = torch.stack([r[0] for r in res]).mean(0)
    sd = res[0][1]
    assert all(r[1] is None for r in res[1:])
    assert torch.allclose(torch.cat([sd["weight"].reshape(-1), sd["bias"]]), mean, rtol=0, atol=1e-14)
    ref = F.linear(data[0][0], sd["weight"], sd["bias"])
    for r in res:
        assert torch.allclose(r[2], ref, rtol=0, atol=1e-12)
        assert r[3] == res[0][3]  # the social loss: the same number on every agent
    numel = D * C + C
    assert res[0][4]["sent_bytes"] == 2 * numel * 8 * 2  # (z, y) in float64 to 2 ring neighbours


def test_squared_error_one_hot():
    out = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    assert float(squared_error(out, torch.tensor([0, 1]))) == pytest.approx(0.25)


# ---- graphs ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", GRAPHS)
@pytest.mark.parametrize("n", [1, 2, 5, 8, 9])
def test_mixing_matrices_are_doubly_stochastic(name, n):
    g = make_graph(name, n, p=0.9, seed=1)
    for k in range(6):
        w = g.weights(k)
        assert (w >= 0).all()
        assert torch.allclose(w.sum(0), torch.ones(n, dtype=w.dtype), atol=1e-14)
        assert torch.allclose(w.sum(1), torch.ones(n, dtype=w.dtype), atol=1e-14)
        if name not in ("exponential",):
            assert torch.equal(w, w.T)
        for i in range(n):
            assert all(w[i, j] > 0 for j in g.in_neighbours(i, k))
    if name == "complete":
        assert torch.allclose(g.weights(0), torch.full((n, n), 1.0 / n, dtype=torch.float64))
    if n > 2 and name == "ring":
        assert [len(g.in_neighbours(i)) for i in range(n)] == [2] * n
    if n == 9 and name == "torus":
        assert [len(g.in_neighbours(i)) for i in range(n)] == [4] * n


def test_time_varying_graphs_mix_over_rounds():
    """The product of a few rounds' matrices contracts disagreement (spectral norm of the product
    minus the average < 1), although one round alone does not (one peer per agent)."""
    n = 8
    for name in ("exponential", "random_matching"):
        g = make_graph(name, n, seed=3)
        prod = torch.eye(n, dtype=torch.float64)
        for k in range(6):
            prod = g.weights(k) @ prod
        assert float(torch.linalg.matrix_norm(prod - 1.0 / n, 2)) < 0.5
        assert g.spectral_gap(0) < 1e-12 or name == "exponential"


def test_bad_graphs_are_refused_with_clear_errors():
    with pytest.raises(GraphError, match="disconnected"):
        make_graph("erdos_renyi", 12, p=0.05, seed=0)
    with pytest.raises(GraphError, match="unknown graph 'star'"):
        make_graph("star", 4)
    with pytest.raises(GraphError, match="torus_shape 3x3 needs 9 agents, but there are 4"):
        make_graph("torus", 4, shape=(3, 3))
    with pytest.raises(ValueError, match="graph must be one of complete, ring"):
        engine_config("consensus", {"graph": "star"})
    with pytest.raises(GraphError, match="needs 9 agents, but there are 2"):  # nproc mismatch
        run_threads(2, lambda r, c: create_engine("consensus", linear(), F.cross_entropy, sgd(0.1),
                                                  {"graph": "torus", "torus_shape": (3, 3)}, comm=c))
    for bad in (dict(alpha0=0), dict(alpha0=1.5), dict(mu=-1), dict(tau=0), dict(reg="l3"), dict(inner_steps=0),
                dict(method="admm"), dict(split="dirichlet"), dict(graph_p=0), dict(loss="hinge")):
        with pytest.raises(ValueError):
            ConsensusConfig(**bad)
    assert ConsensusConfig(**ConsensusConfig().to_dict()) == ConsensusConfig()


# ---- data shards -------------------------------------------------------------------------------
@pytest.mark.parametrize("split", ["iid", "label_sorted"])
def test_shards_partition_the_data(split):
    labels = np.repeat(np.arange(10), 101)
    shards = [shard_indices(labels, r, 8, split, seed=2) for r in range(8)]
    allidx = np.concatenate(shards)
    assert len(allidx) == len(set(allidx.tolist())) == 8 * (len(labels) // 8)
    classes = [len(set(labels[s].tolist())) for s in shards]
    if split == "label_sorted":
        assert max(classes) <= 3  # 126 samples of 101-sample classes: one or two classes, three at most
    else:
        assert min(classes) == 10
    with pytest.raises(DataError, match="unknown data split 'x'"):
        shard_indices(labels, 0, 8, "x")
    with pytest.raises(DataError, match="cannot be split over 2000 agents"):
        shard_indices(labels, 0, 2000)


@pytest.mark.parametrize("split", ["iid", "label_sorted"])
def test_trainer_gives_each_rank_its_shard(monkeypatch, split):
    """The train stage's loaders in rank 1 of 2 (rank and world size patched in): half of the
    training set, normalised with the whole set's statistics, the labels of its split."""
    import resprune.train.pipeline as pipe
    from resprune.config import load_recipe

    recipe = load_recipe("quickstart", ["engine=consensus", "nproc=2", f"engine_options.split={split}"])
    full, _ = pipe._loaders(recipe, torch.device("cpu"))
    monkeypatch.setattr(pipe, "rank", lambda: 1)
    monkeypatch.setattr(pipe, "world_size", lambda: 2)
    part, _ = pipe._loaders(recipe, torch.device("cpu"), shard=True)
    assert len(part.labels) == len(full.labels) // 2 and part.num_classes == full.num_classes
    assert torch.equal(part.mean, full.mean) and torch.equal(part.std, full.std)
    labels = set(part.labels.tolist())
    assert (min(labels) >= 4) if split == "label_sorted" else (len(labels) == full.num_classes)
    assert pipe._loaders(recipe, torch.device("cpu"))[0].labels.shape == full.labels.shape  # shard=False: all
