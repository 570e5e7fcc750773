"""A teacher made of several models: the mean of their logits (SPEC D1, stronger teachers).

An ensemble of independently seeded networks is more accurate and better calibrated than any one of
them, so its soft targets carry more of the function to a student. ``Ensemble`` is a plain
``nn.Module`` and can be passed anywhere a teacher is accepted (``distill(student, Ensemble(...),
data)``); feature KD reaches a member's layers as ``members.<i>.<layer>``.

Example:
    >>> import torch, torch.nn as nn
    >>> from netpress.distill.ensemble import Ensemble
    >>> a, b = nn.Linear(4, 3), nn.Linear(4, 3)
    >>> x = torch.randn(2, 4)
    >>> torch.allclose(Ensemble([a, b])(x), (a(x) + b(x)) / 2)
    True
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from netpress.core.errors import ModelError


class Ensemble(nn.Module):
    """Mean of the members' outputs (logits), computed member by member.

    Args:
        members: one or more models taking the same inputs and giving outputs of one shape.

    Raises:
        ModelError: no members.
    """

    def __init__(self, members: Sequence[nn.Module]) -> None:
        super().__init__()
        if not members:
            raise ModelError("distill.Ensemble", got="no members", expected="one or more models",
                             fix="pass a list of trained teachers")
        self.members = nn.ModuleList(members)

    def forward(self, *args: torch.Tensor, **kwargs: torch.Tensor) -> torch.Tensor:
        out = self.members[0](*args, **kwargs)
        for m in self.members[1:]:
            out = out + m(*args, **kwargs)
        return out / len(self.members)


__all__ = ["Ensemble"]
