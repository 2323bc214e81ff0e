"""Finding, decoding and caching datasets as uint8 arrays.

Supported sources (DESIGN.md §6):

* ``cifar10`` / ``cifar100``: torchvision's on-disk format (``cifar-10-batches-py``,
  ``cifar-100-python``) or an ImageFolder tree (``train/<class>/*``, ``test/<class>/*``),
  or a ``.tar.gz`` of such a tree (read straight from the archive);
* ``mnist``: torchvision's raw idx files (``MNIST/raw/*-ubyte``, optionally ``.gz``);
* ``imagefolder``: any ``train/<class>``, ``test/<class>`` tree;
* ``digits``: the 1,797 real 8×8 handwritten digits that ship inside scikit-learn
  (upsampled to 16×16), the built-in data set: no download, no data folder.

MNIST files and ImageFolder trees are read with torchvision's ``MNIST`` and ``ImageFolder``
(which never download here), wrapped so that a missing, truncated or unreadable file is a
:class:`DatasetNotFound` or :class:`DataError` naming it. CIFAR pickles are read by our own
restricted unpickler (torchvision's CIFAR classes unpickle without restriction).

The data folder comes from ``data_dir`` or the ``RESPRUNE_DATA`` environment variable.
Decoded images are cached as ``.npz`` under ``RESPRUNE_CACHE`` (default
``~/.cache/resprune``), keyed by a hash of the source files' names, sizes and modification
times, so a changed source is decoded again.

Images come back as ``uint8`` arrays of shape (N, H, W, C) with int64 labels.

Data files are untrusted input (DESIGN.md §6): CIFAR pickles are read with a restricted
unpickler that builds numpy arrays, lists, dicts, bytes, str and int and nothing else, and
every split is checked before training (images and labels counted alike, labels within the
classes, the class count of a named data set) with :class:`DataError` naming the problem.
"""

from __future__ import annotations

import codecs
import contextlib
import gzip
import hashlib
import io
import logging
import math
import os
import pickle
import shutil
import tarfile
import tempfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np

from ..errors import ResPruneError
from ..util import atomic_write

logger = logging.getLogger(__name__)

__all__ = ["ArrayDataset", "DatasetNotFound", "DataError", "load_arrays", "check_data", "DATASETS",
           "resolve_data_dir", "NUM_CLASSES"]

DATASETS = ("cifar10", "cifar100", "mnist", "imagefolder", "digits")
IMG_EXT = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
NUM_CLASSES = {"cifar10": 10, "cifar100": 100, "mnist": 10, "digits": 10}  # of the named data sets
IN_CHANS = {"cifar10": 3, "cifar100": 3, "mnist": 1, "digits": 1}  # image channels of the named data sets


class DatasetNotFound(ResPruneError, FileNotFoundError):
    """No usable copy of the data set where we looked."""


class DataError(ResPruneError, ValueError):
    """Data that is there but wrong: unreadable files, mismatched counts, bad labels."""


@dataclass
class ArrayDataset:
    images: np.ndarray  # uint8 (N, H, W, C)
    labels: np.ndarray  # int64 (N,)
    classes: list[str]

    def __len__(self) -> int:
        return len(self.labels)


def resolve_data_dir(data_dir: str | os.PathLike | None) -> Path | None:
    d = data_dir or os.environ.get("RESPRUNE_DATA")
    return Path(d).expanduser() if d else None


def _cache_dir() -> Path:
    return Path(os.environ.get("RESPRUNE_CACHE", Path.home() / ".cache" / "resprune")).expanduser()


def _fingerprint(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in sorted(paths):
        st = p.stat()
        h.update(f"{p}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:20]


def _cached(key: str, build) -> tuple[ArrayDataset, ArrayDataset]:
    path = _cache_dir() / f"{key}.npz"
    if path.is_file():
        try:
            z = np.load(path, allow_pickle=False)
            classes = [str(c) for c in z["classes"]]
            return (ArrayDataset(z["xtr"], z["ytr"], classes), ArrayDataset(z["xte"], z["yte"], classes))
        except Exception as exc:  # a damaged cache is rebuilt, never trusted
            logger.warning("ignoring unreadable cache %s: %s", path, exc)
    tr, te = build()
    with atomic_write(path) as tmp, open(tmp, "wb") as f:  # a file object: np.savez would append .npz to a name
        np.savez(f, xtr=tr.images, ytr=tr.labels, xte=te.images, yte=te.labels, classes=np.array(tr.classes))
    return tr, te


# ----------------------------------------------------------------------------- ImageFolder
def _rgb(src: str | os.PathLike | IO[bytes]) -> np.ndarray:
    """Decode one image (a path or an open file) to a uint8 (H, W, 3) array."""
    from PIL import Image

    with Image.open(src) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8)


def _split_from_entries(entries: list[tuple[str, str, Callable[[], np.ndarray]]], classes: list[str],
                        where: str) -> ArrayDataset:
    """Decode ``(class name, shown name, decode)`` entries into a split labelled by ``classes``;
    :class:`DataError` naming a test class without training images or an unreadable image."""
    idx = {c: i for i, c in enumerate(classes)}
    unknown = sorted({cls for cls, _, _ in entries} - set(idx))
    if unknown:
        raise DataError(f"{where}: test class folder(s) {', '.join(unknown)} have no training images "
                        f"(training classes: {', '.join(classes)})")
    imgs, labels = [], []
    for cls, shown, decode in entries:
        try:
            imgs.append(decode())
        except Exception as exc:  # PIL: truncated, not an image, unsupported mode; OSError: unreadable file
            raise DataError(f"{shown}: not a readable image ({type(exc).__name__}: {exc}); "
                            "remove or replace it") from exc
        labels.append(idx[cls])
    shapes = {im.shape for im in imgs}
    if len(shapes) != 1:
        raise DataError(f"{where}: images differ in size ({sorted(shapes)[:3]} ...); resize them first")
    return ArrayDataset(np.stack(imgs), np.asarray(labels, dtype=np.int64), classes)


def _image_folder(d: Path):
    """torchvision's ImageFolder over ``d/<class>/*`` (images with a suffix in ``IMG_EXT`` right
    inside a class folder, as in an archive; folders without any are no class)."""
    from torchvision.datasets import ImageFolder

    top = str(d)

    def wanted(path: str) -> bool:
        return Path(path).suffix.lower() in IMG_EXT and os.path.dirname(os.path.dirname(path)) == top

    try:
        ds = ImageFolder(top, loader=_rgb, is_valid_file=wanted, allow_empty=True)
        if ds.samples:
            return ds
    except FileNotFoundError:  # no class folder at all
        pass
    raise DatasetNotFound(f"{d}: no images in {d}/<class>/*{IMG_EXT}")


def _imagefolder(root: Path) -> tuple[ArrayDataset, ArrayDataset]:
    folders = {split: _image_folder(root / split) for split in ("train", "test")}
    classes = sorted({folders["train"].classes[t] for _, t in folders["train"].samples})
    files = [Path(f) for ds in folders.values() for f, _ in ds.samples]
    key = f"imagefolder-{_fingerprint(files)}"

    def split(ds) -> ArrayDataset:
        entries = [(ds.classes[t], f, lambda i=i: ds[i][0]) for i, (f, t) in enumerate(ds.samples)]
        return _split_from_entries(entries, classes, str(root))

    return _cached(key, lambda: (split(folders["train"]), split(folders["test"])))


def _imagefolder_tar(archive: Path) -> tuple[ArrayDataset, ArrayDataset]:
    key = f"imagefolder-tar-{_fingerprint([archive])}"

    def build():
        entries: dict[str, list] = {"train": [], "test": []}
        try:
            with tarfile.open(archive) as tf:  # read in order: a .tar.gz cannot seek back cheaply
                for m in tf:
                    parts = Path(m.name).parts
                    if not m.isfile() or Path(m.name).suffix.lower() not in IMG_EXT or len(parts) < 3:
                        continue
                    split, cls = parts[-3], parts[-2]
                    if split in entries:
                        data = tf.extractfile(m).read()
                        entries[split].append((cls, f"{archive}:{m.name}", lambda b=data: _rgb(io.BytesIO(b))))
        except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:  # truncated, not a tar, bad gzip
            raise DataError(f"{archive}: not a readable tar archive ({type(exc).__name__}: {exc})") from exc
        if not entries["train"] or not entries["test"]:
            raise DatasetNotFound(f"{archive}: no train/<class>/* and test/<class>/* images inside")
        classes = sorted({c for c, _, _ in entries["train"]})
        return tuple(_split_from_entries(sorted(entries[s], key=lambda e: e[:2]), classes, str(archive))
                     for s in ("train", "test"))

    return _cached(key, build)


# ----------------------------------------------------------------------------- CIFAR
def _numpy_globals() -> dict[tuple[str, str], object]:
    try:
        from numpy._core import multiarray as ma, numeric as nu
    except ImportError:  # numpy < 2
        from numpy.core import multiarray as ma, numeric as nu
    out: dict[tuple[str, str], object] = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
                                          ("_codecs", "encode"): codecs.encode}
    for pkg in ("numpy.core", "numpy._core"):  # the name depends on the numpy that wrote the file
        out[(f"{pkg}.multiarray", "_reconstruct")] = ma._reconstruct
        if hasattr(nu, "_frombuffer"):
            out[(f"{pkg}.numeric", "_frombuffer")] = nu._frombuffer
    return out


class _DataUnpickler(pickle.Unpickler):
    """Builds numpy arrays, lists, dicts, bytes, str and numbers; any other global (a class, a
    function such as ``os.system``) is refused before it is looked up, so nothing runs."""

    def find_class(self, module: str, name: str):
        obj = _numpy_globals().get((module, name))
        if obj is None:
            raise pickle.UnpicklingError(f"refused to load {module}.{name}")
        return obj


def _load_pickle(path: Path) -> object:
    """Unpickle a data file with :class:`_DataUnpickler`; :class:`DataError` naming the file."""
    try:
        with open(path, "rb") as f:
            return _DataUnpickler(f, encoding="latin1").load()
    except FileNotFoundError as exc:
        raise DatasetNotFound(f"{path}: missing; the CIFAR folder {path.parent} is incomplete") from exc
    except pickle.UnpicklingError as exc:
        raise DataError(f"{path}: not a CIFAR data file ({exc}); CIFAR batches hold only arrays, lists, "
                        "bytes, str and int, nothing was executed") from exc
    except (EOFError, ValueError, TypeError, IndexError, KeyError, AttributeError, MemoryError) as exc:
        raise DataError(f"{path}: not a readable CIFAR data file (truncated or corrupt?): {exc}") from exc


def _field(d: object, key: str, path: Path):
    if not isinstance(d, dict) or key not in d:
        raise DataError(f"{path}: not a CIFAR data file (no {key!r} entry)")
    return d[key]


def _cifar_pickles(root: Path, hundred: bool) -> tuple[ArrayDataset, ArrayDataset]:
    def read(name):
        d = _load_pickle(root / name)
        try:
            x = np.asarray(_field(d, "data", root / name), dtype=np.uint8).reshape(-1, 3, 32, 32)
            y = np.asarray(_field(d, "fine_labels" if hundred else "labels", root / name), dtype=np.int64)
        except DataError:
            raise
        except (ValueError, TypeError) as exc:
            raise DataError(f"{root / name}: not a CIFAR data file ({exc})") from exc
        return x.transpose(0, 2, 3, 1), y

    if hundred:
        xtr, ytr = read("train")
        xte, yte = read("test")
        classes = _field(_load_pickle(root / "meta"), "fine_label_names", root / "meta")
    else:
        parts = [read(f"data_batch_{i}") for i in range(1, 6)]
        for i, (x, y) in enumerate(parts, 1):  # a mismatch would be hidden by concatenation
            _check_counts(f"{root / f'data_batch_{i}'}", x, y)
        xtr, ytr = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
        xte, yte = read("test_batch")
        classes = _field(_load_pickle(root / "batches.meta"), "label_names", root / "batches.meta")
    if not isinstance(classes, list) or not all(isinstance(c, (str, bytes)) for c in classes):
        raise DataError(f"{root}: the class names in the meta file are not a list of strings")
    classes = [c.decode("latin1") if isinstance(c, bytes) else c for c in classes]
    return ArrayDataset(xtr, ytr, classes), ArrayDataset(xte, yte, classes)


# ----------------------------------------------------------------------------- MNIST
MNIST_FILES = {"train-images-idx3-ubyte": 3, "train-labels-idx1-ubyte": 1,
               "t10k-images-idx3-ubyte": 3, "t10k-labels-idx1-ubyte": 1}  # name: dimensions


def _check_idx(path: Path, shown: Path, ndim: int) -> None:
    """:class:`DataError` naming ``shown`` unless ``path`` is an idx file of uint8 values in
    ``ndim`` dimensions holding exactly as many values as its header says."""
    with open(path, "rb") as f:
        head = f.read(4 + 4 * ndim)
    if len(head) < 4 + 4 * ndim or head[:4] != bytes([0, 0, 8, ndim]):
        raise DataError(f"{shown}: not an MNIST idx file of {ndim}-d uint8 data "
                        f"(header {head[:4].hex() or 'empty'})")
    dims = [int.from_bytes(head[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    have, want = path.stat().st_size - len(head), math.prod(dims)
    if have != want:
        raise DataError(f"{shown}: idx file is {'truncated' if have < want else 'longer than its header says'} "
                        f"({have} of {want} values for shape {tuple(dims)})")


def _mnist(raw: Path) -> tuple[ArrayDataset, ArrayDataset]:
    """The idx files in ``raw`` (each plain or ``.gz``; plain preferred) read by torchvision's
    MNIST; ``.gz`` files are decompressed to a temporary folder first (torchvision reads plain
    idx files only)."""
    from torchvision.datasets import MNIST

    class _Folder(MNIST):
        """torchvision's MNIST on the idx files right inside ``root`` (its own layout is
        root/MNIST/raw); the legacy processed/*.pt it would prefer are looked for in
        root/_Folder/processed, which is never there."""

        @property
        def raw_folder(self) -> str:
            return str(self.root)

    found: dict[str, Path] = {}
    for stem in MNIST_FILES:
        p = next((p for p in (raw / stem, raw / f"{stem}.gz") if p.is_file()), None)
        if p is None:
            raise DatasetNotFound(f"{raw}: missing {stem} (or {stem}.gz)")
        found[stem] = p
    with contextlib.ExitStack() as stack:
        folder = raw
        if any(p.suffix == ".gz" for p in found.values()):
            folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="resprune-mnist-")))
            for stem, p in found.items():
                try:
                    with (gzip.open if p.suffix == ".gz" else open)(p, "rb") as src, open(folder / stem, "wb") as dst:
                        shutil.copyfileobj(src, dst)
                except (OSError, EOFError) as exc:  # gzip.BadGzipFile is an OSError
                    raise DataError(f"{p}: not readable ({type(exc).__name__}: {exc})") from exc
        for stem, ndim in MNIST_FILES.items():
            _check_idx(folder / stem, found[stem], ndim)
        out = []
        for train in (True, False):
            try:
                ds = _Folder(folder, train=train, download=False)
            except (RuntimeError, ValueError, TypeError, AssertionError) as exc:
                raise DataError(f"{raw}: unreadable MNIST idx files ({type(exc).__name__}: {exc})") from exc
            x = np.ascontiguousarray(ds.data.numpy()[..., None])
            out.append(ArrayDataset(x, ds.targets.numpy().astype(np.int64), [str(i) for i in range(10)]))
    return out[0], out[1]


def _digits() -> tuple[ArrayDataset, ArrayDataset]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = d.images.astype(np.float32) / 16.0  # (1797, 8, 8) in [0, 1]
    x = np.kron(x, np.ones((2, 2), dtype=np.float32))  # 16×16, nearest-neighbour upsampling
    x = np.round(x * 255).astype(np.uint8)[..., None]
    y = d.target.astype(np.int64)
    perm = np.random.default_rng(0).permutation(len(y))  # fixed split: 80% train, 20% test
    n_tr = int(0.8 * len(y))
    tr, te = perm[:n_tr], perm[n_tr:]
    classes = [str(i) for i in range(10)]
    return ArrayDataset(x[tr], y[tr], classes), ArrayDataset(x[te], y[te], classes)


# ----------------------------------------------------------------------------- checks
def _check_counts(where: str, images: np.ndarray, labels: np.ndarray) -> None:
    if len(images) != len(labels):
        raise DataError(f"{where}: {len(images)} images but {len(labels)} labels; "
                        "the image and label files do not belong together")


def validate(name: str, train: ArrayDataset, test: ArrayDataset, where: str = "") -> None:
    """Raise :class:`DataError` unless both splits are usable: images and labels of equal
    count, at least one image, the same image shape, labels in ``0 .. len(classes) - 1``,
    and for a named data set (cifar10, cifar100, mnist, digits) its number of classes."""
    src = where or name
    for split, ds in (("train", train), ("test", test)):
        what = f"{src} ({split} split)"
        if ds.images.ndim != 4:
            raise DataError(f"{what}: images have shape {ds.images.shape}, expected (N, H, W, C)")
        _check_counts(what, ds.images, ds.labels)
        if len(ds.labels) == 0:
            raise DataError(f"{what}: no images")
        lo, hi = int(ds.labels.min()), int(ds.labels.max())
        if lo < 0 or hi >= len(ds.classes):
            raise DataError(f"{what}: labels range over {lo}..{hi}, but the data set has {len(ds.classes)} "
                            f"classes (labels 0..{len(ds.classes) - 1})")
    if train.images.shape[1:] != test.images.shape[1:]:
        raise DataError(f"{src}: train images are {train.images.shape[1:]} but test images "
                        f"{test.images.shape[1:]} (H, W, C)")
    want = NUM_CLASSES.get(name)
    if want is not None and len(train.classes) != want:
        shown = ", ".join(train.classes[:12]) + (" ..." if len(train.classes) > 12 else "")
        raise DataError(f"{src}: {name} has {want} classes, but this data has {len(train.classes)} ({shown}); "
                        "use data.dataset=imagefolder for a data set of your own")


# ----------------------------------------------------------------------------- entry
def load_arrays(name: str, data_dir: str | os.PathLike | None = None) -> tuple[ArrayDataset, ArrayDataset]:
    """(train, test) uint8 arrays of data set ``name`` found under ``data_dir``/RESPRUNE_DATA,
    checked by :func:`validate` (:class:`DataError` naming the problem)."""
    train, test = _locate(name, data_dir)()
    root = resolve_data_dir(data_dir) if name != "digits" else None
    validate(name, train, test, str(root) if root else name)
    return train, test


def check_data(name: str, data_dir: str | os.PathLike | None = None) -> None:
    """Raise :class:`DatasetNotFound` (or :class:`DataError`) when :func:`load_arrays` would,
    without reading any image: for failing early, before a run writes anything."""
    _locate(name, data_dir)


def _locate(name: str, data_dir: str | os.PathLike | None):
    """A zero-argument loader for data set ``name``, or the error saying what is missing."""
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    if name == "digits":
        return _digits
    root = resolve_data_dir(data_dir)
    if root is None:
        raise DatasetNotFound(
            f"dataset {name!r} needs a data folder: pass --data-dir DIR (or data.data_dir=DIR) "
            "or set RESPRUNE_DATA; the 'digits' dataset needs none"
        )
    if not root.exists():
        raise DatasetNotFound(f"data folder {root} does not exist (from --data-dir or RESPRUNE_DATA)")
    looked: list[str] = []

    def candidates(*subs):
        for s in subs:
            p = root / s if s else root
            looked.append(str(p))
            yield p

    if name in ("cifar10", "cifar100"):
        hundred = name == "cifar100"
        tv = "cifar-100-python" if hundred else "cifar-10-batches-py"
        marker = "train" if hundred else "data_batch_1"
        for p in candidates(tv, f"{name}/{tv}", ""):
            if (p / marker).is_file():
                return lambda p=p: _cifar_pickles(p, hundred)
        for p in candidates(name, ""):
            if (p / "train").is_dir() and (p / "test").is_dir():
                return lambda p=p: _imagefolder(p)
        if root.is_file() and root.name.endswith((".tar.gz", ".tgz", ".tar")):
            return lambda: _imagefolder_tar(root)
        what = f"{tv}/{marker} (torchvision format) or train/<class>/ + test/<class>/ (ImageFolder)"
    elif name == "mnist":
        for p in candidates("MNIST/raw", "mnist/MNIST/raw", "raw", ""):
            if any((p / f"train-images-idx3-ubyte{s}").is_file() for s in ("", ".gz")):
                return lambda p=p: _mnist(p)
        what = "MNIST/raw/train-images-idx3-ubyte (torchvision format)"
    else:  # imagefolder
        if root.is_file():
            return lambda: _imagefolder_tar(root)
        for p in candidates(""):
            if (p / "train").is_dir() and (p / "test").is_dir():
                return lambda p=p: _imagefolder(p)
        what = "train/<class>/ and test/<class>/"
    raise DatasetNotFound(f"no {name} data found: looked for {what} in {', '.join(dict.fromkeys(looked))}")
