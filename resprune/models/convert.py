"""``convert_``: turn every eligible Conv2d → BatchNorm2d pair of any CNN into a ResConv2d.

The pairs are found on a ``torch.fx`` trace: a conv node whose only user is a BatchNorm2d
node. The conv module is replaced by a :class:`~resprune.layers.ResConv2d` that carries the
conv and BN weights, and the BN module by ``nn.Identity``. The ResConv is built with
``act=False``: a ReLU that followed the BN in the original graph still follows it, so the
ReLU is neither duplicated nor lost, and at ``s = 0`` the layer computes ``P(x)`` exactly.

Conversion adds a shortcut, so it changes what the network computes: it is meant to be
followed by (sparse) training. A conv whose BN output is added to another tensor (the last
conv of a residual branch, a projection shortcut) is not converted: a shortcut of its own
would add the block input a second time (``2x`` where the block computed ``x``, activations
growing ~2× per block; a torchvision ResNet-18 converted that way diverged at once in
training), so a residual net's removable layers are the first convs of its blocks. Other
convs that cannot be converted are logged at WARNING level; :func:`conversion_plan` returns
all of them with the reason. ResConv2d layers already there are left alone, so converting
twice changes nothing.

A model that does not come from :func:`resprune.create_model` gets an architecture record
here (``model.resprune_arch``, an :class:`~resprune.models.arch.ArchRecord` with factory
``"user"``): from then on pruning and fusion are recorded too, so :func:`resprune.save` can
write it and ``resprune.load(path, model=YourNet())`` replays them on a fresh instance
(docs/own-model.md).
"""

from __future__ import annotations

import logging
import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch import nn

from ..layers import ResConv2d
from .arch import ArchRecord

logger = logging.getLogger(__name__)

__all__ = ["ConversionPlan", "conversion_plan", "convert_", "find_conv_bn_pairs"]


@dataclass
class ConversionPlan:
    """Which convs would be converted (``pairs``: conv name → BN name) and which not, why."""

    pairs: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)


RESIDUAL_END = ("its BatchNorm output is added to another tensor (a residual branch's last conv or a "
                "projection shortcut): a shortcut of its own would add the block input twice (docs/own-model.md); "
                "left as conv+BN, folded by fuse")


def _conv_ineligible(conv: nn.Conv2d) -> str | None:
    k = conv.kernel_size
    pad = conv.padding
    if conv.groups != 1:
        return f"groups={conv.groups} (only groups=1 has a Dirac shortcut kernel here)"
    if k[0] != k[1] or k[0] % 2 == 0:
        return f"kernel {k} is not square and odd"
    if conv.dilation != (1, 1):
        return f"dilation {conv.dilation}"
    if isinstance(pad, str) or pad != (k[0] // 2, k[1] // 2):
        return f"padding {pad} is not kernel//2, the shortcut would not align"
    if conv.stride[0] != conv.stride[1]:
        return f"stride {conv.stride} differs between height and width"
    if conv.padding_mode != "zeros":
        return f"padding_mode {conv.padding_mode!r}"
    return None


class _Tracer(fx.Tracer):
    """A tracer that does not look inside ResConv2d layers (already converted)."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, ResConv2d) or super().is_leaf_module(m, module_qualified_name)


def find_conv_bn_pairs(model: nn.Module) -> ConversionPlan:
    """Trace ``model`` with torch.fx and list conv→BN pairs (eligibility not checked)."""
    return _trace_pairs(model)[0]


_ADDS = {operator.add, operator.iadd, torch.add}


def _feeds_add(node: fx.Node) -> bool:
    """Whether ``node`` is added to another tensor (a residual sum) by one of its users."""
    for u in node.users:
        is_add = (u.op == "call_function" and u.target in _ADDS) or (u.op == "call_method" and u.target in ("add", "add_"))
        if is_add and sum(isinstance(a, fx.Node) for a in u.args[:2]) == 2:
            return True
    return False


def _trace_pairs(model: nn.Module) -> tuple[ConversionPlan, set[str]]:
    """The conv→BN pairs, and the convs among them whose BN output is added to another
    tensor (the last conv of a residual branch, or a projection shortcut)."""
    plan = ConversionPlan()
    graph = _Tracer().trace(model)
    uses: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            uses[node.target] = uses.get(node.target, 0) + 1
    residual: set[str] = set()
    for node in graph.nodes:
        if node.op != "call_module" or type(model.get_submodule(node.target)) is not nn.Conv2d:
            continue
        users = list(node.users)
        bn_node = users[0] if len(users) == 1 else None
        if (
            bn_node is None
            or bn_node.op != "call_module"
            or not isinstance(model.get_submodule(bn_node.target), nn.BatchNorm2d)
        ):
            plan.skipped[node.target] = "not followed by a BatchNorm2d that only it feeds"
            continue
        if uses[node.target] > 1 or uses[bn_node.target] > 1:
            plan.skipped[node.target] = "conv or BN module is called more than once"
            continue
        plan.pairs[node.target] = bn_node.target
        if _feeds_add(bn_node):
            residual.add(node.target)
    return plan, residual


def conversion_plan(model: nn.Module) -> ConversionPlan:
    """What :func:`convert_` would do to ``model``, without changing it."""
    try:
        plan, residual = _trace_pairs(model)
    except Exception as exc:  # fx cannot trace data-dependent control flow
        raise RuntimeError(
            f"convert_: torch.fx could not trace {type(model).__name__} ({exc}); "
            "convert its traceable submodules one by one instead"
        ) from exc
    for conv_name in list(plan.pairs):
        conv = model.get_submodule(conv_name)
        bn = model.get_submodule(plan.pairs[conv_name])
        why = RESIDUAL_END if conv_name in residual else _conv_ineligible(conv)
        if why is None and (not bn.affine or not bn.track_running_stats):
            why = "BatchNorm2d without affine parameters or running statistics"
        if why is not None:
            plan.skipped[conv_name] = why
            del plan.pairs[conv_name]
    return plan


def convert_(model: nn.Module) -> nn.Module:
    """Convert every eligible Conv2d → BatchNorm2d pair of ``model`` into a ResConv2d, in place.

    Returns the model. Skipped convs are logged with their reason (those that end a
    residual branch, left out by design, only counted); use
    :func:`conversion_plan` to get them as data.

    Example:
        >>> import torchvision, resprune as rp
        >>> m = rp.convert_(torchvision.models.resnet18(num_classes=10))
        >>> sum(isinstance(x, rp.ResConv2d) for x in m.modules())  # stem + every block's first conv
        9
    """
    plan = conversion_plan(model)
    record = ArchRecord.of(model)
    edit = record.edit_before(model) if record is not None else None
    for conv_name, bn_name in plan.pairs.items():
        conv: nn.Conv2d = model.get_submodule(conv_name)
        bn: nn.BatchNorm2d = model.get_submodule(bn_name)
        rc = ResConv2d(
            conv.in_channels, conv.out_channels, conv.kernel_size[0], conv.stride[0],
            act=False, shortcut=True, bias=conv.bias is not None,
        ).to(device=conv.weight.device, dtype=conv.weight.dtype)
        rc.conv.load_state_dict(conv.state_dict())
        rc.bn.load_state_dict(bn.state_dict())
        rc.bn.eps, rc.bn.momentum = bn.eps, bn.momentum
        model.set_submodule(conv_name, rc)
        model.set_submodule(bn_name, nn.Identity())
    residual = [n for n, why in plan.skipped.items() if why == RESIDUAL_END]
    for name, why in plan.skipped.items():
        if why != RESIDUAL_END:
            logger.warning("convert_: left %s as it is: %s", name, why)
    if residual:
        logger.debug("convert_: left as conv+BN (residual branch ends, projection shortcuts): %s", ", ".join(residual))
    logger.info("convert_: %d convs → ResConv2d, %d skipped%s", len(plan.pairs), len(plan.skipped),
                f" ({len(residual)} by design: they end a residual branch)" if residual else "")
    if record is None:  # a model of the user's own: record from here on (see the module docstring)
        cls = type(model)
        record = ArchRecord.attach(model, "user", user_class=f"{cls.__module__}.{cls.__qualname__}")
    record.append(model, ["convert"], edit)
    return model
