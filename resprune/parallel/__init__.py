"""Layer-parallel training engines on torch.distributed (DESIGN.md §5, docs/parallel.md).

Engines register themselves with their config class (``@register_engine(name, config=...)``);
:func:`list_engines` is the vocabulary of ``--engine`` and recipes, :func:`engine_config`
builds a config from a recipe's ``engine_options``.

Example:
    >>> import torch, resprune as rp
    >>> from resprune.parallel import create_engine, MGRITConfig, list_engines
    >>> list_engines()
    ['auxvar', 'consensus', 'local', 'mgrit', 'pipeline', 'serial']
"""

from .consensus import ConsensusConfig, ConsensusEngine
from .engines import (Engine, SerialEngine, create_engine, engine_config, engine_config_class, list_engines,
                      register_engine)
from .auxvar import AuxVarConfig, AuxVarEngine
from .launch import finalize, init_distributed, relaunch_with_torchrun
from .local import LocalConfig, LocalEngine
from .mgrit import MGRITConfig, MGRITEngine
from .graphs import GraphError, make_graph
from .partition import analyze_layers, balanced_bounds, layer_sequence
from .pipeline import PipelineConfig, PipelineEngine
from .stage import Stage, StagedEngine

__all__ = [
    "Engine", "SerialEngine", "StagedEngine", "Stage", "MGRITEngine", "MGRITConfig", "PipelineEngine",
    "PipelineConfig", "LocalEngine", "LocalConfig", "AuxVarEngine", "AuxVarConfig", "create_engine", "list_engines",
    "register_engine",
    "engine_config", "engine_config_class", "init_distributed", "relaunch_with_torchrun", "finalize",
    "analyze_layers", "balanced_bounds", "layer_sequence", "ConsensusEngine", "ConsensusConfig", "GraphError",
    "make_graph",
]
