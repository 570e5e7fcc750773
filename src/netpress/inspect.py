"""``netpress inspect``: what is in an artifact, or which layers a zoo model has.

Module names printed here are the ones ``targets`` / ``ignore`` patterns match.
"""

from __future__ import annotations

from pathlib import Path

import torch.nn as nn
from rich.console import Console
from rich.table import Table

from netpress.core.errors import ArtifactError


def layer_table(model: nn.Module, title: str) -> Table:
    """One row per leaf module with parameters: name, class, shape of weight, parameter count."""
    table = Table("module", "class", "weight shape", "params", title=title)
    for name, module in model.named_modules():
        own = list(module.parameters(recurse=False)) + [
            b for n, b in module.named_buffers(recurse=False) if "weight" in n
        ]
        if not own:
            continue
        weight = getattr(module, "weight", None)
        if weight is None:
            weight = getattr(module, "qweight", None)
        shape = "x".join(map(str, weight.shape)) if weight is not None else ""
        table.add_row(name, type(module).__name__, shape, f"{sum(p.numel() for p in own):,}")
    return table


def inspect_target(target: str, console: Console) -> None:
    """Print the manifest summary and layer table of an artifact dir, or a zoo model's layers."""
    if target.startswith("zoo:"):
        from netpress import zoo

        console.print(layer_table(zoo.build_architecture(target[4:]), target))
        return
    from netpress.export.artifact import load, read_manifest

    path = Path(target)
    if not path.is_dir():
        raise ArtifactError(target, got="not a directory", expected="an artifact directory or zoo:NAME",
                            fix="pass the --out directory of `netpress compress`")
    manifest = read_manifest(path)
    summary = Table("field", "value", title=f"artifact {path}")
    summary.add_row("source", str(manifest.get("source")))
    for f, info in sorted(manifest.get("files", {}).items()):
        summary.add_row(f"file {f}", f"{info['bytes']:,} bytes  sha256 {info['sha256'][:16]}…")
    metrics = manifest.get("metrics") or {}
    if "ratios" in metrics:
        summary.add_row("ratios (orig/comp)", str(metrics["ratios"]))
        summary.add_row(metrics["metric_name"],
                        f"{metrics['original']['metric']:.4f} -> {metrics['compressed']['metric']:.4f}")
    console.print(summary)
    console.print(layer_table(load(path), "layers"))


__all__ = ["inspect_target", "layer_table"]
