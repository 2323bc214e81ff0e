"""Small helpers every part of resprune shares: the hardware description of a measurement,
an atomic file write, and a context that sets a module's train/eval mode and restores it.

Like :mod:`resprune.errors` it imports nothing from resprune, so the stand-alone ``data`` and
``qmc`` packages may use it too. (``export/`` keeps its own copies: it must run without
resprune and without torch on a target device.)

Example:
    >>> import tempfile, pathlib, torch
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "a.json"
    >>> with atomic_write(p) as tmp:
    ...     _ = tmp.write_text("{}")
    >>> p.read_text()
    '{}'
    >>> m = torch.nn.BatchNorm1d(2)
    >>> with training_mode(m, False):
    ...     m.training
    False
    >>> m.training
    True
"""

from __future__ import annotations

import contextlib
import os
import platform
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["hardware", "atomic_write", "training_mode"]


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def hardware(**versions: str) -> dict[str, Any]:
    """The machine and software a number was measured on: CPU model, logical cores, torch's CPU
    capability (the vector ISA its kernels use), Python, torch (and the GPU when CUDA is available, torch's intra-op threads), plus ``versions``
    (e.g. ``numpy=np.__version__``)."""
    import torch

    info: dict[str, Any] = {"cpu": _cpu_model(), "cores": os.cpu_count(), "machine": platform.machine(),
                            "python": platform.python_version(), "torch": torch.__version__,
                            "torch_threads": torch.get_num_threads(),
                            "cpu_capability": torch.backends.cpu.get_cpu_capability()}  # AVX2 / AVX512: bf16 or not
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    info.update(versions)
    return info


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (``.NAME.tmp-PID``); when the block succeeds it
    replaces ``path`` in one rename, otherwise it is removed and ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def training_mode(module, mode: bool) -> Iterator[Any]:
    """Put ``module`` in train (``True``) or eval (``False``) mode for the block, then back in
    the mode it had."""
    was = module.training
    module.train(mode)
    try:
        yield module
    finally:
        module.train(was)
