"""The few communication primitives the layer-parallel engines need, on two back ends.

:class:`DistComm` uses ``torch.distributed`` (gloo on CPU, NCCL on GPU); :class:`ThreadComm`
runs ``P`` simulated ranks as threads of one process (queues and a barrier), so the
distributed algorithm is unit-tested without ``torchrun``.

Point-to-point messages between a pair of ranks are matched in the order they are sent
(both back ends); every rank runs the same sequence of phases, so orders always agree.
Every back end counts what it sent (``sent_bytes``) and the seconds it spent blocked
(``wait_s``); engines reset both per step and report them in ``engine.stats``.
"""

from __future__ import annotations

import queue
import threading
import time

import torch
import torch.distributed as dist

__all__ = ["Comm", "DistComm", "ThreadComm", "ThreadGroup", "ReversedComm", "SingleComm", "SendHandle"]


class Comm:
    """Interface: ``rank``, ``world_size``, ``isend``, ``send_nowait``, ``recv``, ``wait``,
    ``all_reduce_sum``, ``broadcast``, ``gather_object``, ``broadcast_object``."""

    rank: int = 0
    #: seconds spent blocked in communication since the owner last reset it
    wait_s: float = 0.0
    #: bytes of tensors sent point to point since the owner last reset it
    sent_bytes: int = 0
    world_size: int = 1

    def reset_counters(self) -> None:
        """Zero ``wait_s`` and ``sent_bytes`` (engines call it at the start of a step)."""
        self.wait_s, self.sent_bytes = 0.0, 0

    def isend(self, t: torch.Tensor, dst: int) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def send_nowait(self, t: torch.Tensor, dst: int, tag: int = 0) -> "SendHandle":  # pragma: no cover
        """Start sending ``t`` and return a handle whose ``wait()`` completes this send only
        (bounded queues of outstanding sends); :meth:`wait` does not wait for it. Messages
        are matched per (source, ``tag``): streams of different tags between the same pair
        of ranks may be received in any interleaving."""
        raise NotImplementedError

    def recv(self, shape: tuple[int, ...], src: int, like: torch.Tensor,
             tag: int = 0) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def wait(self) -> None:
        """Complete every pending ``isend`` (call at the end of each phase)."""

    def all_reduce_sum(self, values: list[float]) -> list[float]:  # pragma: no cover
        raise NotImplementedError

    def broadcast(self, t: torch.Tensor, src: int) -> torch.Tensor:  # pragma: no cover
        """``t`` from ``src`` on every rank (other ranks pass a buffer of the right shape)."""
        raise NotImplementedError

    def gather_object(self, obj: object) -> list | None:  # pragma: no cover
        """Every rank's ``obj`` as a list on rank 0, ``None`` elsewhere."""
        raise NotImplementedError

    def broadcast_object(self, obj: object, src: int = 0) -> object:  # pragma: no cover
        raise NotImplementedError


class SendHandle:
    """A started send: ``wait()`` blocks until it completed (a no-op when it already did)."""

    def __init__(self, work=None, tensor: torch.Tensor | None = None, comm: "Comm | None" = None) -> None:
        self.work, self.tensor, self.comm = work, tensor, comm  # the tensor stays alive until sent

    def wait(self) -> None:
        if self.work is not None:
            t0 = time.perf_counter()
            self.work.wait()
            if self.comm is not None:
                self.comm.wait_s += time.perf_counter() - t0
            self.work = self.tensor = None


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class SingleComm(Comm):
    """One process, no communication."""

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        return list(values)

    def broadcast(self, t: torch.Tensor, src: int) -> torch.Tensor:
        return t

    def gather_object(self, obj: object) -> list | None:
        return [obj]

    def broadcast_object(self, obj: object, src: int = 0) -> object:
        return obj


class ReversedComm(Comm):
    """The same ranks in reverse order (rank ``r`` appears as ``P−1−r``): the adjoint runs
    backward in layer index, so its "time" starts on the last rank."""

    def __init__(self, base: Comm) -> None:
        self.base, self.world_size = base, base.world_size
        self.rank = base.world_size - 1 - base.rank

    def _r(self, r: int) -> int:
        return self.world_size - 1 - r

    def isend(self, t: torch.Tensor, dst: int) -> None:
        self.base.isend(t, self._r(dst))

    def send_nowait(self, t: torch.Tensor, dst: int, tag: int = 0) -> SendHandle:
        return self.base.send_nowait(t, self._r(dst), tag)

    def recv(self, shape: tuple[int, ...], src: int, like: torch.Tensor, tag: int = 0) -> torch.Tensor:
        return self.base.recv(shape, self._r(src), like, tag)

    def wait(self) -> None:
        self.base.wait()

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        return self.base.all_reduce_sum(values)

    def broadcast(self, t: torch.Tensor, src: int) -> torch.Tensor:
        return self.base.broadcast(t, self._r(src))

    def broadcast_object(self, obj: object, src: int = 0) -> object:
        return self.base.broadcast_object(obj, self._r(src))

    def gather_object(self, obj: object) -> list | None:
        """Every rank's ``obj`` in this numbering, on this numbering's rank 0 (the base's
        last rank): the base gathers on its rank 0, which then broadcasts the list."""
        parts = self.base.broadcast_object(self.base.gather_object(obj), 0)
        return parts[::-1] if self.rank == 0 else None


class DistComm(Comm):
    """``torch.distributed`` default process group (or ``group``)."""

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self._pending: list = []
        #: seconds the host spent blocked in ``recv``/``wait``/``all_reduce_sum`` (waiting for
        #: other ranks plus transfer); engines reset it per step to report idle time. With
        #: NCCL the calls are asynchronous to the host, so this under-counts GPU idle time.
        self.wait_s = 0.0
        self.sent_bytes = 0

    def _global(self, r: int) -> int:
        return r if self.group is None else dist.get_global_rank(self.group, r)

    def isend(self, t: torch.Tensor, dst: int) -> None:
        t = t.detach().contiguous()
        self.sent_bytes += _nbytes(t)
        self._pending.append((dist.isend(t, self._global(dst), group=self.group), t))

    def send_nowait(self, t: torch.Tensor, dst: int, tag: int = 0) -> SendHandle:
        t = t.detach().contiguous()
        self.sent_bytes += _nbytes(t)
        return SendHandle(dist.isend(t, self._global(dst), group=self.group, tag=tag), t, self)

    def recv(self, shape: tuple[int, ...], src: int, like: torch.Tensor, tag: int = 0) -> torch.Tensor:
        out = torch.empty(shape, dtype=like.dtype, device=like.device)
        t0 = time.perf_counter()
        dist.recv(out, self._global(src), group=self.group, tag=tag)
        self.wait_s += time.perf_counter() - t0
        return out

    def wait(self) -> None:
        t0 = time.perf_counter()
        for w, _ in self._pending:
            w.wait()
        self._pending.clear()
        self.wait_s += time.perf_counter() - t0

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        dev = torch.device("cuda", torch.cuda.current_device()) if (
            dist.get_backend(self.group) == "nccl") else torch.device("cpu")
        t = torch.tensor(values, dtype=torch.float64, device=dev)
        t0 = time.perf_counter()
        dist.all_reduce(t, group=self.group)
        out = t.tolist()
        self.wait_s += time.perf_counter() - t0
        return out

    def broadcast(self, t: torch.Tensor, src: int) -> torch.Tensor:
        t = t.contiguous()
        dist.broadcast(t, self._global(src), group=self.group)
        return t

    def gather_object(self, obj: object) -> list | None:
        out = [None] * self.world_size if self.rank == 0 else None
        dist.gather_object(obj, out, dst=self._global(0), group=self.group)
        return out

    def broadcast_object(self, obj: object, src: int = 0) -> object:
        box = [obj]
        dist.broadcast_object_list(box, self._global(src), group=self.group)
        return box[0]


class ThreadGroup:
    """Shared state of ``P`` simulated ranks: one queue per ordered pair and a barrier."""

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self.queues: dict[tuple[int, int, int], queue.Queue] = {}
        self._lock = threading.Lock()
        self.barrier = threading.Barrier(world_size)
        self.slots: list[list[float]] = [[] for _ in range(world_size)]
        self.objs: list[object] = [None] * world_size

    def queue(self, src: int, dst: int, tag: int) -> queue.Queue:
        """The message queue of one (source, destination, tag)."""
        with self._lock:
            return self.queues.setdefault((src, dst, tag), queue.Queue())

    def comm(self, rank: int) -> ThreadComm:
        return ThreadComm(self, rank)


class ThreadComm(Comm):
    """One simulated rank of a :class:`ThreadGroup`."""

    def __init__(self, group: ThreadGroup, rank: int) -> None:
        self.g, self.rank, self.world_size = group, rank, group.world_size

    def isend(self, t: torch.Tensor, dst: int) -> None:
        self.send_nowait(t, dst)

    def send_nowait(self, t: torch.Tensor, dst: int, tag: int = 0) -> SendHandle:
        self.sent_bytes += _nbytes(t)
        self.g.queue(self.rank, dst, tag).put(t.detach().clone())  # unbounded: done at once
        return SendHandle()

    def recv(self, shape: tuple[int, ...], src: int, like: torch.Tensor, tag: int = 0) -> torch.Tensor:
        t0 = time.perf_counter()
        t = self.g.queue(src, self.rank, tag).get(timeout=120)
        self.wait_s += time.perf_counter() - t0
        if tuple(t.shape) != tuple(shape):
            raise RuntimeError(f"rank {self.rank}: expected {shape} from {src}, got {tuple(t.shape)}")
        return t

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        t0 = time.perf_counter()
        self.g.slots[self.rank] = list(values)
        self.g.barrier.wait()
        out = [sum(s[i] for s in self.g.slots) for i in range(len(values))]
        self.g.barrier.wait()
        self.wait_s += time.perf_counter() - t0
        return out

    def _share(self, obj: object) -> list:
        self.g.objs[self.rank] = obj
        self.g.barrier.wait()
        out = list(self.g.objs)
        self.g.barrier.wait()
        return out

    def broadcast(self, t: torch.Tensor, src: int) -> torch.Tensor:
        return self._share(t.clone() if self.rank == src else None)[src].clone()

    def gather_object(self, obj: object) -> list | None:
        out = self._share(obj)
        return out if self.rank == 0 else None

    def broadcast_object(self, obj: object, src: int = 0) -> object:
        return self._share(obj)[src]
