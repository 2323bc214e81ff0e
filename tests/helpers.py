"""Shared test helpers."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import torch
from torch import nn

import resprune as rp


@torch.no_grad()
def randomize_(model: nn.Module, seed: int = 0, scales: bool = True) -> nn.Module:
    """Random BN statistics and affine parameters (RepVGG's trick: default BN is nearly the
    identity and would hide fusion errors) and random layer scales."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.3)
            m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
            m.weight.copy_((torch.rand(n, generator=g) + 0.5) * torch.sign(torch.randn(n, generator=g)))
            m.bias.copy_(torch.randn(n, generator=g) * 0.3)
        if scales and isinstance(m, rp.ResConv2d):
            m.scale.copy_(torch.rand((), generator=g) * 1.5 - 0.5)
    return model


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a − b| / max |b|."""
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def count_convs_run(model: nn.Module, x: torch.Tensor) -> int:
    """How many nn.Conv2d forwards one call of ``model(x)`` runs."""
    n = [0]
    hooks = [m.register_forward_hook(lambda *a: n.__setitem__(0, n[0] + 1))
             for m in model.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return n[0]


def run_threads(P, fn):
    """Run ``fn(rank, comm)`` on P simulated ranks (a ``ThreadGroup``); re-raise the first failure."""
    from resprune.parallel.comm import ThreadGroup

    g, out, errs = ThreadGroup(P), [None] * P, []

    def work(r):
        try:
            torch.set_num_threads(1)
            out[r] = fn(r, g.comm(r))
        except BaseException as e:  # pragma: no cover - reported below
            errs.append(e)

    th = [threading.Thread(target=work, args=(r,)) for r in range(P)]
    for t in th:
        t.start()
    for t in th:
        t.join(timeout=120)
    if errs:
        raise errs[0]
    late = [r for r, t in enumerate(th) if t.is_alive()]
    if late:  # a starved machine, or a rank waiting for a message that never comes
        raise TimeoutError(f"simulated ranks {late} of {P} still running after the 120 s join timeout")
    return out


class RankChecks:
    """The set-up and bookkeeping every torchrun test worker shares: ``init_distributed``
    (gloo on CPU), one intra-op thread, and ``check(name, ok, detail)`` printing one
    ``RESULT PASS|FAIL P=world name: detail`` line on rank 0 (what the tests parse).
    ``exit_code`` is 1 when any check failed on this rank."""

    def __init__(self, timeout_s: int = 120) -> None:
        from resprune.parallel import init_distributed

        self.rank, self.world, _, _ = init_distributed(timeout_s=timeout_s)
        torch.set_num_threads(1)
        self.failures: list[str] = []

    def __call__(self, name: str, ok: bool, detail: str) -> None:
        if self.rank == 0:
            print(f"RESULT {'PASS' if ok else 'FAIL'} P={self.world} {name}: {detail}", flush=True)
        if not ok:
            self.failures.append(name)

    @property
    def exit_code(self) -> int:
        return 1 if self.failures else 0


def run_rank(main) -> None:
    """The ``__main__`` of a torchrun worker: exit code from what ``main`` did (an exception
    is 1), then ``finalize`` (flush, destroy the process group, ``os._exit``: gloo's exit
    crash cannot turn a passing rank into a failing one)."""
    import traceback

    from resprune.parallel import finalize

    code = 1
    try:
        code = main()
    except Exception:
        traceback.print_exc()
        code = 1
    finalize(code)


def blocked_env(shim: Path, names: tuple[str, ...] = ("torch", "resprune")) -> dict:
    """Environment whose Python cannot import ``names`` (failing fake packages first on the
    path), for checking that the export/ tools run without torch or resprune."""
    for name in names:
        (shim / name).mkdir()
        (shim / name / "__init__.py").write_text(f"raise ImportError('{name} is blocked: export/ must run without it')\n")
    env = {**os.environ, "PYTHONPATH": str(shim) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    probe = subprocess.run([sys.executable, "-c", "import torch"], env=env, capture_output=True, text=True)
    assert probe.returncode != 0 and "blocked" in probe.stderr  # the shim works
    return env
