"""Small helpers the layer-parallel benchmarks share (imported by ``benchmarks/engines.py``).

- :func:`torchrun`: run a script as ``P`` local ranks (``torch.distributed.run --standalone``,
  gloo, one thread per rank) and return the JSON that rank 0 printed after a tag;
- :func:`hop_seconds` / :func:`fit_hop`: one message hop between ranks 0 and 1 (ping-pong / 2)
  and the latency + bytes/bandwidth line through several sizes;
- :func:`physical_cores`: what "oversubscribed" is measured against;
- :func:`header`: the header every report starts with (hardware from
  :func:`resprune.util.hardware`, torch version, date, command line, load, run count);
- :func:`subset`: a seeded subset of a data set;
- :func:`on_threads`: ``fn(0), ..., fn(n - 1)`` on ``n`` threads (simulated ranks);
- :func:`write_report`: the markdown and JSON of a report, written atomically;
  :func:`print_report`: a markdown report printed and appended to a file.

Scripts import it as ``from _common import ...`` after putting ``benchmarks/`` on ``sys.path``.
"""

from __future__ import annotations

import json
import os
import shlex
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import torch

from resprune.util import atomic_write, hardware


def torchrun(script: str, nproc: int, args: list[str], tag: str = "BENCH ", timeout: float = 1800) -> dict:
    """Run ``python -m torch.distributed.run --standalone --nproc_per_node nproc script args``
    (``OMP_NUM_THREADS=1``) and return the JSON of the first stdout line starting with ``tag``
    plus ``job_s`` (wall seconds of the whole job); raise ``RuntimeError`` with the output's
    tail when the job fails."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           script, *args]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    line = [ln for ln in r.stdout.splitlines() if ln.startswith(tag)]
    if r.returncode != 0 or not line:
        raise RuntimeError(f"{shlex.join(cmd)} failed (rc {r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    out = json.loads(line[0][len(tag):])
    out["job_s"] = time.perf_counter() - t0
    return out


def hop_seconds(numel: int, reps: int = 20, skip: int = 5) -> float:
    """Median seconds of one hop of a float32 tensor of ``numel`` elements from rank 0 to rank
    1 (ping-pong / 2); collective over the default group (ranks > 1 only join the barriers)."""
    import torch.distributed as dist

    buf, hops = torch.zeros(max(1, numel)), []
    for _ in range(reps):
        dist.barrier()
        t0 = time.perf_counter()
        if dist.get_rank() == 0:
            dist.send(buf, 1)
            dist.recv(buf, 1)
        elif dist.get_rank() == 1:
            dist.recv(buf, 0)
            dist.send(buf, 0)
        hops.append((time.perf_counter() - t0) / 2)
    return statistics.median(hops[skip:])


def fit_hop(points: dict[int, float]) -> dict[str, float]:
    """Least-squares ``hop(bytes) = latency + bytes / bandwidth`` through ``{bytes: seconds}``
    (latency and 1/bandwidth clipped at 0)."""
    if not points:
        return {"latency_s": 0.0, "s_per_byte": 0.0}
    xs, ys = list(points), list(points.values())
    if len(xs) == 1:
        return {"latency_s": ys[0], "s_per_byte": 0.0}
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    var = sum((x - mx) ** 2 for x in xs)
    slope = max(0.0, sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var) if var else 0.0
    return {"latency_s": max(0.0, my - slope * mx), "s_per_byte": slope}


def hop_time(fit: dict[str, float], nbytes: float) -> float:
    """Seconds of one hop of ``nbytes`` by the :func:`fit_hop` line."""
    return fit["latency_s"] + fit["s_per_byte"] * nbytes


def physical_cores() -> int:
    """Physical cores (distinct ``physical id``/``core id`` pairs of /proc/cpuinfo; the
    logical count where that file says nothing)."""
    pairs, phys = set(), "0"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, val = line.partition(":")
            if key.strip() == "physical id":
                phys = val.strip()
            elif key.strip() == "core id":
                pairs.add((phys, val.strip()))
    except OSError:
        pass
    return len(pairs) or os.cpu_count() or 1


def header(title: str, runs: str, argv: list[str] | None = None) -> tuple[list[str], dict[str, Any]]:
    """Markdown header lines and the same facts as a dict: hardware (and physical cores),
    torch, UTC date, the command line, the load average now and ``runs`` (what was run how
    often). Call it when the measurement starts."""
    cmd = shlex.join([Path(sys.executable).name, *(sys.argv if argv is None else argv)])
    facts = {"title": title, "date_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "hardware": hardware(),
             "physical_cores": physical_cores(), "torch": torch.__version__, "command": cmd,
             "loadavg_start": list(os.getloadavg()), "runs": runs}
    return header_lines(facts), facts


def header_lines(facts: dict[str, Any]) -> list[str]:
    """The markdown header of :func:`header`'s ``facts`` (also when re-printed from JSON)."""
    hw = facts["hardware"]
    return [f"# {facts['title']}", "",
            f"- Date: {facts['date_utc']}; command: `{facts['command']}`",
            f"- Hardware: {hw['cpu']}, {hw['cores']} logical / {facts.get('physical_cores', '?')} physical cores "
            f"({hw['machine']}); Python {hw['python']}, torch {hw['torch']}"
            + (f", GPU {hw['gpu']}" if "gpu" in hw else ""),
            f"- Load average (1/5/15 min) at the start: {_loads(facts['loadavg_start'])}"
            + (f", at the end: {_loads(facts['loadavg_end'])}" if "loadavg_end" in facts else "")
            + (f"; wall time {facts['wall_s']:.0f} s" if "wall_s" in facts else ""),
            f"- Runs: {facts['runs']}"]


def _loads(v: list[float]) -> str:
    return " / ".join(f"{x:.2f}" for x in v)


FACT_KEYS = ("title", "date_utc", "hardware", "physical_cores", "torch", "command", "loadavg_start", "loadavg_end",
             "wall_s", "runs")


def subset(ds, n: int, seed: int):
    """The first ``n`` images of a seeded permutation of ``ds`` (an ``ArrayDataset``), in their
    original order; all of ``ds`` for ``n <= 0`` (what ``mgrit_study.py`` draws)."""
    import numpy as np

    from resprune.data.sources import ArrayDataset

    if n <= 0 or n >= len(ds):
        return ds
    idx = np.sort(np.random.RandomState(seed).permutation(len(ds))[:n])
    return ArrayDataset(ds.images[idx], ds.labels[idx], ds.classes)


def on_threads(n: int, fn: Callable[[int], Any]) -> list[Any]:
    """``[fn(0), ..., fn(n - 1)]``, each call on a thread of its own (``n`` ranks of a
    ``ThreadGroup``); re-raise the first exception a call raised."""
    out: list[Any] = [None] * n
    errs: list[BaseException] = []

    def work(k: int) -> None:
        try:
            out[k] = fn(k)
        except BaseException as exc:  # re-raised below
            errs.append(exc)

    threads = [threading.Thread(target=work, args=(k,), daemon=True) for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errs:
        raise errs[0]
    return out


def print_report(markdown: str, append_to: str | os.PathLike | None) -> None:
    """Print ``markdown`` and, when ``append_to`` is given, append it (and a newline) there."""
    print(markdown)
    if append_to:
        with open(append_to, "a") as f:
            f.write(markdown + "\n")


def write_report(md_path: str | os.PathLike, markdown: str, data: dict) -> tuple[Path, Path]:
    """Write ``markdown`` to ``md_path`` and ``data`` to the same name with ``.json``."""
    md = Path(md_path)
    js = md.with_suffix(".json")
    with atomic_write(md) as tmp:
        tmp.write_text(markdown if markdown.endswith("\n") else markdown + "\n")
    with atomic_write(js) as tmp:
        tmp.write_text(json.dumps(data, indent=1, default=float))
    return md, js
