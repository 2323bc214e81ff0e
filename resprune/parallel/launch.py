"""Start and stop processes for layer-parallel runs (torchrun, gloo on CPU, NCCL on GPU).

``resprune train RECIPE --engine mgrit --nproc 4`` is meant to re-run itself under torchrun::

    # in the CLI, before anything else, when --nproc N > 1 and not already under torchrun:
    if args.nproc > 1 and "LOCAL_RANK" not in os.environ:
        sys.exit(relaunch_with_torchrun(args.nproc, sys.argv[1:]))
    # in each worker process:
    rank, world, local_rank, device = init_distributed()
    ...
    finalize(exit_code)          # destroy the group, flush, os._exit (never returns)

Example:
    >>> from resprune.parallel.launch import torchrun_command
    >>> torchrun_command(2, ["train", "r.toml", "--nproc", "2", "--engine", "mgrit"])[3:]
    ['--standalone', '--nproc_per_node', '2', '-m', 'resprune', 'train', 'r.toml', '--engine', 'mgrit']
"""

from __future__ import annotations

import datetime
import logging
import os
import subprocess
import sys
from typing import NoReturn

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

__all__ = ["init_distributed", "relaunch_with_torchrun", "torchrun_command", "strip_nproc", "finalize"]


def init_distributed(
    backend: str | None = None, timeout_s: float = 600.0
) -> tuple[int, int, int, torch.device]:
    """Join the process group described by torchrun's environment.

    Reads ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` (and ``MASTER_ADDR``/``MASTER_PORT`` via the
    ``env://`` method). Uses NCCL and ``cuda:LOCAL_RANK`` when CUDA is available, gloo and the
    CPU otherwise (``backend`` overrides). Without torchrun's variables it initialises
    nothing and returns ``(0, 1, 0, device)``. Idempotent.

    Returns:
        ``(rank, world_size, local_rank, device)``.
    """
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available() and backend != "gloo"
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), local_rank, device
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        return 0, 1, local_rank, device
    backend = backend or ("nccl" if cuda else "gloo")
    dist.init_process_group(backend, init_method="env://",
                            timeout=datetime.timedelta(seconds=timeout_s),
                            **({"device_id": device} if cuda else {}))
    logger.info("rank %d/%d joined (%s, %s)", dist.get_rank(), dist.get_world_size(), backend, device)
    return dist.get_rank(), dist.get_world_size(), local_rank, device


def strip_nproc(argv: list[str]) -> list[str]:
    """``argv`` without ``--nproc N`` / ``--nproc=N``."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--nproc":
            skip = True
            continue
        if a.startswith("--nproc="):
            continue
        out.append(a)
    return out


def torchrun_command(nproc: int, argv: list[str], module: str = "resprune") -> list[str]:
    """The command that :func:`relaunch_with_torchrun` runs."""
    if nproc < 1:
        raise ValueError(f"nproc must be >= 1, got {nproc}")
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            "--nproc_per_node", str(nproc), "-m", module, *strip_nproc(argv)]


def relaunch_with_torchrun(nproc: int, argv: list[str], module: str = "resprune",
                           timeout_s: float | None = None) -> int:
    """Run ``python -m torch.distributed.run --standalone --nproc_per_node N -m resprune ARGV``
    (``--nproc`` removed from ``argv``) and return its exit code (124 on timeout).

    ``--standalone`` picks a free local port, so concurrent runs do not collide.
    """
    cmd = torchrun_command(nproc, argv, module)
    logger.info("launching: %s", " ".join(cmd))
    try:
        return subprocess.run(cmd, timeout=timeout_s).returncode
    except subprocess.TimeoutExpired:
        logger.error("torchrun timed out after %s s", timeout_s)
        return 124


def finalize(code: int = 0) -> NoReturn:
    """Leave a torchrun worker: destroy the process group, flush, ``os._exit(code)``.

    gloo's threads can abort the interpreter at shutdown after all work is done
    (NOTES-distributed.md); ``os._exit`` skips that shutdown. Decide ``code`` from what the
    rank did before calling this.
    """
    try:
        if dist.is_initialized():
            dist.destroy_process_group()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
