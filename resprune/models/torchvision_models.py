"""torchvision classifiers under the registry (``tv_resnet18``, ``tv_vgg11_bn``), so that a
converted torchvision net can be rebuilt from a checkpoint: ``create_model("tv_resnet18")``
followed by :func:`resprune.convert_` is recorded and replayed by :func:`resprune.load`.
Weights are never downloaded (``weights=None``)."""

from __future__ import annotations

from torch import nn

from .registry import register_model


@register_model
def tv_resnet18(num_classes: int = 10) -> nn.Module:
    """torchvision ``resnet18`` (ImageNet layout), random init."""
    import torchvision

    return torchvision.models.resnet18(weights=None, num_classes=num_classes)


@register_model
def tv_vgg11_bn(num_classes: int = 10) -> nn.Module:
    """torchvision ``vgg11_bn``, random init."""
    import torchvision

    return torchvision.models.vgg11_bn(weights=None, num_classes=num_classes)
