"""Shared pieces of the low-rank techniques: rank choice, module swapping, optional fine-tuning.

Example:
    >>> import torch
    >>> from netpress.lowrank.common import energy_rank
    >>> energy_rank(torch.tensor([3.0, 1.0, 0.1]), 0.85)   # 9 / 10.01 = 0.899 >= 0.85
    1
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from netpress.core.config import StageContext
from netpress.core.errors import DataError
from netpress.train.loop import TrainConfig, fine_tune


def energy_rank(sigma: torch.Tensor, energy: float) -> int:
    """Smallest ``r`` with ``Σ_{i<r} σ_i² / Σ σ_i² >= energy`` (``sigma`` sorted descending)."""
    e = sigma.double().pow(2)  # (n,)
    frac = torch.cumsum(e, 0) / e.sum().clamp(min=1e-300)
    return int(torch.searchsorted(frac, torch.tensor([energy], dtype=frac.dtype) - 1e-12).item()) + 1


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at qualified ``name``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def recover(model: nn.Module, ctx: StageContext, finetune: TrainConfig | None,
            where: str) -> dict[str, Any]:
    """Optional fine-tuning after decomposition.

    Labelled batches train on cross-entropy; unlabelled ones (embeddings, photos) are distilled
    from ``ctx.original`` (cosine / KL). Uses the run's ``train`` split when there is one.

    Raises:
        DataError: fine-tuning requested without data.
    """
    if finetune is None or finetune.epochs == 0:
        return {}
    advanced = ctx.advanced if isinstance(ctx.advanced, dict) else {}
    data = advanced.get("train") or ctx.data
    if not data:
        raise DataError(f"{where}.finetune", got="no data", expected="fine-tuning batches",
                        fix="use a zoo data set, or drop the finetune block")
    if data[0].target is not None or ctx.original is None:
        result = fine_tune(model, data, finetune)
    else:
        from netpress.distill.kd import DistillConfig, distill

        cfg = DistillConfig(epochs=finetune.epochs, lr=finetune.lr, optimizer=finetune.optimizer,
                            max_steps=finetune.max_steps, seed=finetune.seed, alpha=1.0,
                            checkpoint_dir=finetune.checkpoint_dir, device=finetune.device)
        _, result = distill(model, ctx.original, data, cfg, task=advanced.get("task"))
    return {"finetune_steps": result.steps, "finetune_losses": [round(v, 5) for v in result.losses]}


__all__ = ["energy_rank", "recover", "set_module"]
