"""The planner's outputs: front.json, recipe.yaml, the best artifact and report.html (front plots).

``report.html`` holds: the constraints and whether they were met, the original-vs-best table
(when a point met them), two scatter plots (size vs metric, latency vs metric; Pareto front
highlighted, the best point circled, constraint limits dashed), the sensitivity heat map, and a
table of every trial (failed ones with their error).

Example:
    >>> from netpress.search.plan_report import front_png
    >>> rows = [{"state": "complete", "metric": 0.9, "size_bytes": 10, "latency_ms": 2.0,
    ...          "on_front": True, "number": 0, "feasible": True}]
    >>> meta = {"metric_name": "accuracy", "constraints": {}, "original": {"metric": 1.0,
    ...         "size_bytes": 40, "latency_ms": 4.0, "speedup": 1.0}, "best": 0}
    >>> front_png(rows, meta, "size_bytes")[:4] == b"\\x89PNG"
    True
"""

from __future__ import annotations

import base64
import html
import io
import json
import shutil
from pathlib import Path
from typing import Any

import yaml


def front_png(rows: list[dict[str, Any]], meta: dict[str, Any], x: str) -> bytes:
    """Scatter of ``x`` (``size_bytes`` or ``latency_ms``) vs the metric; front highlighted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if r["state"] == "complete"]
    scale = 1e6 if x == "size_bytes" else 1.0
    label = "artifact size (MB)" if x == "size_bytes" else "latency (ms)"
    fig, ax = plt.subplots(figsize=(6, 4))
    off = [r for r in done if not r.get("on_front")]
    on = sorted((r for r in done if r.get("on_front")), key=lambda r: r[x])
    ax.scatter([r[x] / scale for r in off], [r["metric"] for r in off], c="#bbbbbb",
               label="trials", s=18)
    ax.plot([r[x] / scale for r in on], [r["metric"] for r in on], "o-", c="#d62728", ms=5,
            label="Pareto front (3 objectives)")
    o = meta["original"]
    ax.scatter([o[x] / scale], [o["metric"]], marker="*", s=120, c="k", label="original")
    best = [r for r in done if r["number"] == meta.get("best")]
    if best:
        ax.scatter([best[0][x] / scale], [best[0]["metric"]], s=160, facecolors="none",
                   edgecolors="#2ca02c", linewidths=2, label="best (meets constraints)")
    cons = meta.get("constraints", {})
    if x == "size_bytes" and "max_size_bytes" in cons:
        ax.axvline(cons["max_size_bytes"] / scale, ls="--", c="#1f77b4", lw=1)
    if x == "latency_ms" and "max_latency_ms" in cons:
        ax.axvline(cons["max_latency_ms"], ls="--", c="#1f77b4", lw=1)
    if "max_drop" in cons:
        sign = 1 if meta.get("metric_lower_is_better") else -1
        ax.axhline(o["metric"] + sign * cons["max_drop"], ls="--", c="#1f77b4", lw=1)
    ax.set_xlabel(label)
    ax.set_ylabel(meta["metric_name"])
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{alt}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def render(meta: dict[str, Any], rows: list[dict[str, Any]], heatmap: bytes | None,
           metrics: dict[str, Any] | None) -> str:
    """The plan report page."""
    from netpress.report.html import table_rows
    from netpress.search.space import describe

    esc = html.escape
    splits = meta.get("splits", {})
    best = next((r for r in rows if r["number"] == meta.get("best")), None)
    claim = ""
    if best is not None and "verified" in best:
        v = best["verified"]
        claim = (f" Re-measured: {esc(meta['metric_name'])} {v['metric']:.4f} on the evaluation "
                 f"split (validation {best['metric']:.4f}), {v['size_bytes'] / 1e6:.3f} MB, "
                 f"{v['speedup']:.2f}x.")
    verdict = ("<p><b>Constraints met.</b> Best: trial "
               f"{meta['best']}.{claim}</p>" if meta["met"] else
               f"<p><b>No point meets the constraints</b>; binding: "
               f"{esc(', '.join(meta['binding']) or 'n/a')}. No artifact was written.</p>")
    table = ""
    if metrics is not None:
        body = "".join(f"<tr><td>{esc(a)}</td><td>{esc(b)}</td><td>{esc(c)}</td><td>{esc(d)}</td>"
                       "</tr>" for a, b, c, d in table_rows(metrics))
        table = ("<h2>Original vs best</h2><table><tr><th></th><th>original</th>"
                 f"<th>best</th><th>original / best</th></tr>{body}</table>")
    trs = []
    for r in rows:
        if r["state"] == "complete":
            cells = [str(r["number"]), describe(r["params"]), f"{r['metric']:.4f}",
                     f"{r['size_bytes'] / 1e6:.3f}", f"{r['latency_ms']:.3f}",
                     f"{r['speedup']:.2f}x", "yes" if r.get("on_front") else "",
                     "yes" if r["feasible"] else ", ".join(r["violations"])]
        else:
            cells = [str(r["number"]), describe(r["params"]), "failed", "", "", "", "",
                     r["error"].splitlines()[0][:160]]
        trs.append("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in cells) + "</tr>")
    o = meta["original"]
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>netpress plan: {esc(meta['model'])}</title>
<style>body{{font-family:sans-serif;max-width:70em;margin:2em auto}}
table{{border-collapse:collapse;font-size:90%}}td,th{{border:1px solid #ccc;padding:3px 8px}}</style>
</head><body><h1>netpress plan: {esc(meta['model'])}</h1>
<p>Constraints: {esc(meta['constraints_text'])}. Metric: {esc(meta['metric_name'])}. Trials, the
front and the constraint checks use the {esc(splits.get('trials', 'validation split'))} (original
{o['metric']:.4f}); the chosen point's reported metric uses the {esc(splits.get('claim',
'evaluation split'))} (original {o.get('metric_evaluation', float('nan')):.4f}).
Runtime <b>{esc(meta['runtime'])}</b>,
{meta['threads']} thread(s), batch {meta['batch']}; speed-up vs the original on
{esc(meta['speedup_vs'])} ({o['ref_latency_ms']:.3f} ms). Latency: {esc(meta['latency_method'])}.</p>
{verdict}{table}
<h2>Front</h2>{_img(front_png(rows, meta, "size_bytes"), "size vs metric")}
{_img(front_png(rows, meta, "latency_ms"), "latency vs metric")}
<h2>Per-layer sensitivity</h2><p>{esc(meta['sensitivity']['data'])}; drop in points
+ 100 x loss increase, one layer perturbed at a time.</p>
{_img(heatmap, "sensitivity heat map") if heatmap else ""}
<h2>Trials</h2><table><tr><th>#</th><th>point</th><th>{esc(meta['metric_name'])}</th><th>MB</th>
<th>ms</th><th>speed-up</th><th>front</th><th>meets constraints</th></tr>{''.join(trs)}</table>
<h2>Study</h2><pre>{esc(json.dumps({k: meta[k] for k in ('storage', 'families', 'workers',
    'trials_requested', 'new_trials')}, indent=2))}</pre>
</body></html>
"""


def write_outputs(out: Path, force: bool, meta: dict[str, Any], rows: list[dict[str, Any]],
                  table: Any, recipe: Any, work: Any, built: dict[str, Any] | None) -> None:
    """Write DIR atomically: always front.json and report.html; the artifact when ``built``."""
    from netpress.export.artifact import save_artifact
    from netpress.pipeline import atomic_dir
    from netpress.report.metrics import Measurement, build_metrics, write_json
    from netpress.search.sensitivity import heatmap_png

    heat = heatmap_png(table) if table.layers else None
    metrics = None
    with atomic_dir(out, force) as tmp:
        extra = []
        if built is not None:
            from netpress.measure import count_macs, count_nonzero, count_params

            o, lat = meta["original"], built["latency"]
            model, rec = built["model"], built["recipe"]
            save_artifact(model, tmp / ".size", source=work.source, recipe=rec.to_dict())
            size = sum(p.stat().st_size for p in (tmp / ".size").glob("*.safetensors"))
            shutil.rmtree(tmp / ".size")
            orig = Measurement(o["params"], o["nonzero_params"], o["macs"], o["size_bytes"],
                               round(lat["orig"], 4), o["metric_main"])
            comp = Measurement(count_params(model), count_nonzero(model),
                               count_macs(model, work.evaluation[0].slice(rec.batch)), size,
                               round(lat["best"], 4), built["value"])
            metrics = build_metrics(rec.model, rec.to_dict(), rec.runtime, rec.threads, rec.batch,
                                    work.metric, orig, comp, built["seconds"])
            if built["deployed"].onnx_path is not None:
                shutil.copyfile(built["deployed"].onnx_path, tmp / "model.onnx")
                extra.append(tmp / "model.onnx")
            write_json(tmp / "metrics.json", metrics)
            text = yaml.safe_dump(rec.to_dict(), sort_keys=False)
            (tmp / "recipe.yaml").write_text(
                "# reproduces the best point of `netpress plan`: netpress compress recipe.yaml "
                "--out DIR\n" + text, encoding="utf-8")
            extra += [tmp / "metrics.json", tmp / "recipe.yaml"]
        (tmp / "front.json").write_text(json.dumps({**meta, "trials": rows}, indent=1,
                                                   default=str), encoding="utf-8")
        (tmp / "report.html").write_text(render(meta, rows, heat, metrics), encoding="utf-8")
        extra += [tmp / "front.json", tmp / "report.html"]
        if built is not None:
            save_artifact(built["model"], tmp, source=work.source, recipe=built["recipe"].to_dict(),
                          metrics={**metrics, "secondary": {"compressed": built["secondary"]}},
                          extra_files=extra)


__all__ = ["front_png", "render", "write_outputs"]
