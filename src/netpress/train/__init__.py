"""The shared fine-tuning loop (prune schedules, QAT and distillation all use it)."""

from netpress.train.loop import TrainConfig, TrainResult, classification_loss, fine_tune

__all__ = ["TrainConfig", "TrainResult", "classification_loss", "fine_tune"]
