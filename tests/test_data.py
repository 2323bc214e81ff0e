"""Data sources (formats, cache keyed on the source, clear errors) and the batched loader."""

import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from resprune.data import DatasetNotFound, DeviceLoader, batch_crop_flip, load_arrays

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RESPRUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("RESPRUNE_DATA", raising=False)


def _tree(root: Path, n=3, size=8):
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for cls in ("b_cat", "a_dog"):
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(d / f"{i}.png")
    return root


def test_digits_builtin():
    tr, te = load_arrays("digits")
    assert tr.images.shape[1:] == (16, 16, 1) and tr.images.dtype == np.uint8
    assert len(tr) + len(te) == 1797 and set(tr.labels) == set(range(10))


def test_imagefolder_cache_and_invalidation(tmp_path):
    root = _tree(tmp_path / "data")
    tr, te = load_arrays("imagefolder", root)
    assert tr.images.shape == (6, 8, 8, 3) and tr.classes == ["a_dog", "b_cat"]
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 1
    tr2, _ = load_arrays("imagefolder", root)  # from the cache
    assert np.array_equal(tr.images, tr2.images)
    # change one source image: the cache key changes and the new pixels are read
    f = root / "train" / "a_dog" / "0.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(f)
    os.utime(f, ns=(1, 1))
    tr3, _ = load_arrays("imagefolder", root)
    assert tr3.images[0].sum() == 0
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 2


def test_imagefolder_from_tar_and_as_cifar10(tmp_path):
    root = _tree(tmp_path / "data")
    arc = tmp_path / "tree.tar.gz"
    with tarfile.open(arc, "w:gz") as tf:
        tf.add(root / "train", "train")
        tf.add(root / "test", "test")
    a, _ = load_arrays("imagefolder", arc)
    b, _ = load_arrays("cifar10", root)  # a cifar10 ImageFolder tree
    assert np.array_equal(a.images, b.images) and np.array_equal(a.labels, b.labels)


def test_cifar_torchvision_format(tmp_path):
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    rng = np.random.default_rng(1)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(d / name, "wb") as f:
            pickle.dump({"data": rng.integers(0, 255, (4, 3072), dtype=np.uint8), "labels": [0, 1, 2, 3]}, f)
    with open(d / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f)
    tr, te = load_arrays("cifar10", tmp_path)
    assert tr.images.shape == (20, 32, 32, 3) and te.images.shape == (4, 32, 32, 3)
    with open(d / "test_batch", "rb") as f:
        raw = pickle.load(f)["data"][0]
    assert np.array_equal(te.images[0], raw.reshape(3, 32, 32).transpose(1, 2, 0))


def _idx(path, arr):
    header = bytes([0, 0, 8, arr.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in arr.shape)
    path.write_bytes(header + arr.astype(np.uint8).tobytes())


def test_mnist_idx_and_truncation(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for split, n in (("train", 5), ("t10k", 3)):
        _idx(raw / f"{split}-images-idx3-ubyte", np.arange(n * 28 * 28).reshape(n, 28, 28) % 256)
        _idx(raw / f"{split}-labels-idx1-ubyte", np.arange(n) % 10)
    tr, te = load_arrays("mnist", tmp_path)
    assert tr.images.shape == (5, 28, 28, 1) and list(te.labels) == [0, 1, 2]
    p = raw / "t10k-images-idx3-ubyte"
    p.write_bytes(p.read_bytes()[:100])
    with pytest.raises(ValueError, match="truncated"):
        load_arrays("mnist", tmp_path)


def test_missing_data_errors(tmp_path):
    with pytest.raises(DatasetNotFound, match="RESPRUNE_DATA"):
        load_arrays("cifar10")
    with pytest.raises(DatasetNotFound, match="does not exist"):
        load_arrays("cifar10", tmp_path / "nope")
    with pytest.raises(DatasetNotFound, match="cifar-10-batches-py"):
        load_arrays("cifar10", tmp_path)
    with pytest.raises(ValueError, match="unknown dataset"):
        load_arrays("imagenet", tmp_path)


def test_crop_flip_is_a_translation_or_mirror():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(16, 3, 8, 8)
    y = batch_crop_flip(x, 2, g)
    xp = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(16):
        cands = [c for oy in range(5) for ox in range(5) for c in (xp[i, :, oy:oy + 8, ox:ox + 8],)]
        cands += [c.flip(2) for c in cands]
        assert any(torch.equal(y[i], c) for c in cands)


def test_loader_batches_and_normalisation():
    tr, te = load_arrays("digits")
    dl = DeviceLoader(tr, 100, train=True, augment=True, pad=2, flip=False)
    xs = [x for x, _ in dl]
    assert len(xs) == len(tr) // 100 and all(x.shape == (100, 1, 16, 16) for x in xs)
    ev = DeviceLoader(te, 100)
    assert sum(len(y) for _, y in ev) == len(te)
    allx = torch.cat([x for x, _ in DeviceLoader(tr, 1000)])
    assert abs(float(allx.mean())) < 1e-3 and abs(float(allx.std()) - 1) < 1e-2


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED / "cifar10-jpeg.tar.gz").is_file(), reason="shared CIFAR-10 archive not present")
def test_real_cifar10_archive():
    tr, te = load_arrays("cifar10", SHARED / "cifar10-jpeg.tar.gz")
    assert tr.images.shape == (50000, 32, 32, 3) and te.images.shape == (10000, 32, 32, 3)
    assert tr.classes[:3] == ["airplane", "automobile", "bird"]
    assert np.bincount(te.labels).tolist() == [1000] * 10
