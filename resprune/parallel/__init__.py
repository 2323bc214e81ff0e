"""Layer-parallel training engines on torch.distributed (DESIGN.md §5, docs/parallel.md).

Example:
    >>> import torch, resprune as rp
    >>> from resprune.parallel import create_engine, MGRITConfig, list_engines
    >>> list_engines()
    ['mgrit', 'serial']
"""

from .engines import Engine, SerialEngine, create_engine, list_engines, register_engine
from .launch import finalize, init_distributed, relaunch_with_torchrun
from .mgrit import MGRITConfig, MGRITEngine
from .partition import analyze_layers, balanced_bounds, layer_sequence

__all__ = [
    "Engine", "SerialEngine", "MGRITEngine", "MGRITConfig", "create_engine", "list_engines",
    "register_engine", "init_distributed", "relaunch_with_torchrun", "finalize",
    "analyze_layers", "balanced_bounds", "layer_sequence",
]
