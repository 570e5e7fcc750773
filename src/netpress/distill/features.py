"""Feature distillation (SPEC D2): FitNets hints between named intermediate layers.

``FeatureTaps`` owns every forward hook it installs (on the student and the teacher) and removes
them all on exit, also when training fails, so no hook leaks. Each ``(student_layer,
teacher_layer)`` pair gets an adapter mapping the student's feature to the teacher's shape — a 1x1
``Conv2d`` for ``(B, C, H, W)``, a 1x1 ``Conv1d`` for ``(B, C, L)``, a ``Linear`` for ``(B, F)`` /
``(B, T, F)`` — trained with the student and discarded afterwards. The hint loss is the MSE between
the adapted student feature and the teacher feature.

Example:
    >>> import torch, torch.nn as nn
    >>> from netpress.distill.features import FeatureTaps, build_adapters, hint_loss
    >>> s = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    >>> t = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> x = torch.randn(5, 4)
    >>> with FeatureTaps(s, t, [("0", "0")]) as taps:
    ...     _ = s(x); _ = t(x)
    ...     adapters = build_adapters(taps, adapter=True)
    ...     loss = hint_loss(taps, adapters)
    >>> loss.ndim, len(s[0]._forward_hooks)
    (0, 0)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from netpress.core.errors import ModelError, RecipeError
from netpress.measure.metrics import first_tensor


def _module(model: nn.Module, name: str, which: str) -> nn.Module:
    modules = dict(model.named_modules())
    if name not in modules:
        near = [n for n in modules if n and (name in n or n in name)][:5]
        raise RecipeError(f"distill.features: {which} layer", got=name,
                          expected=f"a module name of the {which}" +
                          (f" (close: {', '.join(near)})" if near else ""),
                          fix="`netpress inspect` lists module names")
    return modules[name]


class FeatureTaps:
    """Context manager recording the outputs of named student and teacher modules.

    Args:
        student, teacher: the two models.
        pairs: ``[(student_layer, teacher_layer), ...]`` module names.

    Raises:
        RecipeError: a name that is not a module of its model.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module,
                 pairs: Sequence[Sequence[str]]) -> None:
        self.pairs = [(str(a), str(b)) for a, b in pairs]
        self.student: dict[str, torch.Tensor] = {}
        self.teacher: dict[str, torch.Tensor] = {}
        self._targets = [(_module(student, a, "student"), a, self.student) for a, _ in self.pairs]
        self._targets += [(_module(teacher, b, "teacher"), b, self.teacher) for _, b in self.pairs]
        self._handles: list[Any] = []

    def __enter__(self) -> FeatureTaps:
        for module, name, store in self._targets:
            def hook(_m: nn.Module, _i: Any, out: Any, name: str = name,
                     store: dict[str, torch.Tensor] = store) -> None:
                store[name] = first_tensor(out)
            self._handles.append(module.register_forward_hook(hook))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.student.clear()
        self.teacher.clear()

    def features(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``(student feature, teacher feature)`` per pair from the last forward passes."""
        return [(self.student[a], self.teacher[b]) for a, b in self.pairs]


def _adapter(s: torch.Tensor, t: torch.Tensor, where: str) -> nn.Module:
    if s.dim() == 4 and s.shape[2:] == t.shape[2:]:
        return nn.Conv2d(s.shape[1], t.shape[1], 1, bias=False)
    if s.dim() == 3 and s.shape[2:] == t.shape[2:] and s.shape[1] != t.shape[1]:
        return nn.Conv1d(s.shape[1], t.shape[1], 1, bias=False)
    if s.shape[:-1] == t.shape[:-1]:
        return nn.Linear(s.shape[-1], t.shape[-1], bias=False)
    raise ModelError(where, got=f"student {tuple(s.shape)} vs teacher {tuple(t.shape)}",
                     expected="features that differ only in channels (or last dimension)",
                     fix="pair layers at the same spatial resolution")


def build_adapters(taps: FeatureTaps, adapter: bool = True) -> nn.ModuleList:
    """One adapter per pair (``Identity`` when shapes already match), from the last forward.

    Args:
        taps: a :class:`FeatureTaps` after one student and one teacher forward pass.
        adapter: whether learned adapters are allowed.

    Raises:
        RecipeError: shapes differ and ``adapter`` is false.
        ModelError: shapes differ in more than the channel dimension.
    """
    out = nn.ModuleList()
    for (a, b), (s, t) in zip(taps.pairs, taps.features(), strict=True):
        where = f"distill.features[{a!r}, {b!r}]"
        if s.shape == t.shape:
            out.append(nn.Identity())
        elif not adapter:
            raise RecipeError(where, got=f"student {tuple(s.shape)} vs teacher {tuple(t.shape)} "
                              "with adapter: false", expected="features of the same shape",
                              fix="set `adapter: true` (a learned 1x1 conv / linear) or pair "
                                  "layers of equal width")
        else:
            out.append(_adapter(s, t, where))
    return out


def hint_loss(taps: FeatureTaps, adapters: nn.ModuleList) -> torch.Tensor:
    """Mean over pairs of ``MSE(adapter(student feature), teacher feature)``."""
    losses = [F.mse_loss(ad(s), t.detach()) for ad, (s, t) in
              zip(adapters, taps.features(), strict=True)]
    return torch.stack(losses).mean()


__all__ = ["FeatureTaps", "build_adapters", "hint_loss"]
