"""``netpress export DIR --format onnx``: an artifact to a deployable file, verified.

Example:
    >>> from netpress.export.cli_export import export_artifact  # doctest: +SKIP
    >>> export_artifact("digits-out", "onnx", None)  # writes digits-out.onnx
"""

from __future__ import annotations

from pathlib import Path

from netpress.core.errors import ArtifactError, RecipeError

FORMATS = ("onnx",)


def export_artifact(path: str | Path, fmt: str, out: str | Path | None, force: bool = False) -> Path:
    """Export the artifact at ``path``; checks ONNX Runtime against PyTorch on held-out data.

    Args:
        path: artifact directory.
        fmt: ``onnx``.
        out: output file (default: ``<DIR>.onnx`` beside the directory).
        force: overwrite an existing output file.

    Raises:
        RecipeError: unknown format. ArtifactError: bad artifact or existing output.
    """
    from netpress.core.recipe import Recipe
    from netpress.export.artifact import load, read_manifest
    from netpress.export.onnx import export_onnx, verify_onnx, verify_tolerance
    from netpress.pipeline import resolve_workload

    if fmt not in FORMATS:
        raise RecipeError("--format", got=fmt, expected=f"one of {', '.join(FORMATS)}",
                          fix="use --format onnx")
    path = Path(path)
    target = Path(out) if out is not None else path.with_name(path.name + ".onnx")
    if target.exists() and not force:
        raise ArtifactError(str(target), got="an existing file", expected="a new file",
                            fix="pass --out elsewhere or --force")
    manifest = read_manifest(path)
    model = load(path)
    recipe = Recipe.from_dict(manifest["recipe"])
    work = resolve_workload(recipe)
    export_onnx(model, work.evaluation[0].slice(recipe.batch), target, runtime=recipe.runtime)
    verify_onnx(model, target, work.evaluation[:1], **verify_tolerance(target))
    return target


__all__ = ["export_artifact", "FORMATS"]
