"""Training one language-model run (see `trainer`): checkpointing, monitoring, sinks, hooks."""

from .monitor import to_floats
from .trainer import PREEMPTED_EXIT_CODE, Trainer, train

__all__ = ["PREEMPTED_EXIT_CODE", "Trainer", "to_floats", "train"]
