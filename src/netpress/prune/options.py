"""Config fields shared by the pruning methods: N:M patterns (SPEC P5) and the cubic schedule (P6).

This module imports only pydantic and the training config, so any pruning config (``magnitude``
included) can mix these fields in without import cycles.

``sparsity`` may be a fraction in [0, 1) or an ``"N:M"`` string (``"2:4"``, ``"4:8"``): N weights
kept in every group of M consecutive input weights; the string is stored as ``n``/``m``.

Example:
    >>> from netpress.core.config import TechniqueConfig
    >>> class Demo(NMFields, TechniqueConfig):
    ...     method: str = "demo"
    >>> cfg = Demo.model_validate({"sparsity": "2:4"})
    >>> cfg.n, cfg.m, cfg.sparsity
    (2, 4, None)
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, Field, model_validator

from netpress.train.loop import TrainConfig

_NM = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


def parse_nm(value: str) -> tuple[int, int]:
    """``"2:4"`` -> ``(2, 4)``.

    Raises:
        ValueError: not of the form ``N:M`` with ``0 < N < M <= 64`` (pydantic turns it into a
            :class:`~netpress.core.errors.RecipeError` naming the key).

    Example:
        >>> parse_nm("4:8")
        (4, 8)
    """
    match = _NM.match(value)
    if not match:
        raise ValueError(f"sparsity {value!r} is neither a fraction in [0, 1) nor an 'N:M' "
                         "pattern; use e.g. sparsity: 0.5 or sparsity: '2:4'")
    n, m = int(match.group(1)), int(match.group(2))
    if not 0 < n < m <= 64:
        raise ValueError(f"N:M pattern {value!r} needs 0 < N < M <= 64; use e.g. '2:4' or '4:8'")
    return n, m


class NMFields(BaseModel):
    """``sparsity`` (fraction) or an N:M pattern (``sparsity: "2:4"`` or ``n: 2, m: 4``)."""

    sparsity: float | None = Field(default=None, ge=0.0, lt=1.0, allow_inf_nan=False)
    n: int | None = Field(default=None, ge=1, le=63)
    m: int | None = Field(default=None, ge=2, le=64)

    @model_validator(mode="before")
    @classmethod
    def _split_nm(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("sparsity"), str):
            n, m = parse_nm(data["sparsity"])
            data = {**data, "sparsity": None, "n": n, "m": m}
        return data

    @model_validator(mode="after")
    def _check_nm(self) -> Any:
        if (self.n is None) != (self.m is None):
            raise ValueError("give both `n` and `m` (e.g. n: 2, m: 4) or sparsity: '2:4'")
        if self.n is not None and self.m is not None and not self.n < self.m:
            raise ValueError(f"N:M needs n < m, got {self.n}:{self.m}; use e.g. 2:4 or 4:8")
        return self

    @property
    def nm(self) -> tuple[int, int] | None:
        """``(n, m)`` when an N:M pattern is set."""
        return (self.n, self.m) if self.n is not None and self.m is not None else None


class GradualFields(BaseModel):
    """Gradual pruning (Zhu & Gupta 2017) with fine-tuning through :func:`netpress.train.fine_tune`.

    Attributes:
        schedule: ``cubic`` to prune gradually while fine-tuning; ``None`` prunes in one shot.
        initial_sparsity: ``s_i``, the sparsity of the first pruning step.
        prune_steps: how many pruning steps ``n`` (the mask is recomputed ``n`` times).
        prune_end: fraction of the fine-tuning steps after which sparsity stays at ``s_f``
            (the rest recovers accuracy with a fixed mask).
        finetune: the fine-tuning run (epochs, lr, ...) the schedule is spread over.
    """

    schedule: Literal["cubic"] | None = None
    initial_sparsity: float = Field(default=0.0, ge=0.0, lt=1.0)
    prune_steps: int = Field(default=10, ge=1, le=10_000)
    prune_end: float = Field(default=0.7, gt=0.0, le=1.0)
    finetune: TrainConfig = Field(default_factory=lambda: TrainConfig(epochs=10, lr=1e-3))


__all__ = ["GradualFields", "NMFields", "parse_nm"]
