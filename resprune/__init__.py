"""resprune: layer pruning with ResConv blocks, fusion, export and layer-parallel training.

Example:
    >>> import torch, resprune as rp
    >>> model = rp.create_model("resnet20", num_classes=10)
    >>> loss = rp.LayerScaleL1(1e-4)(model)
    >>> report = rp.prune_(model, rp.PruneConfig(threshold=1e-2))
    >>> deploy = rp.fuse(model)
    >>> rp.profile(deploy, input_size=(1, 3, 32, 32)).macs
    40551040
"""

from .errors import ResPruneError
from .fuse import fuse, fuse_
from .layers import ConvBN2d, OptionAShortcut, ResConv2d
from .models import (
    conversion_plan,
    convert_,
    create_model,
    list_models,
    register_model,
)
from .profile import Profile, profile
from .prune import PruneConfig, PruneReport, prune_
from .serialization import CheckpointError, load, load_program, save, save_program
from .sparsity import LayerScaleL1, LayerSmoothness, RegularizerSum, scale_stats
from .version import __version__

__all__ = [
    "__version__", "ResConv2d", "ConvBN2d", "OptionAShortcut", "create_model", "list_models",
    "register_model", "convert_", "conversion_plan", "LayerScaleL1", "LayerSmoothness", "RegularizerSum",
    "scale_stats",
    "PruneConfig", "PruneReport", "prune_", "fuse", "fuse_", "profile", "Profile",
    "save", "load", "save_program", "load_program", "ResPruneError", "CheckpointError", "export_onnx", "verify_onnx",
]


def __getattr__(name: str):
    # export_onnx lives in resprune.onnx (imports onnx lazily so `import resprune` stays light)
    if name in ("export_onnx", "verify_onnx"):
        from . import onnx

        return getattr(onnx, name)
    raise AttributeError(f"module 'resprune' has no attribute {name!r}")
