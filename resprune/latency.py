"""Latency tables (``export/latency_table.py``) read on the torch side: the predicted latency
of a model, of each of its conv layers and of each removal unit on the table's device.

A table holds, per fused-conv *signature* (kernel, stride, padding, channels, input size and
what follows the conv: ``+Relu``, or ``+Add+Relu`` for the conv that ends a residual block),
the milliseconds that conv costs on one device, runtime, precision, thread count and batch
size, ``fixed_ms`` (what is not in the convolutions) and a cache penalty (ms per MB of conv
weights beyond ``cache_bytes``). The predicted latency of a model is ``fixed_ms + Σ
ms[signature] + penalty_ms_per_mb · max(0, weight MB − cache MB)`` over its conv layers
(docs/export.md); removing a unit removes its conv layers' milliseconds and weights (a
residual branch takes its ``Add`` and ``Relu`` with it, inside its ``+Add+Relu`` signature).

Example:
    >>> import resprune as rp  # doctest: +SKIP
    >>> t = rp.latency.LatencyTable.load("table.json")
    >>> t.predict(rp.create_model("resnet56"))  # ms at the table's batch size
    5.0
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import torch
from torch import nn

from .errors import ResPruneError
from .layers import ConvBN2d, ResConv2d

__all__ = ["LatencyTable", "LatencyTableError", "conv_signature", "layer_signatures", "TABLE_FORMAT"]

TABLE_FORMAT = "resprune-latency-table"
TABLE_VERSION = 1
_KEYS = ("device", "runtime", "precision", "threads", "batch", "fixed_ms", "layers", "model")


class LatencyTableError(ResPruneError, ValueError):
    """A latency table that cannot be read or does not cover a model's layers."""


def conv_signature(cin: int, cout: int, kh: int, kw: int, stride: int, pad: int, groups: int,
                   h: int, w: int, post: str) -> str:
    """The table key of a fused conv (the same string ``export/latency_table.py`` writes)."""
    g = f" g{groups}" if groups != 1 else ""
    p = f" {post}" if post else ""
    return f"Conv {kh}x{kw}/s{stride} p{pad}{g} {cin}->{cout} @{h}x{w}{p}"


def _post(name: str, layer: nn.Module, model: nn.Module) -> str:
    if isinstance(layer, ResConv2d) and not layer.shortcut and not layer.act:
        parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
        if hasattr(parent, "without_branch"):
            return "+Add+Relu"  # the gate: the block adds its shortcut and applies the ReLU
    return "+Relu" if getattr(layer, "act", False) else ""


def _one(v) -> int:
    if len(set(v)) != 1:
        raise LatencyTableError(f"latency tables cover square strides/padding only, got {v}")
    return int(v[0])


@torch.no_grad()
def layer_signatures(model: nn.Module, input_size: tuple[int, ...]) -> dict[str, str]:
    """Signature of every conv-bearing layer of ``model`` (ResConv2d, ConvBN2d, bare Conv2d),
    by layer name, for an input of ``input_size`` (the batch dimension does not matter)."""
    convs: dict[str, nn.Module] = {}
    for n, m in model.named_modules():
        if isinstance(m, (ResConv2d, ConvBN2d)):
            convs[n] = m
        elif isinstance(m, nn.Conv2d) and not any(n.startswith(o + ".") for o in convs):
            convs[n] = m
    size: dict[str, tuple[int, int]] = {}
    hooks = [m.register_forward_pre_hook(lambda _m, a, n=n: size.__setitem__(n, tuple(a[0].shape[-2:])))
             for n, m in convs.items()]
    was = model.training
    try:
        model.eval()(torch.zeros((1, *input_size[1:]), device=next(model.parameters()).device))
    finally:
        model.train(was)
        for h in hooks:
            h.remove()
    out = {}
    for n, m in convs.items():
        c = m.conv if isinstance(m, ConvBN2d) else m
        if isinstance(c.padding, str):
            raise LatencyTableError(f"{n}: padding={c.padding!r}; latency tables need explicit padding")
        out[n] = conv_signature(c.in_channels, c.out_channels, *c.kernel_size, _one(c.stride), _one(c.padding),
                                c.groups, *size[n], "" if m is c else _post(n, m, model))
    return out


class LatencyTable:
    """One table: per-signature costs (ms) on one device/runtime/precision/threads/batch."""

    def __init__(self, data: dict, source: str = "<dict>"):
        if not isinstance(data, dict) or data.get("format") != TABLE_FORMAT:
            raise LatencyTableError(f"{source}: not a latency table (format {TABLE_FORMAT!r}); make one with "
                                    "export/latency_table.py MODEL.onnx --json TABLE.json")
        missing = [k for k in _KEYS if k not in data]
        if missing or data.get("format_version", 0) > TABLE_VERSION:
            raise LatencyTableError(f"{source}: table format_version {data.get('format_version')} "
                                    f"(this resprune reads <= {TABLE_VERSION}), missing {missing}")
        bad = [s for s, e in data["layers"].items() if not math.isfinite(float(e.get("ms", math.nan)))]
        if bad or not math.isfinite(float(data["fixed_ms"])):
            raise LatencyTableError(f"{source}: non-finite costs for {bad or ['fixed_ms']}")
        self.data, self.source = data, source
        self.ms = {s: max(0.0, float(e["ms"])) for s, e in data["layers"].items()}  # noise can dip below 0
        self.bytes = {s: int(e.get("weight_bytes", 0)) for s, e in data["layers"].items()}
        self.cache = data.get("cache_bytes")
        self.penalty = max(0.0, float(data.get("penalty_ms_per_mb") or 0.0)) if self.cache is not None else 0.0

    @classmethod
    def load(cls, path: str | Path) -> "LatencyTable":
        p = Path(path)
        try:
            return cls(json.loads(p.read_text()), str(p))
        except FileNotFoundError as exc:
            raise LatencyTableError(f"{p}: no such latency table; make one with "
                                    "export/latency_table.py MODEL.onnx --json TABLE.json") from exc
        except (OSError, json.JSONDecodeError) as exc:
            raise LatencyTableError(f"{p}: cannot read the latency table: {exc}") from exc

    @property
    def fixed_ms(self) -> float:
        return float(self.data["fixed_ms"])

    def describe(self) -> dict:
        """Where the table was measured: what reports and prune.json name."""
        d, r = self.data["device"], self.data["runtime"]
        return {"table": self.source, "device": d.get("cpu_model"), "runtime": r.get("name"),
                "runtime_version": r.get("version"), "precision": self.data["precision"],
                "threads": self.data["threads"], "batch": self.data["batch"]}

    def layer_ms(self, sigs: dict[str, str]) -> dict[str, float]:
        """Cost (ms) of each named layer, from its signature; an error lists the unknown ones."""
        unknown = sorted({s for s in sigs.values() if s not in self.ms})
        if unknown:
            raise LatencyTableError(
                f"{self.source} has no entry for {len(unknown)} conv signature(s) of this model, e.g. "
                f"{unknown[:3]}; make the table from this model's ONNX file (export/latency_table.py)")
        return {n: self.ms[s] for n, s in sigs.items()}

    def layer_bytes(self, sigs: dict[str, str]) -> dict[str, int]:
        """Fused weight bytes of each named layer (the cache penalty's measure)."""
        return {n: self.bytes.get(s, 0) for n, s in sigs.items()}

    def cache_ms(self, weight_bytes: int) -> float:
        """The penalty for ``weight_bytes`` of conv weights (0 within the cache)."""
        return self.penalty * max(0, weight_bytes - (self.cache or 0)) / 2**20 if self.penalty else 0.0

    def total(self, layer_ms: dict[str, float], layer_bytes: dict[str, int]) -> float:
        """Predicted latency (ms) of a model made of these layers."""
        return self.fixed_ms + sum(layer_ms.values()) + self.cache_ms(sum(layer_bytes.values()))

    def predict(self, model: nn.Module, input_size: tuple[int, ...] | None = None) -> float:
        """Predicted latency (ms) of ``model`` at the table's batch size."""
        size = input_size or tuple(self.data["model"]["input_shape"][1:])
        sigs = layer_signatures(model, (1, *size[-3:]))
        return self.total(self.layer_ms(sigs), self.layer_bytes(sigs))

    def per_stage(self, layer_ms: dict[str, float], layer_bytes: dict[str, int]) -> dict[str, float]:
        """Milliseconds per top-level child (stage) of the model; ``fixed`` and ``cache`` (the
        penalty for weights beyond the cache) for the rest."""
        out = Counter()
        for n, v in layer_ms.items():
            out[n.split(".")[0]] += v
        return {"fixed": self.fixed_ms, "cache": self.cache_ms(sum(layer_bytes.values())), **dict(out)}
