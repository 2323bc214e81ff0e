"""NEXT vs D-PSGD vs centralised training of an MNIST MLP or small CNN over agents on sparse graphs.

``N`` agents (default 8) are **simulated in one process** as threads of a ``ThreadGroup``
(``resprune.parallel.comm``): on this 2-core machine 8 torchrun processes would only time-share
the cores, and nothing here is a speed claim; the messages are the engine's own
point-to-point ones, and the bytes they carry are counted. Each agent holds one shard of a
seeded MNIST subset (``iid`` or ``label_sorted``: non-iid, one or two digits per agent) and
takes full-batch steps on it (deterministic NEXT, as in the papers). Every method gets the
same budget: ``--iters`` iterations, every sample's gradient once per iteration, the same
step (NEXT ``α/τ`` = D-PSGD's ``lr`` = centralised ``lr``, constant). Centralised is the same
engine with one agent holding the pooled data (proximal gradient descent).

Measured every ``--eval-every`` iterations: the social training loss ``U(x̄)`` (pooled
training set, the agents' average model), test accuracy of ``x̄``, the consensus error
``(1/N) Σᵢ ‖xᵢ − x̄‖²`` and the bytes all agents sent so far.

Run (writes benchmarks/results/consensus.{md,json,png})::

    nice -n 19 python benchmarks/consensus.py
    nice -n 19 python benchmarks/consensus.py --quick     # a smoke run, minutes

On a loaded machine, one process per graph side by side, then one report::

    for g in ring torus erdos_renyi exponential; do
        nice -n 19 python benchmarks/consensus.py --graphs $g --out runs/cons/$g.md &
    done; wait
    python benchmarks/consensus.py --merge runs/cons/{ring,torus,erdos_renyi,exponential}.json

The step 0.3: of the two tried centrally on this subset, 0.5 oscillates (U = 3.2 after 5
steps, 0.22 at step 180 after 0.11 at 160) and 0.3 decreases smoothly (U = 0.065 at 200).

The small CNN (``--model cnn``: conv 5×5 1→8, max-pool 2, conv 5×5 8→16, max-pool 2, linear
256→10, ReLU; 6 k parameters against the MLP's 25 k, about 13× its multiply-adds), on the ring,
one process per split, into its own report::

    for s in iid label_sorted; do
        python benchmarks/consensus.py --model cnn --lr 0.03 --graphs ring --splits $s --out runs/cnn/ring_$s.md &
    done; wait
    python benchmarks/consensus.py --merge runs/cnn/ring_{iid,label_sorted}.json --out benchmarks/results/consensus_cnn.md

Its step 0.03: centrally, full-batch, 60 steps on the 4000 images, 0.05 spikes (U = 0.72 at
step 40, 1.58 at 50), 0.1, 0.2 and 0.3 oscillate, 0.03 decreases smoothly (0.64 at 60).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import header, header_lines, on_threads, subset, write_report  # noqa: E402

from resprune.data import load_arrays, shard_indices  # noqa: E402
from resprune.parallel import create_engine  # noqa: E402
from resprune.parallel.comm import ThreadGroup  # noqa: E402
from resprune.plots import _figure, _save  # noqa: E402

GRAPHS = ("ring", "torus", "erdos_renyi", "exponential")
SPLITS = ("iid", "label_sorted")
STYLE = {"next": "-", "dpsgd": "--"}


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--agents", type=int, default=8)
    p.add_argument("--train", type=int, default=4000, help="MNIST training images (split over the agents)")
    p.add_argument("--test", type=int, default=2000, help="MNIST test images")
    p.add_argument("--model", choices=("mlp", "cnn"), default="mlp",
                   help="mlp: 784-hidden-10 (ReLU); cnn: two 5x5 convolutions (8, 16 channels) with max-pooling, linear")
    p.add_argument("--hidden", type=int, default=32, help="MLP hidden width (784-hidden-10, ReLU)")
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--lr", type=float, default=0.3, help="step of every method (NEXT: α0 = 1, τ = 1/lr)")
    p.add_argument("--graph-p", type=float, default=0.3, help="Erdős–Rényi edge probability")
    p.add_argument("--graphs", nargs="+", default=list(GRAPHS))
    p.add_argument("--splits", nargs="+", default=list(SPLITS), choices=SPLITS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", default=os.environ.get("RESPRUNE_DATA", "/root/data/MNIST"))
    p.add_argument("--quick", action="store_true", help="a smoke run: 1000 images, 30 iterations, ring only")
    p.add_argument("--merge", nargs="+", type=Path, metavar="JSON",
                   help="no training: one report from the JSON of runs over parts of the graphs (same settings), "
                        "e.g. one process per graph run side by side on a loaded machine")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "consensus.md")
    a = p.parse_args(argv)
    if a.quick:
        a.train, a.test, a.iters, a.eval_every, a.graphs = 1000, 500, 30, 10, ["ring"]
    return a


def mnist(a):
    tr, te = load_arrays("mnist", a.data_dir)
    tr, te = subset(tr, a.train, a.seed), subset(te, a.test, a.seed)

    def flat(ds):
        return torch.from_numpy(ds.images.reshape(len(ds.labels), -1).astype(np.float32) / 255.0)

    x, xt = flat(tr), flat(te)
    mean, std = x.mean(), x.std()
    return (x - mean) / std, torch.from_numpy(tr.labels).long(), (xt - mean) / std, torch.from_numpy(te.labels).long()


def mlp(a) -> torch.nn.Module:
    """The benchmark's model (``--model``), seeded; it takes the flattened 784-pixel images."""
    torch.manual_seed(a.seed)
    nn = torch.nn
    if getattr(a, "model", "mlp") == "cnn":
        return nn.Sequential(nn.Unflatten(1, (1, 28, 28)), nn.Conv2d(1, 8, 5), nn.ReLU(), nn.MaxPool2d(2),
                             nn.Conv2d(8, 16, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(256, 10))
    return nn.Sequential(nn.Linear(784, a.hidden), nn.ReLU(), nn.Linear(a.hidden, 10))


def splits_of(a) -> list[str]:
    """The splits a run (or the JSON of one, older ones had no ``--splits``) covered."""
    return list(getattr(a, "splits", SPLITS))


def model_name(a) -> str:
    if getattr(a, "model", "mlp") == "cnn":
        return "small CNN (conv 5×5 1→8, max-pool 2, conv 5×5 8→16, max-pool 2, linear 256→10; ReLU)"
    return f"MLP 784-{a.hidden}-10 (ReLU)"


@torch.no_grad()
def measure(model, data) -> tuple[float, float]:
    x, y, xt, yt = data
    return float(F.cross_entropy(model(x), y)), 100.0 * float((model(xt).argmax(1) == yt).float().mean())


def run(a, data, method: str, graph: str, split: str) -> list[dict]:
    """One training run; ``method="central"``: one agent on the pooled data."""
    n = 1 if method == "central" else a.agents
    group = ThreadGroup(n)
    x, y = data[0], data[1]
    opts = {"method": "next" if method == "central" else method, "graph": graph, "graph_p": a.graph_p,
            "graph_seed": a.seed, "split": split, "alpha0": 1.0, "social_loss": False}

    init = mlp(a)  # built once, here: torch's global RNG is shared by the agent threads

    def agent(rank: int) -> list[dict]:
        keep = torch.from_numpy(shard_indices(y.numpy(), rank, n, split, a.seed))
        eng = create_engine("consensus", copy.deepcopy(init), F.cross_entropy,
                            lambda p: torch.optim.SGD(p, lr=a.lr), opts, comm=group.comm(rank))
        curve = []
        for it in range(a.iters + 1):
            if it % a.eval_every == 0 or it == a.iters:
                ce = eng.consensus_error()
                sent = eng.comm.all_reduce_sum([float(eng.sent_bytes_total)])[0]
                avg = eng.averaged_model().eval()  # collective: every agent takes part
                loss, acc = measure(avg, data) if rank == 0 else (0.0, 0.0)
                curve.append({"iter": it, "social_loss": loss, "test_acc": acc, "consensus_error": ce,
                              "bytes": sent})
            if it < a.iters:
                eng.step(x[keep], y[keep])
        return curve

    return on_threads(n, agent)[0]


def table(results: dict, a) -> list[str]:
    central = results["central"]["-"][-1]
    lines = ["| split | graph | NEXT loss | D-PSGD loss | central loss | NEXT gap | D-PSGD gap | "
             "NEXT acc % | D-PSGD acc % | central acc % | NEXT cons. err | D-PSGD cons. err | MB sent NEXT / D-PSGD |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for split in splits_of(a):
        for graph in a.graphs:
            if any(f"{graph}/{split}" not in results[m] for m in ("next", "dpsgd")):
                lines.append(f"| {split} | {graph} | not run |" + " |" * 10)
                continue
            nx, dp = results["next"][f"{graph}/{split}"][-1], results["dpsgd"][f"{graph}/{split}"][-1]
            gap = [100 * (r["social_loss"] / central["social_loss"] - 1) for r in (nx, dp)]
            lines.append(f"| {split} | {graph} | {nx['social_loss']:.4f} | {dp['social_loss']:.4f} | "
                         f"{central['social_loss']:.4f} | {gap[0]:+.2f}% | {gap[1]:+.2f}% | {nx['test_acc']:.2f} | "
                         f"{dp['test_acc']:.2f} | {central['test_acc']:.2f} | {nx['consensus_error']:.1e} | "
                         f"{dp['consensus_error']:.1e} | {nx['bytes'] / 1e6:.1f} / {dp['bytes'] / 1e6:.1f} |")
    return lines


def plot(results: dict, a, path: Path) -> None:
    fig = _figure(13, 7)
    axes = fig.subplots(len(splits_of(a)), 3, squeeze=False)
    colours = dict(zip(a.graphs, ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b2")))
    central = results["central"]["-"]
    for row, split in enumerate(splits_of(a)):
        ax_it, ax_b, ax_ce = axes[row]
        ax_it.plot([r["iter"] for r in central], [r["social_loss"] for r in central], "k-", label="centralised")
        for method in ("next", "dpsgd"):
            for graph in a.graphs:
                c = results[method].get(f"{graph}/{split}")
                if c is None:
                    continue
                kw = dict(color=colours[graph], ls=STYLE[method], label=f"{method} {graph}")
                ax_it.plot([r["iter"] for r in c], [r["social_loss"] for r in c], **kw)
                ax_b.plot([r["bytes"] / 1e6 for r in c], [r["social_loss"] for r in c], **kw)
                ax_ce.semilogy([r["iter"] for r in c][1:], [max(r["consensus_error"], 1e-16) for r in c][1:], **kw)
        for ax, xl, yl in ((ax_it, "iteration", "social training loss U(x̄)"), (ax_b, "MB sent (all agents)", ""),
                           (ax_ce, "iteration", "consensus error")):
            ax.set_xlabel(xl)
            ax.set_ylabel(yl)
            ax.set_title(f"{split}")
            if ax is not ax_ce:
                ax.set_yscale("log")
        if row == 0:
            ax_ce.legend(fontsize=6, ncol=2)
    _save(fig, path)


def merge(paths: list[Path]) -> tuple[dict, dict, dict]:
    """Facts, args and results of several reports of this script (one per part of the graphs)."""
    parts = [json.loads(p.read_text()) for p in paths]
    facts = dict(parts[0]["facts"])
    facts.update(command=" ; ".join(p["facts"]["command"] for p in parts),
                 loadavg_end=parts[-1]["facts"]["loadavg_end"], wall_s=max(p["facts"]["wall_s"] for p in parts),
                 runs=parts[0]["facts"]["runs"] + f"; {len(parts)} processes (one per part of the graphs or "
                 "splits), merged with --merge; wall time: the longest")
    args = dict(parts[0]["args"])
    results = {"central": parts[0]["results"]["central"], "next": {}, "dpsgd": {}}
    for p in parts:
        for m in ("next", "dpsgd"):
            results[m].update(p["results"][m])
    args["graphs"] = [g for g in GRAPHS if any(g in p["args"]["graphs"] for p in parts)]
    args["splits"] = [s for s in SPLITS if any(s in splits_of(argparse.Namespace(**p["args"])) for p in parts)]
    return facts, args, results


def report(a, facts: dict, results: dict) -> str:
    """Write ``a.out`` (markdown), its JSON and its plot; return the markdown."""
    setup = (f"- Setup: MNIST, {a.train} training images split over {a.agents} agents ({a.train // a.agents} each), "
             f"{a.test} test images; {model_name(a)}; full-batch steps, {a.iters} iterations, step "
             f"{a.lr} for every method (NEXT: α0 = 1, μ = 0, τ = {1 / a.lr:g}, linearised surrogate); "
             f"Erdős–Rényi p = {a.graph_p}; gap = final U(x̄) / centralised − 1.")
    md = "\n".join(header_lines(facts) + [setup, ""] + table(results, a))
    write_report(a.out, md, {"facts": facts, "args": {k: str(v) if isinstance(v, Path) else v
                                                       for k, v in vars(a).items() if k != "merge"},
                             "results": results})
    plot(results, a, a.out.with_suffix(".png"))
    return md


def main(argv=None) -> int:
    a = parse(argv)
    if a.merge:
        facts, args, results = merge(a.merge)
        out = a.out
        a = argparse.Namespace(**{**args, "out": out, "merge": None})
        print(report(a, facts, results))
        return 0
    torch.set_num_threads(1)
    _, facts = header(f"Training over {a.agents} agents: NEXT vs D-PSGD vs centralised "
                      f"(MNIST {'small CNN' if a.model == 'cnn' else 'MLP'})",
                      f"one run per setting, seed {a.seed}, agents simulated as threads of one process")
    t0 = time.perf_counter()
    data = mnist(a)
    results: dict = {"central": {"-": run(a, data, "central", "complete", "iid")}, "next": {}, "dpsgd": {}}
    print(f"central: U={results['central']['-'][-1]['social_loss']:.4f}", flush=True)
    partial = a.out.with_name(a.out.stem + "_partial.json")  # what is done so far, if the run is cut short
    partial.parent.mkdir(parents=True, exist_ok=True)
    for graph in a.graphs:
        for split in a.splits:
            for method in ("next", "dpsgd"):
                t1 = time.perf_counter()
                results[method][f"{graph}/{split}"] = run(a, data, method, graph, split)
                last = results[method][f"{graph}/{split}"][-1]
                print(f"{method} {graph} {split}: U={last['social_loss']:.4f} acc={last['test_acc']:.2f} "
                      f"ce={last['consensus_error']:.1e} ({time.perf_counter() - t1:.0f} s)", flush=True)
                partial.write_text(json.dumps(results))
    facts.update(loadavg_end=list(os.getloadavg()), wall_s=time.perf_counter() - t0)
    partial.write_text(json.dumps({"facts": facts, "results": results}))
    print(report(a, facts, results))
    partial.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
