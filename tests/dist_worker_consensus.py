"""Rank process for tests/test_parallel_dist.py: the consensus engine under torchrun (gloo, CPU).

Every rank is an agent with its own convex problem (tests/test_parallel_consensus.py's
logistic regression, float64). For each method and graph, 30 steps under torchrun must give
every agent the parameters that the same agents simulated as threads (ThreadComm) give, to
1e-12; then the invariants over real processes: Σᵢ yᵢ = Σᵢ ∇ℓᵢ, bytes sent per step, and
``full_state_dict`` on rank 0 being the agents' average.

Prints one ``RESULT`` line per check on rank 0 (:data:`N_CHECKS` in all).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.utils import parameters_to_vector

from resprune.parallel import create_engine
from resprune.parallel.comm import DistComm

from helpers import RankChecks, run_rank, run_threads
from test_parallel_consensus import D, C, agent_data, linear, sgd

STEPS = 30
SETTINGS = [dict(graph="ring", tau=2.0), dict(graph="exponential", tau=2.0, reg="l1", reg_weight=0.02),
            dict(method="dpsgd", graph="torus")]
N_CHECKS = len(SETTINGS) + 3


def train(cfg: dict, rank: int, comm, data) -> tuple[torch.Tensor, object]:
    eng = create_engine("consensus", linear(), F.cross_entropy, sgd(0.5), cfg, comm=comm)
    for _ in range(STEPS):
        eng.step(*data[rank])
    return parameters_to_vector(eng.model.parameters()).detach(), eng


def gathered(t: torch.Tensor, world: int) -> list[torch.Tensor]:
    out = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(out, t.contiguous())
    return out


def main() -> int:
    check = RankChecks()
    rank, world = check.rank, check.world
    data = agent_data(world)
    for cfg in SETTINGS:
        mine, _ = train(cfg, rank, DistComm(), data)
        sim = run_threads(world, lambda r, c: train(cfg, r, c, data)[0])[rank]
        diff = max(float(d) for d in gathered((mine - sim).abs().max().reshape(1), world))
        check(f"{cfg} matches the threads simulation", diff <= 1e-12, f"max |Δ| = {diff:.2e}")

    cfg = SETTINGS[0]
    _, eng = train(cfg, rank, DistComm(), data)
    ys, gs = sum(gathered(eng.tracker, world)), sum(gathered(eng.last_grad, world))
    err = float((ys - gs).abs().max() / gs.abs().max())
    check("gradient tracking: sum of y = sum of gradients", err <= 1e-12, f"rel. error {err:.1e}")
    numel = D * C + C
    want = len(eng.graph.out_neighbours(rank, STEPS - 1)) * 2 * numel * 8
    ok = [eng.stats["sent_bytes"] == want]
    check("bytes sent per step = neighbours x (z, y)", all(gathered(torch.tensor(ok), world)),
          f"rank 0 sent {eng.stats['sent_bytes']} B, expected {want}")
    mean = sum(gathered(parameters_to_vector(eng.model.parameters()).detach(), world)) / world
    sd = eng.full_state_dict()
    if rank == 0:
        got = torch.cat([sd["weight"].reshape(-1), sd["bias"]])
        d = float((got - mean).abs().max())
        check("full_state_dict is the agents' average", d <= 1e-14, f"max |Δ| = {d:.1e}")
    else:
        check("full_state_dict is the agents' average", sd is None, "None off rank 0")
    return check.exit_code


if __name__ == "__main__":
    run_rank(main)
