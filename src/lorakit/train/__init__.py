"""lorakit's training: `train(cfg)` (what `lorakit train` runs) and the Trainer it is built on, with callbacks
(callbacks.py), loggers (loggers.py) and the progress display (progress.py)."""

from .callbacks import BestMetric, Callback, StepOutput
from .config import TrainConfig
from .loop import train
from .trainer import Trainer, TrainResult

__all__ = ["BestMetric", "Callback", "StepOutput", "TrainConfig", "TrainResult", "Trainer", "train"]
