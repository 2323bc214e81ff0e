"""Model registry and factory, timm style: ``@register_model`` + ``create_model(name)``."""

from __future__ import annotations

import fnmatch
from typing import Any, Callable

from torch import nn

__all__ = ["register_model", "create_model", "list_models", "is_model"]

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register a model factory under its function name."""
    name = fn.__name__
    if name in _REGISTRY:
        raise ValueError(f"model {name!r} is registered twice")
    _REGISTRY[name] = fn
    return fn


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching a shell-style pattern, sorted."""
    return sorted(n for n in _REGISTRY if fnmatch.fnmatch(n, pattern))


def is_model(name: str) -> bool:
    return name in _REGISTRY


def create_model(name: str, num_classes: int = 10, **kwargs: Any) -> nn.Module:
    """Build a registered model.

    The model remembers how it was built (``model.resprune_arch``) so that
    :func:`resprune.save` can store the architecture next to the weights.

    Example:
        >>> import resprune as rp
        >>> m = rp.create_model("resnet20", num_classes=10)
        >>> sum(p.numel() for p in m.parameters()) > 0
        True
    """
    if name not in _REGISTRY:
        raise KeyError(f"unknown model {name!r}; registered: {', '.join(list_models())}")
    model = _REGISTRY[name](num_classes=num_classes, **kwargs)
    model.resprune_arch = {
        "factory": f"resprune:{name}",
        "kwargs": {"num_classes": num_classes, **kwargs},
        "ops": [],
    }
    return model
