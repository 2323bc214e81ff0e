"""Start and stop processes for layer-parallel runs (torchrun, gloo on CPU, NCCL on GPU).

``resprune train RECIPE --engine mgrit --nproc 4`` re-runs itself under torchrun's agent::

    # in the CLI, before anything else, when --nproc N > 1 and not already under torchrun:
    if args.nproc > 1 and "LOCAL_RANK" not in os.environ:
        failure = relaunch_with_torchrun(args.nproc, sys.argv[1:])   # None: every rank exited 0
    # in each worker process:
    rank, world, local_rank, device = init_distributed()
    ...                          # on an error: code = record_error(line, exc)
    finalize(exit_code)          # destroy the group, flush, os._exit (never returns)

A failed launch is reported once, by the launcher, from the rank that failed first
(:func:`root_failure`): a rank that only lost its connection to a dead one exits with
:data:`PEER_LOST` and stays quiet, and every rank's error line goes to torchelastic's error
file instead of stderr, so the launcher prints one line, not one per rank plus torchrun's trace.

Example:
    >>> from resprune.parallel.launch import torchrun_command
    >>> torchrun_command(2, ["train", "r.toml", "--nproc", "2", "--engine", "mgrit"])[3:]
    ['--standalone', '--nproc_per_node', '2', '-m', 'resprune', 'train', 'r.toml', '--engine', 'mgrit']
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import re
import signal
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

__all__ = ["init_distributed", "relaunch_with_torchrun", "torchrun_command", "strip_nproc", "finalize",
           "RankFailure", "root_failure", "record_error", "is_peer_failure", "PEER_LOST", "REPORTED"]

#: Exit code of a rank that stopped because its connection to another rank broke (that rank
#: died or hung): a consequence, not a cause, so the launcher reports another rank if one failed.
PEER_LOST = 3
#: Exit code of a rank that recorded its own error line (:func:`record_error`).
REPORTED = 2
_PEER_ERROR = re.compile(r"Connection (reset|closed) by peer|Broken pipe|/gloo/")


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
    """The torchrun command line equivalent to :func:`relaunch_with_torchrun` (for the log)."""
    if nproc < 1:
        raise ValueError(f"nproc must be >= 1, got {nproc}")
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            "--nproc_per_node", str(nproc), "-m", module, *strip_nproc(argv)]


@dataclass(frozen=True)
class RankFailure:
    """The rank whose failure ended a launch, and how it ended."""

    rank: int
    world_size: int
    exitcode: int  # negative: killed by signal −exitcode
    message: str = ""  # what the rank recorded (:func:`record_error`), if anything

    def describe(self) -> str:
        """One line: what happened to which rank."""
        who = f"rank {self.rank} of {self.world_size}"
        if self.exitcode < 0:
            try:
                sig = signal.Signals(-self.exitcode).name
            except ValueError:
                sig = f"signal {-self.exitcode}"
            return f"{who} died (killed by {sig}, exit code {self.exitcode})"
        if self.exitcode == PEER_LOST:
            return f"{who} lost its connection to the other ranks ({self.message or 'no reason recorded'})"
        return self.message or f"{who} failed (exit code {self.exitcode})"


def _recorded(failure: Any) -> str:
    try:
        return str(json.loads(Path(failure.error_file).read_text())["message"])
    except (OSError, TypeError, ValueError, KeyError):
        return ""


def root_failure(failures: dict[int, Any], world_size: int) -> RankFailure:
    """The failure that started it all, from torchelastic's ``{rank: ProcessFailure}``: ranks
    that only lost a peer (:data:`PEER_LOST`) or were stopped with SIGTERM (the agent stops
    the others once one failed) come last, then the earliest, then the lowest rank."""
    rank, f = min(failures.items(), key=lambda kv: (kv[1].exitcode == PEER_LOST,
                                                    kv[1].exitcode == -signal.SIGTERM, kv[1].timestamp, kv[0]))
    return RankFailure(rank, world_size, f.exitcode, _recorded(f))


def relaunch_with_torchrun(nproc: int, argv: list[str], module: str = "resprune") -> RankFailure | None:
    """Run ``python -m MODULE ARGV`` (``--nproc`` removed) as ``nproc`` local ranks under
    torch's elastic agent in this process, as ``torchrun --standalone`` would (a free local
    port, so concurrent runs do not collide; ``OMP_NUM_THREADS=1`` for several ranks unless
    set). Returns ``None`` when every rank exited 0, else the :func:`root_failure`; the agent's
    own log lines and trace are not shown (the caller reports the failure)."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    logger.info("launching: %s", " ".join(torchrun_command(nproc, argv, module)))
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=str(uuid.uuid4()),
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.1)
    set_omp = nproc > 1 and "OMP_NUM_THREADS" not in os.environ
    if set_omp:
        os.environ["OMP_NUM_THREADS"] = "1"
    disabled = logging.root.manager.disable
    logging.disable(logging.CRITICAL)
    try:
        elastic_launch(config, sys.executable)("-m", module, *strip_nproc(argv))
        return None
    except ChildFailedError as exc:
        return root_failure(exc.failures, nproc)
    except SignalException:  # Ctrl-C or a kill of this process: the agent stopped the ranks
        raise KeyboardInterrupt from None
    finally:
        logging.disable(disabled)
        if set_omp:
            os.environ.pop("OMP_NUM_THREADS", None)


def is_peer_failure(exc: BaseException) -> bool:
    """Whether ``exc`` says the connection to another rank broke (gloo's read and write
    errors, torch's ``DistError``s), as when that rank died."""
    return isinstance(exc, getattr(dist, "DistError", ())) or (
        isinstance(exc, RuntimeError) and bool(_PEER_ERROR.search(str(exc))))


def _short(msg: str) -> str:
    """gloo's message without its source location and advice: ``Read error …: Connection reset by peer``."""
    first = re.sub(r"\[[^\]]*:\d+\] ", "", msg.strip().splitlines()[0] if msg.strip() else "")
    return first.split(". This is typically")[0].rstrip(". ")


def record_error(line: str, exc: BaseException) -> int:
    """In a rank: report ``line`` (the rank's one-line error) and return the exit code,
    :data:`PEER_LOST` when ``exc`` is a broken connection to another rank (then the recorded
    text is that connection error), else :data:`REPORTED`. Under torchrun the text goes to
    torchelastic's error file (``TORCHELASTIC_ERROR_FILE``), which the launcher reads, so the
    launch prints one line for all ranks; without one it is printed on stderr."""
    peer = is_peer_failure(exc)
    text = _short(str(exc)) if peer else line
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:
        Path(path).write_text(json.dumps({"message": text, "timestamp": int(time.time())}))
    else:
        print(line, file=sys.stderr)
    return PEER_LOST if peer else REPORTED


def finalize(code: int = 0) -> NoReturn:
    """Leave a torchrun worker: destroy the process group, flush, ``os._exit(code)``.

    After all work is done and succeeded, gloo's threads can still abort the interpreter
    during its normal shutdown (in the exit handlers), which would turn a passing rank's exit
    status into a failure. ``os._exit`` skips that shutdown, so the status is ``code`` and
    nothing else: decide it from what the rank did before calling this. Output is flushed
    first, because ``os._exit`` does not flush. For the same reason the multi-process tests
    judge each check by the ``RESULT`` lines rank 0 prints (``tests/helpers.py``), not by
    what happens at exit alone.
    """
    try:
        if dist.is_initialized():
            dist.destroy_process_group()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
