"""report/ and bench/ output formats."""

from __future__ import annotations

import json

from netpress.bench import ROW_KEYS, row, update_markdown
from netpress.report.html import render_html, table_rows
from netpress.report.metrics import Measurement, build_metrics, write_json


def _metrics():
    a = Measurement(params=1000, nonzero_params=1000, macs=5000, size_bytes=4000,
                    latency_ms=2.0, metric=0.95)
    b = Measurement(params=1000, nonzero_params=300, macs=5000, size_bytes=800,
                    latency_ms=1.6, metric=0.94)
    return build_metrics("zoo:x", {"stages": []}, "onnxruntime", 2, 1, "accuracy", a, b, 1.25)


def test_metrics_json_contract(tmp_path):
    m = _metrics()
    assert m["ratios"] == {"size": 5.0, "latency": 1.25, "macs": 1.0}
    path = write_json(tmp_path / "metrics.json", m)
    assert json.loads(path.read_text()) == m
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_table_rows_and_html():
    rows = table_rows(_metrics())
    assert rows[0] == ("parameters", "1,000", "1,000", "1.00x")
    assert rows[-1] == ("accuracy", "0.9500", "0.9400", "-0.0100")
    page = render_html(_metrics(), {"note": "<b>escaped</b>"})
    assert "data:image/png;base64," in page and "&lt;b&gt;escaped" in page


def test_bench_markdown_section_is_replaced(tmp_path):
    r = row(suite="s", case="c", tool="netpress", method="m", metric_name="accuracy",
            metric=0.9, size_bytes=10, latency_ms=1.0, speedup_vs_fp32=2.0, compress_seconds=0.5,
            runtime="onnxruntime", threads=2, batch=1)
    assert set(ROW_KEYS) <= set(r)
    md = tmp_path / "BENCHMARKS.md"
    update_markdown(md, "s", [r], quick=False)
    update_markdown(md, "t", [r], quick=False)
    update_markdown(md, "s", [{**r, "case": "again"}], quick=False)
    text = md.read_text()
    assert text.count("## Suite `s`") == 1 and text.count("## Suite `t`") == 1
    assert "again" in text and "| c |" in text  # t still has case c; s was replaced
