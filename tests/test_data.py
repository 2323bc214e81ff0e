"""Data sources (formats, cache keyed on the source, clear errors) and the batched loader."""

import gzip
import io
import os
import pickle
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from resprune.data import DataError, DatasetNotFound, DeviceLoader, batch_crop_flip, load_arrays
from resprune.errors import ResPruneError

# the real CIFAR-10 archive (ImageFolder .tar.gz), when a machine has one: RESPRUNE_TEST_CIFAR10=PATH
CIFAR_ARCHIVE = Path(os.environ.get("RESPRUNE_TEST_CIFAR10", "/nonexistent/cifar10-jpeg.tar.gz"))


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RESPRUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("RESPRUNE_DATA", raising=False)


def _tree(root: Path, n=3, size=8, classes=("b_cat", "a_dog")):
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for cls in classes:
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
    assert [p.suffix for p in (tmp_path / "cache").iterdir()] == [".npz"]  # no temporary file left behind
    tr2, _ = load_arrays("imagefolder", root)  # from the cache
    assert np.array_equal(tr.images, tr2.images)
    # change one source image: the cache key changes and the new pixels are read
    f = root / "train" / "a_dog" / "0.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(f)
    os.utime(f, ns=(1, 1))
    tr3, _ = load_arrays("imagefolder", root)
    assert tr3.images[0].sum() == 0
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 2


def test_imagefolder_listing(tmp_path):
    """Images right inside a class folder count (as in an archive); an empty class folder is no
    class, a nested folder's images and other files are not read; sizes must agree."""
    root = _tree(tmp_path / "data")
    (root / "train" / "zz_empty").mkdir()
    (root / "train" / "a_dog" / "nested").mkdir()
    Image.fromarray(np.zeros((5, 5, 3), np.uint8)).save(root / "train" / "a_dog" / "nested" / "x.png")
    (root / "train" / "a_dog" / "notes.txt").write_text("not an image")
    tr, te = load_arrays("imagefolder", root)
    assert tr.classes == ["a_dog", "b_cat"] and len(tr) == 6 and len(te) == 6
    assert tr.labels.tolist() == [0, 0, 0, 1, 1, 1]
    Image.fromarray(np.zeros((5, 5, 3), np.uint8)).save(root / "test" / "b_cat" / "odd.png")
    with pytest.raises(DataError, match="images differ in size"):
        load_arrays("imagefolder", root)
    for d in (root / "test" / "a_dog", root / "test" / "b_cat"):
        for f in d.iterdir():
            f.unlink()
    with pytest.raises(DatasetNotFound, match=f"{re.escape(str(root / 'test'))}: no images"):
        load_arrays("imagefolder", root)


def test_imagefolder_from_tar_and_as_cifar10(tmp_path):
    root = _tree(tmp_path / "data", classes=[f"c{i}" for i in range(10)], n=1)
    arc = tmp_path / "tree.tar.gz"
    with tarfile.open(arc, "w:gz") as tf:
        tf.add(root / "train", "train")
        tf.add(root / "test", "test")
    a, _ = load_arrays("imagefolder", arc)
    b, _ = load_arrays("cifar10", root)  # a cifar10 ImageFolder tree
    assert np.array_equal(a.images, b.images) and np.array_equal(a.labels, b.labels)


def test_named_dataset_class_count_is_checked(tmp_path):
    """A 3-class folder is not CIFAR-10 (it was accepted as one)."""
    root = _tree(tmp_path / "data", classes=["a", "b", "c"])
    with pytest.raises(ValueError, match=r"cifar10 has 10 classes, but this data has 3 \(a, b, c\)"):
        load_arrays("cifar10", root)
    assert len(load_arrays("imagefolder", root)[0].classes) == 3  # fine as a data set of its own
    arc = tmp_path / "three.tar.gz"
    with tarfile.open(arc, "w:gz") as tf:
        tf.add(root / "train", "train")
        tf.add(root / "test", "test")
    with pytest.raises(ValueError, match="cifar10 has 10 classes"):
        load_arrays("cifar10", arc)


def test_test_class_without_training_images(tmp_path):
    root = _tree(tmp_path / "data")
    (root / "test" / "c_bird").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "test" / "c_bird" / "0.png")
    with pytest.raises(ValueError, match="test class folder.*c_bird have no training images"):
        load_arrays("imagefolder", root)


@pytest.mark.parametrize("damage", ["truncated", "not_an_image"])
def test_unreadable_image_is_named(tmp_path, damage):
    root = _tree(tmp_path / "data")
    bad = root / "train" / "a_dog" / "9.jpg"
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(buf, "JPEG")
    bad.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2] if damage == "truncated" else b"<html>404</html>")
    with pytest.raises(ValueError, match=f"{re.escape(str(bad))}: not a readable image") as e:
        load_arrays("imagefolder", root)
    assert "\n" not in str(e.value)
    arc = tmp_path / "bad.tar.gz"  # inside an archive: archive and member are named
    with tarfile.open(arc, "w:gz") as tf:
        tf.add(root / "train", "train")
        tf.add(root / "test", "test")
    with pytest.raises(ValueError, match=f"{re.escape(str(arc))}:train/a_dog/9.jpg: not a readable image"):
        load_arrays("imagefolder", arc)


def test_unreadable_archive_is_named(tmp_path):
    arc = tmp_path / "cut.tar.gz"
    root = _tree(tmp_path / "data")
    with tarfile.open(arc, "w:gz") as tf:
        tf.add(root / "train", "train")
        tf.add(root / "test", "test")
    arc.write_bytes(arc.read_bytes()[:200])
    with pytest.raises(DataError, match=f"{re.escape(str(arc))}: not a readable tar archive") as e:
        load_arrays("imagefolder", arc)
    assert "\n" not in str(e.value)


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


def _cifar_dir(tmp_path, labels=(0, 1, 2, 3), n_classes=10):
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(d / name, "wb") as f:
            pickle.dump({"data": rng.integers(0, 255, (len(labels), 3072), dtype=np.uint8),
                         "labels": list(labels)}, f)
    with open(d / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(n_classes)]}, f)
    return d


class _Evil:
    """Unpickling this calls open(path, "w"): it creates a file (as os.system would run a command)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize("victim", ["data_batch_1", "batches.meta"])
@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_cifar_pickle_cannot_run_code(tmp_path, victim, protocol):
    d = _cifar_dir(tmp_path)
    probe = tmp_path / "probe"  # the payload works: plain pickle would create a file
    pickle.loads(pickle.dumps({"data": _Evil(probe)}, protocol=protocol))
    assert probe.exists()
    marker = tmp_path / "pwned"
    with open(d / victim, "wb") as f:
        pickle.dump({"data": _Evil(marker), "labels": [0], "label_names": _Evil(marker)}, f, protocol=protocol)
    with pytest.raises(ValueError, match=f"{victim}: not a CIFAR data file .*refused to load (io|builtins).open"):
        load_arrays("cifar10", tmp_path)
    assert not marker.exists()


def test_cifar_missing_batch_is_named(tmp_path):
    d = _cifar_dir(tmp_path)
    (d / "data_batch_3").unlink()
    with pytest.raises(DatasetNotFound, match=f"{re.escape(str(d / 'data_batch_3'))}: missing"):
        load_arrays("cifar10", tmp_path)


def test_cifar_labels_and_class_count_are_checked(tmp_path):
    _cifar_dir(tmp_path, labels=(0, 1, 2, 12))
    with pytest.raises(ValueError, match=r"labels range over 0..12, but the data set has 10 classes"):
        load_arrays("cifar10", tmp_path)
    _cifar_dir(tmp_path / "five", n_classes=5)
    with pytest.raises(ValueError, match="cifar10 has 10 classes, but this data has 5"):
        load_arrays("cifar10", tmp_path / "five")


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
    with pytest.raises(DataError, match=f"{re.escape(str(p))}: idx file is truncated \\(84 of 2352 values"):
        load_arrays("mnist", tmp_path)
    p.write_bytes(b"<html>404</html>")
    with pytest.raises(DataError, match=f"{re.escape(str(p))}: not an MNIST idx file"):
        load_arrays("mnist", tmp_path)
    p.unlink()
    with pytest.raises(DatasetNotFound, match=f"{re.escape(str(raw))}: missing t10k-images-idx3-ubyte"):
        load_arrays("mnist", tmp_path)


def test_mnist_gz_and_stale_processed_files(tmp_path):
    """.gz idx files (all or some) read like plain ones; torchvision's legacy processed/*.pt
    files (which its MNIST would prefer) are not read; a broken .gz is named."""
    plain = tmp_path / "plain" / "MNIST" / "raw"
    plain.mkdir(parents=True)
    rng = np.random.default_rng(2)
    for split, n in (("train", 4), ("t10k", 2)):
        _idx(plain / f"{split}-images-idx3-ubyte", rng.integers(0, 255, (n, 28, 28)))
        _idx(plain / f"{split}-labels-idx1-ubyte", np.arange(n))
    want = load_arrays("mnist", tmp_path / "plain")
    for some in (False, True):  # all four .gz, or two .gz beside two plain files
        raw = tmp_path / f"gz{some}"
        raw.mkdir()
        for i, f in enumerate(sorted(plain.iterdir())):
            if some and i % 2:
                (raw / f.name).write_bytes(f.read_bytes())
            else:
                (raw / f"{f.name}.gz").write_bytes(gzip.compress(f.read_bytes()))
        got = load_arrays("mnist", raw)
        for a, b in zip(want, got):
            assert np.array_equal(a.images, b.images) and np.array_equal(a.labels, b.labels)
    processed = plain.parent / "processed"
    processed.mkdir()
    for name in ("training.pt", "test.pt"):
        torch.save((torch.zeros(1, 28, 28, dtype=torch.uint8), torch.zeros(1, dtype=torch.int64)), processed / name)
    tr, te = load_arrays("mnist", tmp_path / "plain")
    assert np.array_equal(tr.images, want[0].images) and np.array_equal(te.labels, want[1].labels)
    bad = tmp_path / "gzFalse" / "train-labels-idx1-ubyte.gz"
    bad.write_bytes(b"not gzip")
    with pytest.raises(DataError, match=f"{re.escape(str(bad))}: not readable"):
        load_arrays("mnist", tmp_path / "gzFalse")


def test_mnist_counts_and_labels_are_checked(tmp_path):
    """10k labels for 60k images trained silently at chance level; now it is an error."""
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    _idx(raw / "train-images-idx3-ubyte", np.zeros((6, 28, 28)))
    _idx(raw / "train-labels-idx1-ubyte", np.arange(4))
    _idx(raw / "t10k-images-idx3-ubyte", np.zeros((3, 28, 28)))
    _idx(raw / "t10k-labels-idx1-ubyte", np.arange(3))
    with pytest.raises(ValueError, match=r"\(train split\): 6 images but 4 labels"):
        load_arrays("mnist", tmp_path)
    _idx(raw / "train-labels-idx1-ubyte", np.array([0, 1, 2, 3, 4, 11]))
    with pytest.raises(ValueError, match=r"\(train split\): labels range over 0..11, but the data set has 10"):
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
    with pytest.raises(DataError, match="unknown dataset 'imagenet'; known: cifar10"):
        load_arrays("imagenet", tmp_path)


def test_bad_input_errors_are_resprune_errors(tmp_path):
    """The command line catches resprune's own errors only: every bad-input error is one."""
    tr, _ = load_arrays("digits")
    small = type(tr)(tr.images[:10], tr.labels[:10], tr.classes)
    for call in (lambda: load_arrays("imagenet"), lambda: load_arrays("cifar10", tmp_path / "nope"),
                 lambda: DeviceLoader(tr, 0), lambda: DeviceLoader(small, 64, train=True)):
        with pytest.raises(ResPruneError):
            call()


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


def test_loader_from_data_config():
    """A run's loaders come from its DataConfig whole: the same batches as spelling it out."""
    from resprune.config import DataConfig

    tr, te = load_arrays("digits")
    cfg = DataConfig(batch_size=100, eval_batch_size=300, pad=2, flip=False)
    a = DeviceLoader.from_config(tr, cfg, train=True, seed=3)
    b = DeviceLoader(tr, 100, train=True, augment=True, pad=2, flip=False, seed=3)
    for (xa, ya), (xb, yb) in zip(a, b, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    mean, std = a.mean_std
    ev = DeviceLoader.from_config(te, cfg, train=False, mean=mean, std=std)
    assert (ev.batch_size, ev.train, ev.augment, len(ev)) == (300, False, False, 2)
    assert torch.equal(ev.mean, a.mean) and not torch.equal(ev.mean, DeviceLoader(te, 300).mean)
    assert (DataConfig().pad, DataConfig().flip) == (DeviceLoader(tr, 1).pad, DeviceLoader(tr, 1).flip)


@pytest.mark.slow
@pytest.mark.skipif(not CIFAR_ARCHIVE.is_file(), reason="set RESPRUNE_TEST_CIFAR10 to a CIFAR-10 ImageFolder archive")
def test_real_cifar10_archive():
    tr, te = load_arrays("cifar10", CIFAR_ARCHIVE)
    assert tr.images.shape == (50000, 32, 32, 3) and te.images.shape == (10000, 32, 32, 3)
    assert tr.classes[:3] == ["airplane", "automobile", "bird"]
    assert np.bincount(te.labels).tolist() == [1000] * 10
