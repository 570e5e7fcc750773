"""The shared fine-tuning loop (prune schedules, QAT and distillation all use it); DDP-ready."""

from netpress.train.callbacks import KeepSparsity
from netpress.train.checkpoint import read_checkpoint, write_checkpoint
from netpress.train.loop import TrainConfig, TrainResult, classification_loss, fine_tune

__all__ = ["KeepSparsity", "TrainConfig", "TrainResult", "classification_loss", "fine_tune",
           "read_checkpoint", "write_checkpoint"]
