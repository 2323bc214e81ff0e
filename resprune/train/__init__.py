"""Training: the loop (``Trainer``), checkpoints, logging, and the run stages."""

from .loop import EpochResult, Trainer, TrainingDiverged, evaluate, param_groups, select_device

__all__ = ["EpochResult", "Trainer", "TrainingDiverged", "evaluate", "param_groups", "select_device"]
