"""The ``netpress`` command line: each command parses its arguments, then calls the public API.

User errors print one line (what, expected, fix) and exit 2; a broken constraint exits 1;
Ctrl-C exits 130. No traceback unless ``NETPRESS_DEBUG=1``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="netpress: compress PyTorch models and measure the result for real.",
)
out_console = Console()
err_console = Console(stderr=True)

OutOpt = Annotated[Path, typer.Option("--out", help="Output directory (must not exist).")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Replace an existing output directory.")]


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", help="Output directory.")] = Path("netpress-demo"),
    force: ForceOpt = False,
) -> None:
    """Compress the real MobileNetV2 and a digits CNN; print original vs compressed."""
    from netpress.demo import run_demo

    run_demo(out, force=force, console=out_console)


@app.command()
def compress(
    recipe: Annotated[Path, typer.Argument(help="Recipe file (.yaml, .yml or .json).")],
    out: OutOpt,
    force: ForceOpt = False,
    max_drop: Annotated[
        float | None, typer.Option("--max-drop", help="Fail if the metric drops more than this.")
    ] = None,
    keep_failed: Annotated[
        bool, typer.Option("--keep-failed", help="Keep the artifact even when --max-drop fails.")
    ] = False,
) -> None:
    """Run RECIPE and write the artifact, metrics.json and report.html to --out."""
    import netpress

    result = netpress.compress(recipe, out, force=force, max_drop=max_drop,
                               keep_failed=keep_failed)
    print_comparison(result.metrics, result.secondary)
    out_console.print(f"wrote {result.out}")


@app.command()
def evaluate(path: Annotated[Path, typer.Argument(help="Artifact directory.")]) -> None:
    """Reload an artifact and re-measure its metric on the held-out data."""
    import netpress

    scores = netpress.evaluate_dir(path)
    out_console.print_json(json.dumps(scores))


@app.command()
def export(
    path: Annotated[Path, typer.Argument(help="Artifact directory.")],
    format: Annotated[str, typer.Option("--format", help="Export format: onnx.")] = "onnx",
    out: Annotated[Path | None, typer.Option("--out", help="Output file.")] = None,
    force: ForceOpt = False,
) -> None:
    """Export an artifact's model (ONNX, checked in ONNX Runtime against PyTorch)."""
    from netpress.export.cli_export import export_artifact

    written = export_artifact(path, format, out, force=force)
    out_console.print(f"wrote {written}")


@app.command()
def inspect(target: Annotated[str, typer.Argument(help="Artifact directory or zoo:NAME.")]) -> None:
    """Show an artifact's manifest summary, or a zoo model's layers."""
    from netpress.inspect import inspect_target

    inspect_target(target, out_console)


@app.command()
def techniques() -> None:
    """List every registered technique, one line each."""
    import netpress

    table = Table("stage", "method", "what it does")
    for t in netpress.techniques():
        table.add_row(t.stage, t.method, t.summary)
    out_console.print(table)


@app.command()
def bench(
    suite: Annotated[str, typer.Argument(help="Benchmark suite name (see --help of bench).")],
    out: Annotated[Path, typer.Option("--out", help="JSON rows file.")] = Path("bench.json"),
    markdown: Annotated[
        Path | None, typer.Option("--markdown", help="Update this BENCHMARKS.md section.")
    ] = None,
    quick: Annotated[bool, typer.Option("--quick", help="Fewer runs (smoke test).")] = False,
) -> None:
    """Run a benchmark SUITE side by side with its anchors; write JSON rows (DESIGN §2)."""
    from netpress.bench import run_suite

    rows = run_suite(suite, out, markdown=markdown, quick=quick)
    out_console.print(f"wrote {len(rows)} rows to {out}")


@app.command()
def plan(
    target: Annotated[str, typer.Argument(help="Recipe file (its plan: block) or a model, e.g. "
                                          "zoo:mobilenet_v2.")],
    out: OutOpt,
    max_size: Annotated[float | None, typer.Option("--max-size", help="Max artifact MB.")] = None,
    min_speedup: Annotated[float | None, typer.Option(
        "--min-speedup", help="Min speed-up vs the original on the same runtime.")] = None,
    max_latency_ms: Annotated[float | None, typer.Option(
        "--max-latency-ms", help="Max measured latency (ms).")] = None,
    max_drop: Annotated[float | None, typer.Option(
        "--max-drop", help="Max metric drop vs the original (metric units).")] = None,
    budget_minutes: Annotated[float | None, typer.Option(
        "--budget-minutes", help="Wall-time budget of the whole run (loading, sensitivity, "
                                 "trials, verification).")] = None,
    validation: Annotated[float | None, typer.Option(
        "--validation", help="Share of the calibration examples held out to score trials "
                             "(default 0.5); the evaluation split only reports the chosen "
                             "point.")] = None,
    trials: Annotated[int | None, typer.Option(
        "--trials", help="Total trials of the study (resumed ones count).")] = None,
    runtime: Annotated[str | None, typer.Option(
        "--runtime", help="onnxruntime | openvino | torch.")] = None,
    workers: Annotated[str | None, typer.Option(
        "--workers", help="inprocess (default), ray, or a Ray address.")] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Search and compression seed.")] = None,
    metric: Annotated[str | None, typer.Option(
        "--metric", help="Metric to optimise, e.g. top1_agreement_confident.")] = None,
    speedup_vs: Annotated[str | None, typer.Option(
        "--speedup-vs", help="Runtime of the reference latency (default: --runtime).")] = None,
    force: ForceOpt = False,
) -> None:
    """Search compression settings under constraints; write the front and the best artifact.

    The study is stored in DIR.plan.db beside DIR: running the same command again resumes it.
    """
    from netpress.search.planner import plan as run_plan

    result = run_plan(target, out, max_size_mb=max_size, min_speedup=min_speedup,
                      max_latency_ms=max_latency_ms, max_drop=max_drop,
                      budget_minutes=budget_minutes, trials=trials, runtime=runtime,
                      workers=workers, seed=seed, metric=metric, speedup_vs=speedup_vs,
                      force=force, validation=validation)
    table = Table("trial", "point", "metric (validation)", "MB", "ms", "speed-up", "front",
                  title="plan")
    from netpress.search.space import describe

    for r in result.trials:
        if r["state"] == "complete":
            table.add_row(str(r["number"]), describe(r["params"]), f"{r['metric']:.4f}",
                          f"{r['size_bytes'] / 1e6:.3f}", f"{r['latency_ms']:.3f}",
                          f"{r['speedup']:.2f}x", "*" if r.get("on_front") else "")
        else:
            table.add_row(str(r["number"]), describe(r["params"]), "failed", "", "", "", "")
    out_console.print(table)
    best = result.best or {}
    claim = best.get("verified", {})
    out_console.print(f"best: trial {best.get('number')} ({describe(best.get('params', {}))}); "
                      f"metric on the evaluation split {claim.get('metric', float('nan')):.4f}, "
                      f"{claim.get('speedup', float('nan')):.2f}x re-measured; "
                      f"study: {result.storage}")
    out_console.print(f"wrote {result.out}")


@app.command()
def reliability(
    out: Annotated[Path, typer.Option("--out", help="Report file.")] = Path("RELIABILITY.md"),
    quick: Annotated[bool, typer.Option("--quick", help="Fewer cases, no zoo runs.")] = False,
) -> None:
    """Fuzz recipes, tamper with artifacts, kill runs, check determinism; write the report."""
    from netpress.reliability import run_all

    if run_all(out, quick=quick, console=out_console):
        raise typer.Exit(1)


def print_comparison(metrics: dict, secondary: dict | None = None, title: str | None = None) -> None:
    """The before/after table on stdout."""
    from netpress.report.html import table_rows

    table = Table("", "original", "compressed", "original / compressed",
                  title=title or metrics["model"])
    for row in table_rows(metrics):
        table.add_row(*row)
    for key in sorted((secondary or {}).get("compressed", {})):
        if key == metrics["metric_name"] or key == "confident_count":
            continue
        a = secondary["original"].get(key)  # type: ignore[index]
        b = secondary["compressed"][key]  # type: ignore[index]
        table.add_row(key, f"{a:.4f}", f"{b:.4f}", "")
    out_console.print(table)
    out_console.print(f"latency: {metrics['runtime']}, {metrics['threads']} threads, "
                      f"batch {metrics['batch']}, median of warm runs")


def main() -> None:
    """Console entry point with the error policy of the module doc."""
    from rich.markup import escape

    from netpress.core.errors import NetpressError

    debug = os.environ.get("NETPRESS_DEBUG") == "1"
    try:
        code = app(standalone_mode=False)  # typer turns Ctrl-C/SIGTERM and typer.Exit into a code
        if isinstance(code, int) and code:
            if code == 130:
                err_console.print("interrupted: nothing was written")
            sys.exit(code)
    except NetpressError as exc:
        # escaped: a recipe key like "[/red]" must neither crash rich nor style the terminal
        err_console.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False,
                          soft_wrap=True, emoji=False)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        err_console.print("interrupted: nothing was written")
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001 - the last line of defence
        import click

        if isinstance(exc, click.exceptions.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        if isinstance(exc, click.exceptions.Abort):
            err_console.print("interrupted: nothing was written")
            sys.exit(130)
        if debug:
            raise
        err_console.print(f"[red]internal error:[/red] {type(exc).__name__}: {escape(str(exc))}. "
                          "Re-run with NETPRESS_DEBUG=1 for details and report it.",
                          highlight=False, soft_wrap=True)
        sys.exit(3)


if __name__ == "__main__":
    main()
