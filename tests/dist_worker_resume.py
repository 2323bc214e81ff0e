"""Rank process for tests/test_parallel_dist.py: ``Trainer`` with the mgrit engine resumes
exactly (torchrun, gloo, CPU, float64).

Four epochs straight are compared with two epochs, a checkpoint, a fresh engine and
``fit(resume=True)`` for the last two: parameters, BN statistics and momentum buffers must
agree to ``TOL``. The momentum buffers are gathered here from each rank's optimizer, not by
the engine's own checkpoint code. Then the two-epoch checkpoint (written at P = world size)
is resumed by a serial engine on rank 0: its momentum buffers, learning rate and scheduler
step must be the P-rank run's. Prints one ``RESULT`` line per check on rank 0.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

import resprune as rp
from resprune.config import TrainConfig
from resprune.data import ArrayDataset, DeviceLoader, load_arrays
from resprune.parallel import MGRITConfig, create_engine
from resprune.train import Trainer, param_groups

from helpers import RankChecks, run_rank

TOL = 1e-12
EPOCHS = 4


class Stop(Exception):
    """Ends a run after a checkpoint, as a killed process would."""


class Float64:
    """A DeviceLoader whose images come as float64 (the engines' exactness checks run in it)."""

    def __init__(self, loader: DeviceLoader) -> None:
        self.loader, self.device, self.generator = loader, loader.device, loader.generator

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        return ((x.double(), y) for x, y in self.loader)


def subset(ds: ArrayDataset, n: int) -> ArrayDataset:
    return ArrayDataset(ds.images[:n], ds.labels[:n], ds.classes)


def trainer(run_dir: Path, engine_name: str = "mgrit", stop_after: int | None = None) -> Trainer:
    """A float64 resconv_chain on 256 digits (4 steps an epoch); same seed every time."""
    torch.manual_seed(0)
    tr, te = load_arrays("digits")
    train = DeviceLoader(subset(tr, 256), 64, train=True, augment=True, pad=2, flip=False, seed=0)
    test = DeviceLoader(subset(te, 64), 64, mean=tuple(train.mean.flatten().tolist()),
                        std=tuple(train.std.flatten().tolist()))
    model = rp.create_model("resconv_chain", num_classes=10, depth=6, width=4, in_chans=1, horizon=1.0).double()
    cfg = TrainConfig(epochs=EPOCHS, lr=0.05, warmup_epochs=1, l1=1e-3, bf16=False, channels_last=False,
                      device="cpu", eval_every=EPOCHS)

    def sgd(named):
        return torch.optim.SGD(param_groups(model, cfg.weight_decay, list(named)), lr=cfg.lr,
                               momentum=cfg.momentum, nesterov=cfg.nesterov)

    mcfg = MGRITConfig(cf=2, mode="simultaneous", input_size=(1, 1, 16, 16))
    engine = create_engine(engine_name, model, F.cross_entropy, sgd, mcfg)
    t = Trainer(model, Float64(train), Float64(test), cfg, run_dir, "sparse", engine=engine, log=lambda s: None)
    if stop_after is not None:
        save = t.save_checkpoint

        def save_and_stop(epoch: int) -> None:
            save(epoch)
            if epoch == stop_after:
                raise Stop

        t.save_checkpoint = save_and_stop
    return t


def gathered(t: Trainer) -> tuple[dict, dict] | None:
    """(full state dict, momentum buffer per parameter name) on rank 0, read from each rank's
    own optimizer; None elsewhere."""
    sd = t.engine.full_state_dict()
    opt = t.engine.optimizer
    mom = {n: opt.state[p]["momentum_buffer"].clone() for n, p in t.engine.local_named_parameters()
           if "momentum_buffer" in opt.state[p]}
    parts = [None] * t.engine.world_size if t.engine.rank == 0 else None
    dist.gather_object(mom, parts, dst=0)
    return None if parts is None else (sd, {k: v for d in parts for k, v in d.items()})


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))[:5]
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def main() -> int:
    check = RankChecks()
    rank, world = check.rank, check.world

    box = [tempfile.mkdtemp(prefix="resume-") if rank == 0 else None]
    dist.broadcast_object_list(box, 0)
    root = Path(box[0])
    try:
        straight = trainer(root / "straight")
        straight.fit()
        want = gathered(straight)

        part = trainer(root / "part", stop_after=EPOCHS // 2)
        try:
            part.fit()
        except Stop:
            pass
        if rank == 0:  # the half-way checkpoint, for the serial resume below
            shutil.copytree(root / "part" / "checkpoints", root / "serial" / "checkpoints")
        half = gathered(part)
        lr_half = part.optimizer.param_groups[0]["lr"]
        again = trainer(root / "part")
        again.fit(resume=True)
        got = gathered(again)
        if rank == 0:
            dw, dm = max_diff(want[0], got[0]), max_diff(want[1], got[1])
            check("resume: weights", dw <= TOL, f"{EPOCHS} epochs straight vs {EPOCHS // 2} + resume + "
                  f"{EPOCHS // 2}: max |difference| of parameters and BN statistics {dw:.1e} (tolerance {TOL})")
            check("resume: momentum", dm <= TOL and len(got[1]) == len(dict(straight.model.named_parameters())),
                  f"max |difference| of {len(got[1])} momentum buffers {dm:.1e}")
            check("resume: history", [h.epoch for h in again.history] == list(range(1, EPOCHS + 1)),
                  f"epochs {[h.epoch for h in again.history]}")
            # a checkpoint written by P ranks resumed by one process (serial engine)
            serial = trainer(root / "serial", engine_name="serial")
            serial.resume()
            opt = serial.engine.optimizer
            mom = {n: opt.state[p]["momentum_buffer"] for n, p in serial.model.named_parameters()}
            ds = max_diff(half[1], mom)
            steps = serial.scheduler.last_epoch
            same_lr = opt.param_groups[0]["lr"] == lr_half and steps == part.scheduler.last_epoch
            check("resume at P=1", ds == 0.0 and same_lr and serial.start_epoch == EPOCHS // 2,
                  f"momentum buffers of the P={world} checkpoint restored by a serial engine: max |difference| "
                  f"{ds:.1e}; lr {opt.param_groups[0]['lr']:.6g} vs {lr_half:.6g}; "
                  f"scheduler step {steps} vs {part.scheduler.last_epoch}")
    finally:
        dist.barrier()
        if rank == 0:
            shutil.rmtree(root, ignore_errors=True)
    return check.exit_code


if __name__ == "__main__":
    run_rank(main)
