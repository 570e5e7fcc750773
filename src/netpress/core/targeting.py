"""Choosing which submodules a technique touches: ``targets`` and ``ignore``.

A pattern is one of
  * a module class name, e.g. ``"Linear"``, ``"Conv2d"`` (matches ``type(m).__name__``),
  * an exact qualified module name, e.g. ``"features.0.0"``,
  * a regular expression on the qualified name, prefixed ``re:``, e.g. ``"re:classifier.*"``
    (``re.fullmatch``).

Rules: a module listed by ``ignore`` is never touched (ignore is checked first). Otherwise it is
selected when it matches a pattern of ``targets``; patterns are tried in order and the first match
wins (it is returned, so per-pattern settings can follow it). When ``targets`` is omitted the
technique's default classes are used.

Example:
    >>> import torch.nn as nn
    >>> from netpress.core.targeting import select
    >>> m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Linear(8, 2))
    >>> [name for name, _ in select(m, targets=["Conv2d", "Linear"], ignore=["re:2"])]
    ['0']
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch.nn as nn

from netpress.core.errors import RecipeError


def _compile(pattern: str, where: str) -> re.Pattern[str] | None:
    if not isinstance(pattern, str) or not pattern:
        raise RecipeError(where, got=pattern, expected="a class name, module name or 're:REGEX'",
                          fix="e.g. 'Linear', 'features.0.0' or 're:classifier.*'")
    if pattern.startswith("re:"):
        try:
            return re.compile(pattern[3:])
        except re.error as exc:
            raise RecipeError(where, got=pattern, expected=f"a valid regex ({exc})",
                              fix="escape special characters such as '.' or '['") from None
    return None


def _check_present(pattern: str, where: str, names: set[str], classes: set[str]) -> None:
    """A pattern that selects nothing is a typo (a glob such as ``*intermediate*``, a stale
    module name), and silently skipping it would quantize or prune what the user meant to keep."""
    rx = _compile(pattern, where)
    if rx is None and pattern not in names and pattern not in classes:
        fix = "`netpress inspect` lists module names; use 're:' for a regex"
        if any(c in pattern for c in "*?["):
            glob = pattern.replace(".", "\\.").replace("*", ".*").replace("?", ".")
            fix = f"globs are not patterns: write 're:{glob}' (a regex), or an exact module name"
        raise RecipeError(where, got=pattern, expected="a module class or name present in the model",
                          fix=fix)
    if rx is not None and not any(rx.fullmatch(n) for n in names):
        raise RecipeError(where, got=pattern, expected="a regex matching at least one module name",
                          fix="`netpress inspect` lists module names (the regex must match a whole "
                          "name: 're:.*intermediate.*', not 're:intermediate')")


def matches(name: str, module: nn.Module, pattern: str, where: str = "pattern") -> bool:
    """Whether ``module`` (qualified ``name``) matches one pattern."""
    rx = _compile(pattern, where)
    if rx is not None:
        return rx.fullmatch(name) is not None
    return pattern == name or pattern == type(module).__name__


def select(
    model: nn.Module,
    targets: Sequence[str] | None = None,
    ignore: Sequence[str] | None = None,
    default: Sequence[type[nn.Module]] = (nn.Linear, nn.Conv1d, nn.Conv2d),
    where: str = "targets",
) -> list[tuple[str, nn.Module]]:
    """Modules of ``model`` a technique should touch, in definition order.

    Args:
        model: the model to search.
        targets: patterns (see module doc); ``None`` selects instances of ``default``.
        ignore: patterns never touched.
        default: classes selected when ``targets`` is ``None``.
        where: recipe path used in error messages.

    Returns:
        ``(qualified_name, module)`` pairs.

    Raises:
        RecipeError: a pattern is malformed, or an exact-name pattern names no module.
    """
    ignore = list(ignore or [])
    names = {n for n, _ in model.named_modules()}
    classes = {type(m).__name__ for _, m in model.named_modules()}
    for i, p in enumerate(ignore):
        _check_present(p, f"{where}.ignore[{i}]", names, classes)
    for i, p in enumerate(targets or []):
        _check_present(p, f"{where}[{i}]", names, classes)
    out: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if not name or any(matches(name, module, p) for p in ignore):
            continue
        if targets is None:
            if any(isinstance(module, cls) for cls in default):
                out.append((name, module))
        elif any(matches(name, module, p) for p in targets):
            out.append((name, module))
    return out


__all__ = ["select", "matches"]
