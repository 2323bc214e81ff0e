"""Model registry, CIFAR ResNets, plain ResConv nets and ``convert_``."""

from . import cifar_resnet, torchvision_models  # noqa: F401  (registers the models)
from .cifar_resnet import BasicBlock, CifarResNet, PlainResNet, ResConvChain
from .convert import ConversionPlan, conversion_plan, convert_, set_submodule
from .registry import create_model, is_model, list_models, register_model

__all__ = [
    "BasicBlock", "CifarResNet", "PlainResNet", "ResConvChain", "ConversionPlan", "conversion_plan",
    "convert_", "set_submodule", "create_model", "is_model", "list_models", "register_model",
]
