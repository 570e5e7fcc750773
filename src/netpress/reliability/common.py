"""Shared pieces of the reliability suites: :class:`Section` and the base recipe.

Example:
    >>> from netpress.reliability.common import Section
    >>> s = Section("demo"); s.check(None); s.check("broke"); (s.cases, s.failures)
    (2, ['broke'])
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Section:
    """One family of cases: how many ran and which failed (each failure says why)."""

    name: str
    cases: int = 0
    failures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def check(self, failure: str | None) -> None:
        """Count one case; record it when ``failure`` is a message."""
        self.cases += 1
        if failure:
            self.failures.append(failure)


#: a valid recipe (the digits CNN): the fuzzer mutates it, the real-run suites run it
BASE_RECIPE: dict[str, Any] = {
    "model": "zoo:digits_cnn", "data": "zoo:digits", "metric": "accuracy",
    "stages": [{"prune": {"method": "magnitude", "sparsity": 0.5, "scope": "global"}},
               {"quantize": {"method": "int8_weight", "bits": 8}}],
    "export": ["artifact", "onnx"], "seed": 0, "threads": 2, "batch": 1,
}

