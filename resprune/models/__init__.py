"""Model registry, CIFAR ResNets, plain ResConv nets and ``convert_``."""

from . import cifar_resnet, torchvision_models  # noqa: F401  (registers the models)
from .cifar_resnet import BasicBlock, CifarResNet, PlainResNet, ResConvChain
from .arch import ArchRecord
from .convert import ConversionPlan, conversion_plan, convert_
from .registry import create_model, is_model, list_models, register_model

__all__ = [
    "ArchRecord", "BasicBlock", "CifarResNet", "PlainResNet", "ResConvChain", "ConversionPlan", "conversion_plan",
    "convert_", "create_model", "is_model", "list_models", "register_model",
]
