"""A batched loader over a uint8 data set that lives on the training device.

Augmentation (random crop with zero padding, horizontal flip) is done for the whole batch
with tensor ops, no per-sample Python, on whatever device holds the data (the GPU on CUDA,
airbench style). Normalisation uses the training set's per-channel mean and std.

Example:
    >>> from resprune.data import load_arrays, DeviceLoader
    >>> tr, te = load_arrays("digits")
    >>> x, y = next(iter(DeviceLoader(tr, 64, train=True)))
    >>> tuple(x.shape), x.dtype
    ((64, 1, 16, 16), torch.float32)

A run builds its loaders from the recipe's ``data`` section (any object with the fields of
:class:`LoaderConfig`, e.g. :class:`resprune.config.DataConfig`):

    >>> from types import SimpleNamespace
    >>> cfg = SimpleNamespace(batch_size=100, eval_batch_size=500, augment=True, pad=2, flip=False)
    >>> train = DeviceLoader.from_config(tr, cfg, train=True)
    >>> test = DeviceLoader.from_config(te, cfg, train=False, mean=train.mean_std[0], std=train.mean_std[1])
    >>> train.batch_size, train.augment, test.batch_size, test.augment
    (100, True, 500, False)
"""

from __future__ import annotations

from typing import Any, Iterator, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from .sources import ArrayDataset, DataError

__all__ = ["DeviceLoader", "LoaderConfig", "batch_crop_flip", "DEFAULT_PAD", "DEFAULT_FLIP"]

# augmentation defaults, defined here once (resprune.config.DataConfig takes its defaults from them)
DEFAULT_PAD = 4  # random-crop zero padding, pixels
DEFAULT_FLIP = True  # random horizontal flips


class LoaderConfig(Protocol):
    """What :meth:`DeviceLoader.from_config` reads (the fields of ``resprune.config.DataConfig``)."""

    batch_size: int
    eval_batch_size: int
    augment: bool
    pad: int
    flip: bool


def batch_crop_flip(
    x: torch.Tensor, pad: int, generator: torch.Generator | None = None, flip: bool = True
) -> torch.Tensor:
    """Random crop (zero padding ``pad``) and random horizontal flip of a batch (B, C, H, W)."""
    b, c, h, w = x.shape
    dev = x.device
    if pad > 0:
        xp = F.pad(x, (pad, pad, pad, pad))
        oy = torch.randint(0, 2 * pad + 1, (b,), generator=generator, device="cpu").to(dev)
        ox = torch.randint(0, 2 * pad + 1, (b,), generator=generator, device="cpu").to(dev)
        rows = (oy[:, None] + torch.arange(h, device=dev))[:, None, :, None]  # B,1,H,1
        cols = (ox[:, None] + torch.arange(w, device=dev))[:, None, None, :]  # B,1,1,W
        bidx = torch.arange(b, device=dev)[:, None, None, None]
        cidx = torch.arange(c, device=dev)[None, :, None, None]
        x = xp[bidx, cidx, rows, cols]
    if not flip:
        return x
    flips = (torch.rand(b, generator=generator, device="cpu") < 0.5).to(dev)
    return torch.where(flips[:, None, None, None], x.flip(3), x)


class DeviceLoader:
    """Iterate (images, labels) batches; images normalised float32, labels int64.

    Args:
        ds: the uint8 arrays.
        batch_size: images per batch.
        train: shuffle (and augment when ``augment``) each epoch; the last partial batch is
            dropped in training, kept in evaluation.
        augment: random crop with ``pad`` and horizontal flip (training only).
        device: where the uint8 data set lives and batches are made.
        seed: seeds the shuffling/augmentation generator (its state is checkpointed).
        channels_last: return batches in channels_last memory format.
        mean, std: normalisation; default the data set's per-channel statistics.
    """

    def __init__(
        self,
        ds: ArrayDataset,
        batch_size: int,
        train: bool = False,
        augment: bool = False,
        pad: int = DEFAULT_PAD,
        device: str | torch.device = "cpu",
        seed: int = 0,
        channels_last: bool = False,
        mean: tuple[float, ...] | None = None,
        std: tuple[float, ...] | None = None,
        flip: bool = DEFAULT_FLIP,
    ) -> None:
        if batch_size < 1:
            raise DataError(f"batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device)
        self.images = torch.from_numpy(np.ascontiguousarray(ds.images)).permute(0, 3, 1, 2).contiguous().to(self.device)
        self.labels = torch.from_numpy(ds.labels).to(self.device)
        self.classes = list(ds.classes)
        self.batch_size, self.train, self.augment, self.pad, self.flip = batch_size, train, augment, pad, flip
        self.channels_last = channels_last
        if mean is None or std is None:
            f = ds.images.reshape(-1, ds.images.shape[-1]).astype(np.float64) / 255.0
            mean, std = tuple(f.mean(0)), tuple(f.std(0) + 1e-8)
        self.mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self.generator = torch.Generator().manual_seed(seed)
        if train and len(self.labels) < batch_size:
            raise DataError(f"training set has {len(self.labels)} images, fewer than one batch of {batch_size}")

    @classmethod
    def from_config(cls, ds: ArrayDataset, cfg: LoaderConfig, *, train: bool, **options: Any) -> DeviceLoader:
        """The loader ``cfg`` (a data config, see :class:`LoaderConfig`) describes: for training,
        ``cfg.batch_size`` and augmentation when ``cfg.augment`` (``cfg.pad``, ``cfg.flip``); for
        evaluation, ``cfg.eval_batch_size`` and no augmentation. ``options`` are the constructor's
        other arguments (``device``, ``seed``, ``channels_last``, ``mean``, ``std``; give an
        evaluation loader the training loader's :attr:`mean_std`)."""
        return cls(ds, cfg.batch_size if train else cfg.eval_batch_size, train=train,
                   augment=train and cfg.augment, pad=cfg.pad, flip=cfg.flip, **options)

    @property
    def mean_std(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """The per-channel normalisation ``(mean, std)`` as tuples (to give an evaluation loader)."""
        return tuple(self.mean.flatten().tolist()), tuple(self.std.flatten().tolist())

    @property
    def num_classes(self) -> int:
        """The data set's class count (its class names; a shard may hold fewer labels)."""
        return max(len(self.classes), int(self.labels.max()) + 1)

    @property
    def in_chans(self) -> int:
        return self.images.shape[1]

    def __len__(self) -> int:
        n = len(self.labels)
        return n // self.batch_size if self.train else -(-n // self.batch_size)

    def _prepare(self, xb: torch.Tensor, augment: bool) -> torch.Tensor:
        x = xb.float().div_(255.0)
        if augment:
            x = batch_crop_flip(x, self.pad, self.generator, flip=self.flip)
        x = (x - self.mean) / self.std
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for x, y, _ in self.indexed():
            yield x, y

    def indexed(self, augment: bool | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """The batches of one pass as ``(images, labels, indices)``: ``indices`` are the
        samples' positions in the data set (what engines keeping per-sample state address);
        ``augment=False`` turns augmentation off for this pass (``None``: as configured).
        Shuffling is unchanged."""
        aug = self.train and self.augment and augment is not False
        n = len(self.labels)
        if self.train:
            order = torch.randperm(n, generator=self.generator).to(self.device)
        else:
            order = torch.arange(n, device=self.device)
        for i in range(len(self)):
            idx = order[i * self.batch_size : (i + 1) * self.batch_size]
            yield self._prepare(self.images[idx], aug), self.labels[idx], idx
