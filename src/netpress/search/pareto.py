"""Pareto front and constraints of the planner: metric up, size down, latency down.

A point is a mapping with ``metric`` (higher is better unless the metric is ``kl``), ``size_bytes``,
``latency_ms`` and ``speedup`` (reference latency / latency). :class:`Constraints` turns the user's
limits into per-point violations (relative amounts, 0 when met), so the planner can say which
constraint binds when none of the points meets them all.

Example:
    >>> from netpress.search.pareto import Constraints, pareto_mask
    >>> pts = [{"metric": 0.99, "size_bytes": 4, "latency_ms": 2.0},
    ...        {"metric": 0.95, "size_bytes": 2, "latency_ms": 2.0},
    ...        {"metric": 0.94, "size_bytes": 3, "latency_ms": 3.0}]
    >>> pareto_mask(pts)
    [True, True, False]
    >>> c = Constraints(max_size_bytes=3, max_drop=0.02)
    >>> c.violations({"metric": 0.95, "size_bytes": 2, "latency_ms": 1, "speedup": 1}, 1.0)
    {'max_drop': 0.03}
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

LOWER_IS_BETTER = {"kl"}


def _key(p: dict[str, Any], lower_metric: bool) -> tuple[float, float, float]:
    """Objectives as a tuple to minimise."""
    m = float(p["metric"])
    return (m if lower_metric else -m, float(p["size_bytes"]), float(p["latency_ms"]))


def dominates(a: dict[str, Any], b: dict[str, Any], lower_metric: bool = False) -> bool:
    """``a`` is no worse than ``b`` on every objective and strictly better on one.

    Example:
        >>> dominates({"metric": 1, "size_bytes": 1, "latency_ms": 1},
        ...           {"metric": 1, "size_bytes": 2, "latency_ms": 1})
        True
    """
    ka, kb = _key(a, lower_metric), _key(b, lower_metric)
    return all(x <= y for x, y in zip(ka, kb, strict=True)) and ka != kb


def pareto_mask(points: Sequence[dict[str, Any]], lower_metric: bool = False) -> list[bool]:
    """Whether each point is on the Pareto front (no other point dominates it; duplicates stay)."""
    return [not any(dominates(q, p, lower_metric) for q in points) for p in points]


@dataclass
class Constraints:
    """The user's limits (``None`` = no limit).

    Attributes:
        max_size_bytes: artifact weight bytes at most this.
        min_speedup: reference latency / latency at least this.
        max_latency_ms: measured latency at most this.
        max_drop: metric drop vs the original at most this (metric units, e.g. 0.03 = 3 points of
            agreement on a 0..1 scale).
    """

    max_size_bytes: float | None = None
    min_speedup: float | None = None
    max_latency_ms: float | None = None
    max_drop: float | None = None

    def active(self) -> dict[str, float]:
        return {k: v for k, v in vars(self).items() if v is not None}

    def violations(self, p: dict[str, Any], original_metric: float,
                   lower_metric: bool = False) -> dict[str, float]:
        """Constraint name -> relative violation (> 0) for each limit ``p`` breaks."""
        out: dict[str, float] = {}
        if self.max_size_bytes is not None and p["size_bytes"] > self.max_size_bytes:
            out["max_size_bytes"] = p["size_bytes"] / self.max_size_bytes - 1
        if self.min_speedup is not None and p["speedup"] < self.min_speedup:
            out["min_speedup"] = 1 - p["speedup"] / self.min_speedup
        if self.max_latency_ms is not None and p["latency_ms"] > self.max_latency_ms:
            out["max_latency_ms"] = p["latency_ms"] / self.max_latency_ms - 1
        if self.max_drop is not None:
            drop = (p["metric"] - original_metric) if lower_metric else (original_metric - p["metric"])
            if drop > self.max_drop + 1e-12:
                out["max_drop"] = round(drop - self.max_drop, 6)
        return {k: round(v, 6) for k, v in out.items()}

    def describe(self) -> str:
        parts = []
        if self.max_size_bytes is not None:
            parts.append(f"size <= {self.max_size_bytes / 1e6:.3f} MB")
        if self.min_speedup is not None:
            parts.append(f"speed-up >= {self.min_speedup:g}x")
        if self.max_latency_ms is not None:
            parts.append(f"latency <= {self.max_latency_ms:g} ms")
        if self.max_drop is not None:
            parts.append(f"metric drop <= {self.max_drop:g}")
        return ", ".join(parts) or "none"


def binding(points: Sequence[dict[str, Any]], constraints: Constraints, original_metric: float,
            lower_metric: bool = False) -> tuple[list[str], list[int]]:
    """Which constraints bind, and the indices of the closest points (when none is feasible).

    A constraint binds when dropping it alone would make at least one point feasible. When no
    single constraint does, the constraints broken by the closest point are returned. Closest =
    smallest sum of relative violations.

    Example:
        >>> pts = [{"metric": 0.9, "size_bytes": 1, "latency_ms": 1, "speedup": 2}]
        >>> binding(pts, Constraints(max_drop=0.01), 1.0)
        (['max_drop'], [0])
    """
    if not points:
        return list(constraints.active()), []
    viol = [constraints.violations(p, original_metric, lower_metric) for p in points]
    order = sorted(range(len(points)), key=lambda i: (sum(viol[i].values()), i))
    names = [c for c in constraints.active()
             if any(set(v) == {c} for v in viol)]
    if not names:
        names = sorted(viol[order[0]])
    return names, order[:3]


__all__ = ["Constraints", "binding", "dominates", "pareto_mask", "LOWER_IS_BETTER"]
