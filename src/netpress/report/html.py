"""report.html: the before/after table and a chart, one self-contained file (PNG embedded).

Example:
    >>> from netpress.report.html import render_html
    >>> m = {"model": "zoo:x", "runtime": "onnxruntime", "threads": 2, "batch": 1,
    ...      "metric_name": "accuracy", "compress_seconds": 1.0,
    ...      "original": {"params": 10, "nonzero_params": 10, "macs": 5, "size_bytes": 40,
    ...                   "latency_ms": 1.0, "metric": 0.9},
    ...      "compressed": {"params": 10, "nonzero_params": 5, "macs": 5, "size_bytes": 10,
    ...                     "latency_ms": 1.0, "metric": 0.9},
    ...      "ratios": {"size": 4.0, "latency": 1.0, "macs": 1.0}, "recipe": {}}
    >>> "<table" in render_html(m)
    True
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
from pathlib import Path
from typing import Any

ROWS = (
    ("params", "parameters", "{:,}"),
    ("nonzero_params", "non-zero parameters", "{:,}"),
    ("macs", "MACs (one forward)", "{:,}"),
    ("size_bytes", "artifact bytes on disk", "{:,}"),
    ("latency_ms", "latency, median (ms)", "{:.3f}"),
    ("metric", "metric", "{:.4f}"),
)


def _fmt(fmt: str, value: Any) -> str:
    return "n/a" if value is None else fmt.format(value)


def table_rows(metrics: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(label, original, compressed, original/compressed) for each measured quantity."""
    rows = []
    for key, label, fmt in ROWS:
        a, b = metrics["original"].get(key), metrics["compressed"].get(key)
        if key == "metric":
            label = metrics["metric_name"]
            change = "n/a" if a is None or b is None else f"{b - a:+.4f}"
        else:
            change = f"{a / b:.2f}x" if a and b else "n/a"
        rows.append((label, _fmt(fmt, a), _fmt(fmt, b), change))
    return rows


def chart_png(metrics: dict[str, Any]) -> bytes:
    """Bar chart of compressed / original for size, latency, MACs, non-zeros and the metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [("size_bytes", "size"), ("latency_ms", "latency"), ("macs", "MACs"),
            ("nonzero_params", "non-zeros"), ("metric", metrics["metric_name"])]
    labels, values = [], []
    for key, label in keys:
        a, b = metrics["original"].get(key), metrics["compressed"].get(key)
        if a and b is not None:
            labels.append(label)
            values.append(b / a)
    fig, ax = plt.subplots(figsize=(6.4, 3.2), dpi=100)
    bars = ax.bar(labels, values, color=["#3b7dd8"] * (len(values) - 1) + ["#d8883b"])
    ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    ax.set_ylabel("compressed / original")
    ax.set_title(f"{metrics['model']}: compressed relative to original")
    for bar, v in zip(bars, values, strict=True):
        ax.annotate(f"{v:.2f}", (bar.get_x() + bar.get_width() / 2, v), ha="center",
                    va="bottom", fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


def render_html(metrics: dict[str, Any], notes: dict[str, Any] | None = None) -> str:
    """The whole report page as a string."""
    esc = html.escape
    rows = "".join(
        f"<tr><td>{esc(lab)}</td><td>{esc(a)}</td><td>{esc(b)}</td><td>{esc(c)}</td></tr>"
        for lab, a, b, c in table_rows(metrics)
    )
    png = base64.b64encode(chart_png(metrics)).decode("ascii")
    notes_html = ""
    if notes:
        notes_html = "<h2>Notes</h2><pre>" + esc(json.dumps(notes, indent=2, sort_keys=True)) + "</pre>"
    recipe = esc(json.dumps(metrics.get("recipe", {}), indent=2, sort_keys=True))
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>netpress report: {esc(str(metrics['model']))}</title>
<style>body{{font-family:sans-serif;max-width:60em;margin:2em auto}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 10px;text-align:right}}
td:first-child{{text-align:left}}</style></head><body>
<h1>netpress report: {esc(str(metrics['model']))}</h1>
<p>Latency: runtime <b>{esc(str(metrics['runtime']))}</b>, {metrics['threads']} thread(s),
batch {metrics['batch']}, median of warm runs. Compression took {metrics['compress_seconds']:.1f} s.</p>
<table><tr><th></th><th>original</th><th>compressed</th><th>original / compressed</th></tr>
{rows}</table>
<h2>Chart</h2><img alt="compressed relative to original" src="data:image/png;base64,{png}">
{notes_html}
<h2>Recipe</h2><pre>{recipe}</pre>
</body></html>
"""


def write_html(path: str | Path, metrics: dict[str, Any], notes: dict[str, Any] | None = None) -> Path:
    """Write report.html atomically."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(render_html(metrics, notes), encoding="utf-8")
    os.replace(tmp, path)
    return path


__all__ = ["render_html", "write_html", "table_rows", "chart_png"]
