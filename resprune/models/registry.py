"""Model registry and factory, timm style: ``@register_model`` + ``create_model(name)``.

Besides the factories registered in code, every installed package can add its own under the
``resprune.models`` entry-point group (``pyproject.toml``)::

    [project.entry-points."resprune.models"]
    my_net = "my_package.models:my_net"

``create_model("my_net")`` (and ``model.name = "my_net"`` in a recipe) then builds it, and a
checkpoint of it reloads with :func:`resprune.load` wherever the package is installed. Names
are looked up among installed packages only: a recipe or checkpoint cannot name an arbitrary
``module:function`` to import and call. A built-in name wins over an entry point of the same
name.
"""

from __future__ import annotations

import fnmatch
from importlib.metadata import EntryPoint, entry_points
from typing import Any, Callable

from torch import nn

from .arch import ArchRecord

__all__ = ["register_model", "create_model", "list_models", "is_model", "ENTRY_POINT_GROUP"]

ENTRY_POINT_GROUP = "resprune.models"
_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register a model factory under its function name."""
    name = fn.__name__
    if name in _REGISTRY:
        raise ValueError(f"model {name!r} is registered twice")
    _REGISTRY[name] = fn
    return fn


def _plugins() -> dict[str, EntryPoint]:
    """Factories that installed packages declare under :data:`ENTRY_POINT_GROUP` (not imported)."""
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name not in _REGISTRY}


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names (entry points included) matching a shell-style pattern, sorted."""
    return sorted(n for n in {*_REGISTRY, *_plugins()} if fnmatch.fnmatch(n, pattern))


def is_model(name: str) -> bool:
    return name in _REGISTRY or name in _plugins()


def _factory(name: str) -> Callable[..., nn.Module]:
    if name in _REGISTRY:
        return _REGISTRY[name]
    ep = _plugins().get(name)
    if ep is None:
        raise KeyError(f"unknown model {name!r}; registered: {', '.join(list_models())}")
    fn = ep.load()  # imports the installed package that declares it
    if not callable(fn):
        raise TypeError(f"entry point {name} = {ep.value} ({ENTRY_POINT_GROUP}) is not callable")
    return fn


def create_model(name: str, num_classes: int = 10, **kwargs: Any) -> nn.Module:
    """Build a registered model.

    The model remembers how it was built (``model.resprune_arch``, an
    :class:`~resprune.models.arch.ArchRecord`) so that :func:`resprune.save` can store the
    architecture next to the weights.

    Example:
        >>> import resprune as rp
        >>> m = rp.create_model("resnet20", num_classes=10)
        >>> sum(p.numel() for p in m.parameters()) > 0
        True
    """
    model = _factory(name)(num_classes=num_classes, **kwargs)
    ArchRecord.attach(model, f"resprune:{name}", {"num_classes": num_classes, **kwargs})
    return model
