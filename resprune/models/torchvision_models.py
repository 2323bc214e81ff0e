"""torchvision classifiers under the registry (``tv_resnet18``, ``tv_vgg11_bn``), so that a
recipe can name them (``model.name = "tv_resnet18"``) and a checkpoint of one reloads with
:func:`resprune.load` without any code of yours. Like the CIFAR nets, ``resconv=True`` (the
default) gives the ResConv variant (every conv → BatchNorm pair converted by
:func:`resprune.convert_`, so L1 training and pruning have scales to act on) and
``resconv=False`` the unchanged torchvision net, the baseline. Weights are never downloaded
(``weights=None``); for pretrained weights see docs/own-model.md."""

from __future__ import annotations

from torch import nn

from .convert import convert_
from .registry import register_model


def _tv(arch: str, num_classes: int, resconv: bool) -> nn.Module:
    import torchvision

    model = getattr(torchvision.models, arch)(weights=None, num_classes=num_classes)
    return convert_(model) if resconv else model


@register_model
def tv_resnet18(num_classes: int = 10, resconv: bool = True) -> nn.Module:
    """torchvision ``resnet18`` (ImageNet layout), random init; ``resconv=False``: unconverted."""
    return _tv("resnet18", num_classes, resconv)


@register_model
def tv_vgg11_bn(num_classes: int = 10, resconv: bool = True) -> nn.Module:
    """torchvision ``vgg11_bn``, random init; ``resconv=False``: unconverted."""
    return _tv("vgg11_bn", num_classes, resconv)
