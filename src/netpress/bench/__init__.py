"""``netpress bench SUITE``: netpress side by side with the anchors, in one process.

Every suite returns rows in the DESIGN §2 bench format (plus ``runtime``, ``threads``, ``batch`` and
``notes``), written as JSON, and can refresh its own section of BENCHMARKS.md. Anchors (ONNX Runtime's
quantizers, torch's pruning utilities, ...) run in the same process as netpress so the ratios hold on
a noisy machine.

Example:
    >>> from netpress.bench import suite_names
    >>> "magnitude" in suite_names()
    True
"""

from __future__ import annotations

import importlib
import json
import os
import platform
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from netpress.core.errors import DependencyError, RecipeError

ROW_KEYS = ("suite", "case", "tool", "method", "metric_name", "metric", "size_bytes",
            "latency_ms", "speedup_vs_fp32", "compress_seconds")

# suite name -> its parts, "module:function" each; a part takes (quick: bool) and returns rows.
# A suite may be split across files (one per area); its rows are concatenated in this order.
SUITES: dict[str, list[str]] = {
    "magnitude": ["netpress.bench.magnitude:run"],
    "quantize": ["netpress.bench.quantize_small:run", "netpress.bench.quantize_cnn:run",
                 "netpress.bench.quantize_minilm:run"],
    "quantize_small": ["netpress.bench.quantize_small:run"],
    "quantize_cnn": ["netpress.bench.quantize_cnn:run"],
    "quantize_minilm": ["netpress.bench.quantize_minilm:run"],
    "prune": ["netpress.bench.prune_structured:run", "netpress.bench.prune_unstructured:run"],
    "prune_unstructured": ["netpress.bench.prune_unstructured:run"],  # the P2/P3/P5-P7 part alone
    "prune_structured": ["netpress.bench.prune_structured:run"],
    "distill": ["netpress.bench.distill:run", "netpress.bench.distill_svd:run"],
    "distill_svd": ["netpress.bench.distill_svd:run"],  # the MiniLM SVD case alone
    "plan": ["netpress.bench.plan:run", "netpress.bench.plan_nas:run"],
    "plan_front": ["netpress.bench.plan:run"],
    "plan_nas": ["netpress.bench.plan_nas:run"],
}


def suite_names() -> list[str]:
    return sorted(SUITES)


def row(**values: Any) -> dict[str, Any]:
    """A bench row; the DESIGN §2 keys are required, extra keys are kept."""
    missing = [k for k in ROW_KEYS if k not in values]
    assert not missing, f"bench row lacks {missing}"
    return values


def run_suite(
    name: str, out: str | Path, markdown: str | Path | None = None, quick: bool = False
) -> list[dict[str, Any]]:
    """Run suite ``name``; write rows to ``out`` (JSON) and optionally BENCHMARKS.md.

    Raises:
        RecipeError: unknown suite (lists the known ones).
        DependencyError: a package the suite runs (a peer such as ``nncf``) is not installed;
            nothing is written.
    """
    if name not in SUITES:
        raise RecipeError("bench suite", got=name, expected=f"one of {', '.join(suite_names())}",
                          fix="pick a suite listed here")
    if not SUITES[name]:
        ready = ", ".join(s for s in SUITES if SUITES[s])
        raise RecipeError("bench suite", got=name, expected="a suite with cases",
                          fix=f"suite {name!r} has no cases yet; try: {ready}")
    rows: list[dict[str, Any]] = []
    for part in SUITES[name]:
        module, func = part.split(":")
        fn: Callable[[bool], list[dict[str, Any]]] = getattr(importlib.import_module(module), func)
        try:
            rows += fn(quick)
        except ModuleNotFoundError as exc:
            raise DependencyError(f"bench suite {name}", got=f"no module {exc.name!r}",
                                  expected="the peer toolkits the benchmarks run side by side",
                                  fix="install them with `scripts/install --bench` (or "
                                      "`pip install -e '.[bench]'`) and run the suite again") from exc
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, out)
    if markdown is not None:
        update_markdown(Path(markdown), name, rows, quick)
    return rows


def machine() -> str:
    """One line describing where the numbers were taken."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, Python {platform.python_version()}"


def markdown_table(rows: list[dict[str, Any]]) -> str:
    head = ("case", "tool", "method", "runtime", "metric", "size (bytes)", "latency ms",
            "speed-up vs fp32", "compress s", "notes")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lat = "" if r["latency_ms"] is None else f"{r['latency_ms']:.3f}"
        sp = "" if r["speedup_vs_fp32"] is None else f"{r['speedup_vs_fp32']:.2f}x"
        cs = "" if r["compress_seconds"] is None else f"{r['compress_seconds']:.1f}"
        metric = "" if r["metric"] is None else f"{r['metric_name']} {r['metric']:.4f}"
        lines.append("| " + " | ".join([
            r["case"], r["tool"], r["method"], str(r.get("runtime", "")), metric,
            f"{r['size_bytes']:,}", lat, sp, cs, str(r.get("notes", "")),
        ]) + " |")
    return "\n".join(lines)


def update_markdown(path: Path, suite: str, rows: list[dict[str, Any]], quick: bool) -> None:
    """Replace (or append) this suite's section of BENCHMARKS.md."""
    start, end = f"<!-- bench:{suite}:start -->", f"<!-- bench:{suite}:end -->"
    threads = sorted({str(r.get("threads", "")) for r in rows})
    batches = sorted({str(r.get("batch", "")) for r in rows})
    body = (
        f"{start}\n## Suite `{suite}`\n\n"
        f"Command: `netpress bench {suite} --out bench-{suite}.json --markdown BENCHMARKS.md`"
        f"{' --quick' if quick else ''}  \n"
        f"Machine: {machine()}; threads {', '.join(threads)}; batch {', '.join(batches)}.\n\n"
        f"{markdown_table(rows)}\n{end}"
    )
    text = path.read_text(encoding="utf-8") if path.exists() else (
        "# netpress benchmarks\n\nGenerated by `netpress bench SUITE --markdown BENCHMARKS.md`; "
        "every table is rewritten by its command. Anchors run in the same process as netpress.\n"
    )
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: body, text) if pattern.search(text) else text.rstrip() + "\n\n" + body
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text + ("" if text.endswith("\n") else "\n"), encoding="utf-8")
    os.replace(tmp, path)


__all__ = ["SUITES", "run_suite", "row", "suite_names", "update_markdown", "ROW_KEYS"]
