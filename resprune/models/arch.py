"""The architecture record: how a model's module tree was built, checked against the module.

``model.resprune_arch`` is an :class:`ArchRecord`: the factory (``"resprune:NAME"`` from
:func:`resprune.create_model`, ``"user"`` for a model of your own that
:func:`resprune.convert_` saw first), its keyword arguments, and the structural operations
applied since (``["convert"]``, ``["remove", [unit names]]``, ``["fuse"]``), which
:func:`resprune.load` replays on a fresh model before it loads the weights.

Each recorded operation also stores the module's *signature*: every submodule's name and
class, every state-dict key and its shape. :meth:`ArchRecord.problem` compares the module
with it, so a hand edit (a conv replaced, a layer deleted or added) is found when the next
operation is recorded or when the model is saved (:func:`resprune.save` refuses it), not
when the file is loaded. An edit that keeps every name, class, key and shape (a conv's
padding changed in place) is not seen.

Example:
    >>> import torch, resprune as rp
    >>> m = rp.create_model("resnet20")
    >>> m.resprune_arch.to_dict()
    {'factory': 'resprune:resnet20', 'kwargs': {'num_classes': 10}, 'ops': []}
    >>> m.resprune_arch.problem(m) is None
    True
    >>> m.layer1[0].conv1 = torch.nn.Conv2d(16, 16, 3, padding=1)
    >>> print(m.resprune_arch.problem(m))  # doctest: +ELLIPSIS
    the module was changed outside resprune after its construction (module 'layer1.0.conv1' is a Conv2d, ...)
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from torch import nn
from torch.nn.parameter import is_lazy

__all__ = ["ArchRecord", "Signature", "signature", "OPS"]

ATTR = "resprune_arch"
OPS = ("convert", "remove", "fuse")


@dataclass(frozen=True)
class Signature:
    """What the record checks: submodule name → class, state-dict key → shape (None: lazy)."""

    modules: dict[str, str]
    tensors: dict[str, tuple[int, ...] | None]


def _class(m: object) -> str:
    t = type(m)
    return f"{t.__module__}.{t.__qualname__}"


def signature(model: nn.Module) -> Signature:
    """The module tree and state-dict shapes of ``model``."""
    return Signature({n: _class(m) for n, m in model.named_modules()},
                     {k: None if is_lazy(v) else tuple(v.shape) for k, v in model.state_dict().items()})


def _short(cls: str) -> str:
    return cls.rpartition(".")[2]


def _first_difference(now: Signature, then: Signature) -> str | None:
    """One phrase naming the first difference of ``now`` from the recorded ``then``."""
    for name, cls in now.modules.items():
        if name not in then.modules:
            return f"module {name!r} ({_short(cls)}) is not in the record"
        if cls != then.modules[name]:
            return f"module {name!r} is a {_short(cls)}, the record has a {_short(then.modules[name])}"
    for name, cls in then.modules.items():
        if name not in now.modules:
            return f"module {name!r} ({_short(cls)}) of the record is gone"
    for key, shape in now.tensors.items():
        if key not in then.tensors:
            return f"state-dict key {key!r} is not in the record"
        was = then.tensors[key]
        if shape is not None and was is not None and shape != was:
            return f"{key!r} has shape {tuple(shape)}, the record has {tuple(was)}"
    for key in then.tensors:
        if key not in now.tensors:
            return f"state-dict key {key!r} of the record is gone"
    return None


def _op_name(op: list | None) -> str:
    return "its construction" if op is None else f"the recorded {op[0]!r} operation"


@dataclass
class ArchRecord:
    """How to rebuild a model (factory, kwargs, operations) and the check that it still does.

    On disk it is the plain dict of :meth:`to_dict` (``"class"`` only for a model of your own).
    """

    factory: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    ops: list[list] = field(default_factory=list)
    user_class: str | None = None  # "module.QualName" of a model of your own (factory "user")
    _signature: Signature | None = field(default=None, repr=False, compare=False)
    _stale: str | None = field(default=None, repr=False, compare=False)  # an edit found before an op

    # ------------------------------------------------------------------ attach, find, convert
    @classmethod
    def attach(cls, model: nn.Module, factory: str, kwargs: dict[str, Any] | None = None,
               user_class: str | None = None) -> ArchRecord:
        """A new record with no operations for ``model`` as it is now, set as ``model.resprune_arch``."""
        rec = cls(factory, dict(kwargs or {}), [], user_class)
        rec._signature = signature(model)
        setattr(model, ATTR, rec)
        return rec

    @classmethod
    def of(cls, model: nn.Module) -> ArchRecord | None:
        """``model``'s record, or None; a plain dict set by older code is turned into a record
        (without a signature: nothing to check it against until the next operation)."""
        rec = getattr(model, ATTR, None)
        if isinstance(rec, dict):
            rec = cls.from_dict(rec)
            setattr(model, ATTR, rec)
        return rec

    @classmethod
    def from_dict(cls, d: Any) -> ArchRecord:
        """The record of a checkpoint's ``"arch"`` dict; ValueError naming what is malformed."""
        if not isinstance(d, dict):
            raise ValueError(f"the architecture record is a {type(d).__name__}, not a dict")
        factory, kwargs, ops = d.get("factory", ""), d.get("kwargs", {}), d.get("ops", [])
        user_class = d.get("class")
        if not isinstance(factory, str) or not (user_class is None or isinstance(user_class, str)):
            raise ValueError(f"the architecture record's factory {factory!r} or class {user_class!r} is not a string")
        if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
            raise ValueError(f"the architecture record's kwargs are not a dict of names: {kwargs!r}")
        if not isinstance(ops, (list, tuple)) or not all(isinstance(op, (list, tuple)) and op for op in ops):
            raise ValueError(f"the architecture record's ops are not a list of operations: {ops!r}")
        for op in ops:
            if op[0] not in OPS:
                raise ValueError(f"unknown architecture operation {op[0]!r}")
            if op[0] == "remove" and (len(op) != 2 or not isinstance(op[1], (list, tuple))
                                      or not all(isinstance(n, str) for n in op[1])):
                raise ValueError(f"the 'remove' operation needs one list of unit names, got {list(op[1:])!r}")
        return cls(factory, copy.deepcopy(kwargs), [list(copy.deepcopy(op)) for op in ops], user_class)

    def to_dict(self) -> dict[str, Any]:
        """The plain dict a checkpoint stores (and :meth:`from_dict` reads)."""
        d: dict[str, Any] = {"factory": self.factory}
        if self.user_class is not None:
            d["class"] = self.user_class
        d["kwargs"] = copy.deepcopy(self.kwargs)
        d["ops"] = copy.deepcopy(self.ops)
        return d

    # ------------------------------------------------------------------ recording and checking
    def edit_before(self, model: nn.Module) -> str | None:
        """Call before a structural operation on ``model``: the first hand edit since the last
        recorded one (None when there is none), to hand to :meth:`append` afterwards."""
        if self._signature is None:
            return None
        return _first_difference(signature(model), self._signature)

    def append(self, model: nn.Module, op: list, edit_before: str | None = None) -> None:
        """Record ``op`` as done on ``model`` and take its signature. ``edit_before`` (from
        :meth:`edit_before`) marks the record stale: a replay would miss that edit."""
        if edit_before is not None and self._stale is None:
            self._stale = (f"the module was changed outside resprune before {_op_name(op)} "
                           f"({edit_before})")
        self.ops.append(list(op))
        self._signature = signature(model)

    def problem(self, model: nn.Module) -> str | None:
        """Why replaying this record would not rebuild ``model`` (one line), or None."""
        if self._stale is not None:
            return self._stale
        if self._signature is None:
            return None
        diff = _first_difference(signature(model), self._signature)
        if diff is None:
            return None
        return f"the module was changed outside resprune after {_op_name(self.ops[-1] if self.ops else None)} ({diff})"
