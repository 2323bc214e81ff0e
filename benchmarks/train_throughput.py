"""Training throughput: resprune's training path against plain eager PyTorch loops.

Variants, all on the same model (ResConv ResNet-110 by default) and batch size:

* ``eager_fp32``: the loop a user writes first: torchvision transforms per sample
  (RandomCrop(32, padding=4), RandomHorizontalFlip, ToTensor, Normalize) in a DataLoader,
  fp32, contiguous memory.
* ``eager_bf16_cl`` (where bf16 is native: CUDA, CPUs with AVX512-BF16/AMX): the same loop
  with bf16 autocast and channels_last.
* ``resprune``: resprune's path: the uint8 data set on the device, batched augmentation
  (``DeviceLoader``), the ``Trainer`` step (precision "auto": bf16 + channels_last where bf16
  is native, prox L1).
* ``resprune_noresconv``: the same path on the same net built without ResConv
  (``resconv=False``), to measure what ResConv costs in training.

Rounds are interleaved (A, B, C, A, B, C, ...) so that drift of a shared machine hits all
variants alike; the table shows the median images/s and ratios to ``eager_fp32``.

    python benchmarks/train_throughput.py --data-dir /path/to/cifar10 --batch 512 --steps 20
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F

import resprune as rp
from resprune.config import TrainConfig
from resprune.data import DeviceLoader, load_arrays
from resprune.data.sources import ArrayDataset
from resprune.train import Trainer
from resprune.train.loop import native_bf16, resolve_precision
from resprune.util import hardware


def _data(data_dir: str | None, n: int) -> tuple[ArrayDataset, str]:
    if data_dir:
        tr, _ = load_arrays("cifar10", data_dir)
        return ArrayDataset(tr.images[:n], tr.labels[:n], tr.classes), "CIFAR-10 (JPEG copy)"
    rng = np.random.default_rng(0)
    return ArrayDataset(rng.integers(0, 255, (n, 32, 32, 3), dtype=np.uint8),
                        rng.integers(0, 10, n).astype(np.int64), [str(i) for i in range(10)]), "random uint8 images"


def _cycle(loader):
    """Batches forever, restarting the loader at the end of each pass."""
    while True:
        yield from loader


def eager_runner(ds: ArrayDataset, model: torch.nn.Module, batch: int, device, bf16_cl: bool):
    import torchvision.transforms as T
    from PIL import Image

    tf = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                    T.Normalize((0.49, 0.48, 0.45), (0.25, 0.24, 0.26))])

    class DS(torch.utils.data.Dataset):
        def __len__(self):
            return len(ds)

        def __getitem__(self, i):
            return tf(Image.fromarray(ds.images[i])), int(ds.labels[i])

    loader = torch.utils.data.DataLoader(DS(), batch_size=batch, shuffle=True, drop_last=True,
                                         num_workers=2 if device.type == "cuda" else 0)
    model = model.to(device)
    if bf16_cl:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    it = _cycle(loader)

    def step():
        x, y = next(it)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if bf16_cl:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16_cl):
            loss = F.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def resprune_runner(ds: ArrayDataset, model: torch.nn.Module, batch: int, device):
    cfg = TrainConfig(epochs=1000, lr=0.05, l1=1e-4, device=str(device))
    loader = DeviceLoader(ds, batch, train=True, augment=True, device=device,
                          channels_last=resolve_precision(cfg, device)[1])
    trainer = Trainer(model, loader, loader, cfg, None, "bench", log=lambda s: None)
    it = _cycle(loader)

    def step():
        trainer._step(*next(it))

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet110")
    ap.add_argument("--data-dir", default=None, help="CIFAR-10 folder (default: random images)")
    ap.add_argument("--batch", type=int, default=None, help="default 512 on CUDA, 128 on CPU")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per round (default 20 CUDA, 3 CPU)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    batch = args.batch or (512 if cuda else 128)
    steps = args.steps or (20 if cuda else 3)
    ds, what = _data(args.data_dir, max(4 * batch * steps, 2048))
    torch.manual_seed(0)
    variants = {
        "eager_fp32": eager_runner(ds, rp.create_model(args.model), batch, device, False),
        "resprune": resprune_runner(ds, rp.create_model(args.model), batch, device),
        "resprune_noresconv": resprune_runner(ds, rp.create_model(args.model, resconv=False), batch, device),
    }
    if native_bf16(device):
        variants["eager_bf16_cl"] = eager_runner(ds, rp.create_model(args.model), batch, device, True)
    for step in variants.values():  # warm-up (allocator, cudnn autotune, compile)
        for _ in range(2):
            step()
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(args.rounds):
        for name, step in variants.items():
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(steps):
                step()
            if cuda:
                torch.cuda.synchronize()
            times[name].append(batch * steps / (time.perf_counter() - t0))
    med = {k: statistics.median(v) for k, v in times.items()}
    hw = hardware()
    print(f"# training throughput: {args.model}, batch {batch}, {steps} steps x {args.rounds} interleaved rounds, "
          f"{what}, device {device}")
    print(f"# {hw}")
    print(f"{'variant':<22}{'img/s (median)':>16}{'vs eager_fp32':>15}")
    for k, v in med.items():
        print(f"{k:<22}{v:>16.1f}{v / med['eager_fp32']:>15.2f}")
    print(f"ResConv cost in training (resprune / resprune_noresconv): "
          f"{med['resprune_noresconv'] / med['resprune']:.3f}x time")


if __name__ == "__main__":
    main()
