"""Students (SPEC D3): a user-given smaller model, or one derived from the teacher.

:func:`derive_student` narrows every hidden Conv / Linear of a sequential CNN or MLP by ``width``
(the input and the class output keep their sizes; BatchNorm follows its conv; the Linear after a
``Flatten`` scales its inputs with the channels) and drops ``1 - depth`` of the *repeated* blocks —
a conv or linear layer whose output shape equals its input (same channels, stride 1, same padding)
together with its BatchNorm and activation. The student is freshly initialised (seeded).

Example:
    >>> import torch, torch.nn as nn
    >>> from netpress.distill.student import derive_student
    >>> t = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1),
    ...                   nn.ReLU(), nn.Flatten(), nn.Linear(16 * 8 * 8, 10))
    >>> s = derive_student(t, width=0.5, depth=0.0)
    >>> [type(m).__name__ for m in s], s[0].out_channels, s(torch.zeros(2, 1, 8, 8)).shape
    (['Conv2d', 'ReLU', 'Flatten', 'Linear'], 8, torch.Size([2, 10]))
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import torch
import torch.nn as nn
from pydantic import BaseModel, ConfigDict, Field, model_validator

from netpress.core.errors import ModelError

_CONV = (nn.Conv1d, nn.Conv2d)
_BN = (nn.BatchNorm1d, nn.BatchNorm2d)
_ACT = (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Hardswish, nn.Dropout)


class DeriveConfig(BaseModel):
    """``student: {derive: {width: 0.5, depth: 1.0}}``.

    Attributes:
        width: multiplier of every hidden layer's channels / features, in (0, 1].
        depth: fraction of repeated (shape-preserving) blocks kept, in [0, 1].
        seed: initialisation seed.
    """

    model_config = ConfigDict(extra="forbid")

    width: float = Field(default=0.5, gt=0, le=1)
    depth: float = Field(default=1.0, ge=0, le=1)
    seed: int = 0


class StudentConfig(BaseModel):
    """``student:`` block of a distill stage: ``{derive: {width, depth}}`` (a narrower /
    shallower copy of the teacher) or ``{model: my_student.pt2}`` (your own student, in the forms
    a recipe's ``model:`` takes: ``zoo:NAME`` or a ``.pt2`` program with a dynamic batch; the
    artifact then rebuilds that model). Python may also pass a module to :func:`distill`."""

    model_config = ConfigDict(extra="forbid")

    derive: DeriveConfig | None = None
    model: str | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _one(self) -> StudentConfig:
        if self.model is not None and self.derive is not None:
            raise ValueError("give either derive or model, not both")
        if self.model is None and self.derive is None:
            self.derive = DeriveConfig()
        if self.model is not None and not self.model.startswith("zoo:") and not Path(
                self.model).is_file():  # checked with the recipe, not after measuring the original
            raise ValueError(f"no file {self.model!r}: give a .pt2 program or zoo:NAME")
        return self


def _repeated(layers: list[nn.Module], i: int) -> int:
    """Length of the repeated block starting at ``i`` (0 when ``layers[i]`` does not start one)."""
    m = layers[i]
    same = False
    if isinstance(m, _CONV):
        k, s, p, d = m.kernel_size, m.stride, m.padding, m.dilation
        same = (m.in_channels == m.out_channels and all(x == 1 for x in s)
                and all(dd == 1 for dd in d) and p != "valid"
                and (p == "same" or all(pp == kk // 2 and kk % 2 for pp, kk in zip(p, k, strict=True))))
    elif isinstance(m, nn.Linear):
        same = m.in_features == m.out_features
    if not same:
        return 0
    n = 1
    while i + n < len(layers) and isinstance(layers[i + n], (*_BN, *_ACT)):
        n += 1
    return n


def derive_student(teacher: nn.Module, width: float = 0.5, depth: float = 1.0,
                   seed: int = 0) -> nn.Sequential:
    """A narrower / shallower fresh copy of a sequential teacher (see the module doc).

    Args:
        teacher: an ``nn.Sequential`` of Conv1d/Conv2d/Linear/BatchNorm/activation/pool/Flatten.
        width: channel multiplier in (0, 1].
        depth: fraction of repeated blocks kept.
        seed: initialisation seed.

    Returns:
        The untrained student (``nn.Sequential``).

    Raises:
        ModelError: the teacher is not a flat sequential stack of supported layers.
    """
    if not isinstance(teacher, nn.Sequential):
        raise ModelError("distill.student.derive", got=type(teacher).__name__,
                         expected="an nn.Sequential CNN/MLP (e.g. zoo digits_cnn, mnist1d_cnn)",
                         fix="pass your own student model (Python API: distill(student, teacher, "
                             "data)) for other architectures")
    layers = list(teacher)
    blocks = [i for i in range(len(layers)) if _repeated(layers, i)]
    drop_n = len(blocks) - math.ceil(len(blocks) * depth)
    dropped: set[int] = set()
    for i in blocks[len(blocks) - drop_n:]:  # drop the later repeated blocks
        dropped.update(range(i, i + _repeated(layers, i)))
    weighted = [i for i, m in enumerate(layers) if isinstance(m, (*_CONV, nn.Linear))
                and i not in dropped]
    last = weighted[-1] if weighted else -1
    torch.manual_seed(seed)
    out: list[nn.Module] = []
    c_old, c_new = None, None  # channels (or features) of the current activation
    for i, m in enumerate(layers):
        if i in dropped:
            continue
        if isinstance(m, _CONV):
            cin = m.in_channels if c_new is None else c_new
            cout = m.out_channels if i == last else max(1, round(m.out_channels * width))
            groups = 1
            if m.groups > 1:
                if m.groups != m.in_channels or m.in_channels != m.out_channels:
                    raise ModelError(f"teacher layer {i}", got=f"grouped conv (groups={m.groups})",
                                     expected="groups 1 or depthwise", fix="pass your own student")
                groups, cout = cin, cin
            out.append(type(m)(cin, cout, m.kernel_size, m.stride, m.padding, m.dilation, groups,
                               m.bias is not None, m.padding_mode))
            c_old, c_new = m.out_channels, cout
        elif isinstance(m, nn.Linear):
            cin = m.in_features
            if c_new is not None:
                cin = m.in_features * c_new // c_old if c_old and m.in_features != c_old else c_new
            cout = m.out_features if i == last else max(1, round(m.out_features * width))
            out.append(nn.Linear(cin, cout, m.bias is not None))
            c_old, c_new = m.out_features, cout
        elif isinstance(m, _BN):
            out.append(type(m)(c_new if c_new is not None else m.num_features, m.eps, m.momentum,
                               m.affine, m.track_running_stats))
        elif isinstance(m, (nn.Flatten, nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d,
                            nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.Identity, *_ACT)):
            out.append(copy.deepcopy(m))  # weightless layer
        else:
            raise ModelError(f"teacher layer {i}", got=type(m).__name__,
                             expected="Conv/Linear/BatchNorm/activation/pool/Flatten layers",
                             fix="pass your own student model")
    return nn.Sequential(*out)


__all__ = ["DeriveConfig", "StudentConfig", "derive_student"]
