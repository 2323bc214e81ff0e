"""How close are simultaneous-mode mgrit gradients to the exact ones, as training goes on?

A ResConv chain (stem 1→C, N identity-shortcut ResConv2d of width C at 28×28, head; layer
scales start at ``horizon/N``) is trained serially on MNIST (SGD, Nesterov, weight decay).
At a few checkpoints of that training, on one fixed batch, the exact gradient (serial
engine) is compared with the gradient of one simultaneous mgrit step for several settings
(coarse parameters injected or averaged, F 1 + 1 or FCF 2 + 2, cf): cosine and relative
error ``‖g − g_exact‖ / ‖g_exact‖`` of the whole parameter vector. The P ranks run as
threads of this process (``ThreadComm``: the same solver and messages as under torchrun).

    python benchmarks/mgrit_gradient_accuracy.py --data-dir /tmp/data --out benchmarks/results/mgrit_gradient_accuracy.md

Defaults: 32 layers, width 16, horizon 2, P = 2, checkpoints after 0, 50, 150, 300, 600
steps of batch 32 (lr 0.05, Nesterov momentum 0.9, weight decay 5e-4, constant lr); about
4 minutes on one core. Nothing is downloaded: MNIST idx files under ``--data-dir``.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import resprune as rp
from resprune.data import DeviceLoader, load_arrays
from resprune.data.sources import ArrayDataset
from resprune.parallel import MGRITConfig, create_engine
from resprune.parallel.comm import ThreadGroup

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import on_threads, print_report  # noqa: E402

SETTINGS = [  # (label, MGRITConfig keyword arguments)
    ("inject, F 1+1, cf 4", dict(cf=4)),
    ("average, F 1+1, cf 4", dict(cf=4, coarse_params="average")),
    ("inject, FCF 2+2, cf 4", dict(cf=4, relax="FCF", fwd_iters=2, bwd_iters=2)),
    ("average, FCF 2+2, cf 4", dict(cf=4, relax="FCF", fwd_iters=2, bwd_iters=2, coarse_params="average")),
    ("inject, F 1+1, cf 8", dict(cf=8)),
    ("average, F 1+1, cf 8", dict(cf=8, coarse_params="average")),
]


def mgrit_gradient(model, cfg: MGRITConfig, x, y, P: int) -> torch.Tensor:
    """The whole gradient of one simultaneous mgrit step, P ranks as threads."""
    group = ThreadGroup(P)

    def work(r):
        e = create_engine("mgrit", copy.deepcopy(model), F.cross_entropy,
                          lambda p: torch.optim.SGD(p, lr=0.0), cfg, comm=group.comm(r))
        e.forward_backward(x, y)
        return {n: p.grad.clone() for n, p in e.local_named_parameters()}

    g = {k: v for o in on_threads(P, work) for k, v in o.items()}
    return torch.cat([g[n].flatten() for n, _ in model.named_parameters()])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", default=os.environ.get("RESPRUNE_DATA", "/tmp/data"))
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--horizon", type=float, default=2.0)
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--checkpoints", default="0,50,150,300,600")
    ap.add_argument("--train-subset", type=int, default=10000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="append the markdown report here")
    a = ap.parse_args()
    torch.set_num_threads(1)
    started = time.strftime("%Y-%m-%d %H:%M")
    tr, _ = load_arrays("mnist", a.data_dir)
    idx = np.random.RandomState(a.seed).permutation(len(tr))[:a.train_subset]
    tr = ArrayDataset(tr.images[idx], tr.labels[idx], tr.classes)
    train = DeviceLoader(tr, 32, train=True, seed=a.seed)
    xe, ye = next(iter(DeviceLoader(tr, 32, train=True, seed=a.seed + 1)))  # the probe batch
    torch.manual_seed(a.seed)
    model = rp.create_model("resconv_chain", depth=a.layers, width=a.width, in_chans=1, horizon=a.horizon)
    ser = create_engine("serial", model, F.cross_entropy,
                        lambda p: torch.optim.SGD(p, lr=a.lr, momentum=0.9, nesterov=True, weight_decay=5e-4))
    checkpoints = sorted(int(v) for v in a.checkpoints.split(","))
    shape = (1, 1, *tr.images.shape[1:3])
    rows, step, batches = [], 0, iter(train)
    t0 = time.perf_counter()
    while True:
        if step in checkpoints:
            exact = create_engine("serial", copy.deepcopy(model), F.cross_entropy, lambda p: torch.optim.SGD(p, lr=0.0))
            exact.forward_backward(xe, ye)
            g0 = torch.cat([p.grad.flatten() for _, p in exact.local_named_parameters()])
            with torch.no_grad():
                scales = torch.stack([b.scale.abs() for b in model.blocks])
            row = [str(step), f"{float(scales.mean()):.3f}"]
            for _, kw in SETTINGS:
                g = mgrit_gradient(model, MGRITConfig(input_size=shape, **kw), xe, ye, a.procs)
                cos = float(g @ g0 / (g.norm() * g0.norm()))
                rel = float((g - g0).norm() / g0.norm())
                row.append(f"{cos:.2f} / {rel:.2f}")
            rows.append("| " + " | ".join(row) + " |")
            print(rows[-1], file=sys.stderr, flush=True)
        if step >= checkpoints[-1]:
            break
        try:
            x, y = next(batches)
        except StopIteration:
            batches = iter(train)
            x, y = next(batches)
        ser.step(x, y)
        step += 1
    wall = time.perf_counter() - t0
    report = "\n".join([
        f"## Gradient accuracy of one simultaneous mgrit step ({a.layers}-layer chain, MNIST)", "",
        f"- Date: {started}; {platform.machine()}, {os.cpu_count()} cores; torch {torch.__version__}, "
        f"Python {platform.python_version()}; one thread; {wall:.0f} s",
        f"- Model: stem 1→{a.width} + {a.layers} identity-shortcut ResConv2d of width {a.width} at 28×28 + "
        f"avgpool/linear; layer scales start at {a.horizon:g}/{a.layers}",
        f"- Training between checkpoints: serial, SGD lr {a.lr:g}, Nesterov momentum 0.9, weight decay "
        f"5e-4, batch 32, {a.train_subset} MNIST training images, seed {a.seed}",
        f"- Probe: one fixed batch of 32 training images; mgrit on P = {a.procs} ranks (threads), "
        "simultaneous mode, 2 levels; one measurement per cell (deterministic)", "",
        "Cells: cosine with the exact gradient / relative error ‖g − g_exact‖/‖g_exact‖.", "",
        "| step | mean layer scale | " + " | ".join(label for label, _ in SETTINGS) + " |",
        "|---|---|" + "---|" * len(SETTINGS), *rows, ""])
    print_report(report, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
