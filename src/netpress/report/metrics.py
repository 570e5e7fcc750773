"""metrics.json, exactly as DESIGN §2 specifies it.

Example:
    >>> from netpress.report.metrics import Measurement, build_metrics
    >>> a = Measurement(params=100, nonzero_params=100, macs=1000, size_bytes=400,
    ...                 latency_ms=2.0, metric=0.9)
    >>> b = Measurement(params=100, nonzero_params=50, macs=1000, size_bytes=100,
    ...                 latency_ms=1.0, metric=0.89)
    >>> m = build_metrics("zoo:x", {}, "onnxruntime", 2, 1, "accuracy", a, b, 3.0)
    >>> m["ratios"]
    {'size': 4.0, 'latency': 2.0, 'macs': 1.0}
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


@dataclass
class Measurement:
    """One side of the before/after table."""

    params: int
    nonzero_params: int
    macs: int
    size_bytes: int
    latency_ms: float
    metric: float


def _ratio(a: float, b: float) -> float | None:
    return round(a / b, 4) if b else None


def build_metrics(
    model: str,
    recipe: dict[str, Any],
    runtime: str,
    threads: int,
    batch: int,
    metric_name: str,
    original: Measurement,
    compressed: Measurement,
    compress_seconds: float,
) -> dict[str, Any]:
    """The metrics.json body; ``ratios`` are original / compressed (bigger is better)."""
    return {
        "model": model,
        "recipe": recipe,
        "runtime": runtime,
        "threads": threads,
        "batch": batch,
        "metric_name": metric_name,
        "original": asdict(original),
        "compressed": asdict(compressed),
        "ratios": {
            "size": _ratio(original.size_bytes, compressed.size_bytes),
            "latency": _ratio(original.latency_ms, compressed.latency_ms),
            "macs": _ratio(original.macs, compressed.macs),
        },
        "compress_seconds": round(compress_seconds, 3),
    }


def write_json(path: str | Path, body: Any) -> Path:
    """Write JSON atomically (temp file + rename), keys sorted for byte-stable output."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(body, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


__all__ = ["Measurement", "build_metrics", "write_json"]
