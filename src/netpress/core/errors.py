"""Typed user-facing errors.

Every error a user can cause raises one of these. The message says what was received, what was
expected and how to fix it; the CLI prints it on one line and exits with code 2, never a traceback.

Example:
    >>> from netpress.core.errors import RecipeError
    >>> err = RecipeError("stages[0].prune.sparsity", got=1.5, expected="a number in [0, 1)",
    ...                   fix="use e.g. sparsity: 0.5")
    >>> str(err)
    'stages[0].prune.sparsity: got 1.5, expected a number in [0, 1). Fix: use e.g. sparsity: 0.5'
"""

from __future__ import annotations

import reprlib
from typing import Any

_MISSING = object()
_REPR = reprlib.Repr()  # bounded repr: deep nesting or YAML alias bombs never blow up a message
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother, _REPR.maxlong = 3, 80, 80, 40


class NetpressError(Exception):
    """Base class of every error netpress raises on purpose.

    Args:
        where: what the error is about (a recipe path, a file, a layer name).
        got: the value received (optional; shortened when long).
        expected: what would have been accepted.
        fix: one sentence telling the user what to change.
    """

    exit_code = 2
    where_limit = 200  # user-typed paths (recipe keys) are shortened past this

    def __init__(
        self,
        where: str,
        *,
        got: Any = _MISSING,
        expected: str | None = None,
        fix: str | None = None,
    ) -> None:
        self.where = where
        self.got = got
        self.expected = expected
        self.fix = fix
        super().__init__(self._render())

    def _render(self) -> str:
        detail = []
        if self.got is not _MISSING:
            detail.append(f"got {_short(self.got)}")
        if self.expected:
            detail.append(f"expected {self.expected}")
        limit = self.where_limit
        where = self.where if len(self.where) <= limit else self.where[: limit - 3] + "..."
        msg = f"{where}: {', '.join(detail)}" if detail else where
        return f"{msg}. Fix: {self.fix}" if self.fix else msg


def _short(value: Any, limit: int = 80) -> str:
    try:
        text = _REPR.repr(value)
    except Exception:  # noqa: BLE001 - e.g. ints over the 4300-digit str limit
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


class RecipeError(NetpressError):
    """A recipe (YAML/JSON or the equivalent Python objects) is malformed or names unknown things."""


class ModelError(NetpressError):
    """A model cannot be loaded, traced or compressed as asked."""

    where_limit = 1000  # e.g. both ONNX exporters' reasons, each already summarised


class DataError(NetpressError):
    """Calibration, fine-tuning or evaluation data is missing, empty, malformed or non-finite."""


class ArtifactError(NetpressError):
    """An artifact directory is missing files, tampered with, or cannot be written."""


class DependencyError(NetpressError):
    """A Python package that this command needs (e.g. a peer toolkit a benchmark runs) is missing."""


class ConstraintError(NetpressError):
    """A run finished but its result violates a user constraint (e.g. ``--max-drop``)."""

    exit_code = 1


__all__ = [
    "NetpressError",
    "RecipeError",
    "ModelError",
    "DataError",
    "ArtifactError",
    "DependencyError",
    "ConstraintError",
]
