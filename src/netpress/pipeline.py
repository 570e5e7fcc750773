"""The compression run: resolve model and data, measure, apply stages, measure again, write DIR.

``compress`` is what ``netpress compress RECIPE --out DIR`` calls. The output directory is built in
a hidden sibling temporary directory and renamed into place at the very end, so an error, Ctrl-C or
SIGTERM leaves either the previous DIR untouched or no DIR at all; never a half-written one.

Example:
    >>> import netpress  # doctest: +SKIP
    >>> result = netpress.compress({"model": "zoo:digits_cnn", "data": "zoo:digits",
    ...     "stages": [{"prune": {"method": "magnitude", "sparsity": 0.5}}]}, out="digits-out")
    >>> result.metrics["ratios"]["size"] > 1.5
    True
"""

from __future__ import annotations

import copy
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from netpress.api import stage_report
from netpress.core.config import StageContext, get_technique
from netpress.core.data import Batch, as_batches
from netpress.core.errors import ArtifactError, ConstraintError, ModelError, RecipeError
from netpress.core.progress import status
from netpress.core.recipe import Recipe
from netpress.report.metrics import Measurement, build_metrics, write_json


@dataclass
class Workload:
    """A resolved model and its data: what every measurement runs on."""

    model: nn.Module
    source: dict[str, Any]
    calibration: list[Batch]
    evaluation: list[Batch]
    metric: str
    task: str = "classification"
    train: list[Batch] = field(default_factory=list)


@dataclass
class Result:
    """What a compression run produced."""

    model: nn.Module
    metrics: dict[str, Any]
    secondary: dict[str, dict[str, float]]
    notes: dict[str, Any]
    out: Path | None


# ---------------------------------------------------------------------------------------- inputs
def resolve_model(spec: str) -> tuple[nn.Module, dict[str, Any]]:
    """``zoo:NAME`` or a ``.pt2`` torch.export file → (model in eval mode, artifact source)."""
    from netpress import zoo
    from netpress.export.artifact import load_model_file

    if spec.startswith("zoo:"):
        name = spec[4:]
        return zoo.load_model(name), {"kind": "zoo", "name": name}
    path = Path(spec)
    if not path.exists():
        raise ModelError(
            f"model {spec!r}", got="no such file or zoo name",
            expected=f"zoo:NAME ({', '.join('zoo:' + n for n in zoo.model_names())}) or a .pt2 file",
            fix="check the path, or pick a zoo model",
        )
    return load_model_file(path), {"kind": "export"}


def resolve_workload(recipe: Recipe) -> Workload:
    """Load the recipe's model and data; the metric defaults to the data's own."""
    from netpress import zoo

    model, source = resolve_model(recipe.model)
    data_name = recipe.data
    if data_name is None:
        if source["kind"] != "zoo":
            raise RecipeError("recipe.data", got=None, expected="zoo:NAME for a non-zoo model",
                              fix="add e.g. `data: zoo:photos`")
        data_name = "zoo:" + zoo.default_data(source["name"])
    if not data_name.startswith("zoo:"):
        raise RecipeError("recipe.data", got=data_name,
                          expected=f"zoo:NAME ({', '.join(zoo.data_names())})",
                          fix="use a zoo data set, or the Python API to pass your own data")
    bundle = zoo.load_data(data_name[4:], seed=recipe.seed)
    evaluation = bundle.evaluation
    if recipe.eval_limit:
        evaluation = as_batches(evaluation, limit=recipe.eval_limit, where="evaluation data")
    return Workload(model, source, bundle.calibration, evaluation,
                    recipe.metric or bundle.default_metric, bundle.task, bundle.train)


# ------------------------------------------------------------------------------------- measuring
@dataclass
class Deployed:
    """A model as the chosen runtime executes it: outputs and latency come from the same place.

    For ``onnxruntime`` / ``openvino`` the model is exported to ONNX once and both the metric and
    the latency are measured on that file, so the numbers describe what a user deploys.
    """

    runtime: str
    threads: int
    model: nn.Module
    onnx_path: Path | None = None
    runner: Any = None

    def outputs(self, batches: list[Batch]) -> list[torch.Tensor]:
        from netpress.core.progress import track
        from netpress.measure import collect_outputs

        if self.runner is None:
            return collect_outputs(self.model, batches)
        return [torch.from_numpy(self.runner.run(b)) for b in track(batches, f"evaluating ({self.runtime})")]

    def latency_ms(self, example: Batch) -> float:
        from netpress.measure import latency_onnx, latency_torch

        if self.runtime == "torch":
            return latency_torch(self.model, example, threads=self.threads).median_ms
        if self.runtime == "openvino":
            from netpress.export.openvino import latency_openvino

            return latency_openvino(self.onnx_path, example, threads=self.threads).median_ms
        return latency_onnx(self.onnx_path, example, threads=self.threads).median_ms


def deploy(model: nn.Module, example: Batch, runtime: str, threads: int, path: Path) -> Deployed:
    """Export ``model`` for ``runtime`` (ONNX at ``path`` unless the runtime is torch)."""
    if runtime == "torch":
        return Deployed(runtime, threads, model)
    from netpress.export.onnx import OnnxRunner, export_onnx

    export_onnx(model, example, path, runtime=runtime)
    if runtime == "openvino":
        from netpress.export.openvino import OpenVinoRunner

        return Deployed(runtime, threads, model, path, OpenVinoRunner(path, threads=threads))
    return Deployed(runtime, threads, model, path, OnnxRunner(path, threads=threads))


def quality(
    work: Workload, deployed: Deployed, reference: list[torch.Tensor] | None
) -> tuple[float, dict[str, float], list[torch.Tensor]]:
    """The main metric, secondary metrics and the outputs (so the original's can be reused)."""
    from netpress.measure import compute_metric, confident_agreement

    outputs = deployed.outputs(work.evaluation)
    ref = reference if reference is not None else outputs
    secondary: dict[str, float] = {}
    if work.task == "classification":
        secondary["top1_agreement"] = compute_metric("top1_agreement", outputs, work.evaluation, ref)
        secondary["kl"] = compute_metric("kl", outputs, work.evaluation, ref)
        value, count = confident_agreement(outputs, ref, threshold=0.5)
        if count:  # undefined (nan) when the reference is confident on no example
            secondary["top1_agreement_confident"] = value
        secondary["confident_count"] = float(count)
        if work.evaluation[0].target is not None:
            secondary["accuracy"] = compute_metric("accuracy", outputs, work.evaluation, ref)
    else:
        secondary["cosine"] = compute_metric("cosine", outputs, work.evaluation, ref)
    main = compute_metric(work.metric, outputs, work.evaluation, ref)
    return main, secondary, outputs


def measure(deployed: Deployed, work: Workload, recipe: Recipe, size_bytes: int) -> Measurement:
    """Params, non-zeros, MACs and latency (the metric is filled in by the caller)."""
    from netpress.measure import count_macs, count_nonzero, count_params

    model = deployed.model
    example = work.evaluation[0].slice(recipe.batch)
    status(f"measuring latency ({recipe.runtime}, {recipe.threads} threads, batch {recipe.batch})")
    return Measurement(
        params=count_params(model),
        nonzero_params=count_nonzero(model),
        macs=count_macs(model, example),
        size_bytes=size_bytes,
        latency_ms=round(deployed.latency_ms(example), 4),
        metric=float("nan"),
    )


def check_finite(model: nn.Module, outputs: list[torch.Tensor]) -> None:
    """NaN/Inf in weights or outputs is caught before anything is exported."""
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ModelError(f"compressed model tensor {name!r}", got="NaN or Inf values",
                             expected="finite weights",
                             fix="lower the compression strength or check the input model")
    if any(not bool(torch.isfinite(o).all()) for o in outputs if o.is_floating_point()):
        raise ModelError("compressed model outputs", got="NaN or Inf", expected="finite outputs",
                         fix="lower the compression strength (e.g. fewer bits or less sparsity)")


# ------------------------------------------------------------------------------------ the output
@contextmanager
def atomic_dir(out: Path, force: bool) -> Iterator[Path]:
    """Yield a hidden temporary directory that replaces ``out`` only if the block succeeds.

    Raises:
        ArtifactError: ``out`` exists and ``force`` is false (checked before any work).
    """
    out = out.absolute()
    check_out(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    _sweep_stale(out)
    previous = signal.getsignal(signal.SIGTERM)
    in_main = _is_main_thread()
    if in_main:  # before the temp dir exists: a SIGTERM right after mkdtemp must not leak it
        signal.signal(signal.SIGTERM, _raise_interrupt)
    tmp: Path | None = None
    try:
        # a signal arriving between mkdtemp and the assignment would leak the dir: hold it back
        held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        try:
            tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)
        yield tmp
        # SIGINT/SIGTERM wait until both renames are done (a SIGKILL between them leaves the
        # previous DIR at .NAME.old-PID, which the next run's _sweep_stale puts back)
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        try:
            if out.exists():
                old = out.with_name(f".{out.name}.old-{os.getpid()}")
                os.replace(out, old)
                os.replace(tmp, out)
            else:
                old = None
                os.replace(tmp, out)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, previous)
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def check_out(out: Path, force: bool) -> None:
    """Refuse an existing output path unless ``force`` (before any work is done)."""
    if out.exists() and not force:
        raise ArtifactError(str(out), got="an existing path", expected="a new output directory",
                            fix="choose another --out, or pass --force to replace it")


def _is_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _sweep_stale(out: Path) -> None:
    """Remove temporary dirs left by a run that was SIGKILLed (their process is gone); a
    previous DIR it had moved aside (``.NAME.old-PID``) is put back if DIR is missing."""
    for p in [*out.parent.glob(f".{out.name}.tmp-*"), *out.parent.glob(f".{out.name}.old-*")]:
        try:
            pid = int(p.name[len(out.name) + 1:].split("-")[1])
        except (IndexError, ValueError):
            continue
        if _alive(pid):
            continue
        if ".old-" in p.name[len(out.name) + 1:] and not out.exists():
            os.replace(p, out)
        else:
            shutil.rmtree(p, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ------------------------------------------------------------------------------------ the run
def _student_source(work: Workload, notes: dict[str, Any]) -> Workload:
    """After a distill stage with ``student: {model: ...}`` the artifact rebuilds that student
    (its source), not the recipe's model; the original was measured and saved already."""
    sources = [n["student_source"] for n in notes.values()
               if isinstance(n, dict) and "student_source" in n]
    return replace(work, source=sources[-1]) if sources else work


def apply_stages(model: nn.Module, recipe: Recipe, work: Workload) -> tuple[nn.Module, dict]:
    """Run each stage's registered handler in order on a copy of the model."""
    notes: dict[str, Any] = {}
    compressed = copy.deepcopy(model)
    for i, stage in enumerate(recipe.stages):
        tech = get_technique(stage.kind, stage.config.method, f"recipe.stages[{i}]")
        status(f"stage {i + 1}/{len(recipe.stages)}: {stage.kind} {stage.config.method}")
        ctx = StageContext(data=work.calibration, original=model, seed=recipe.seed,
                           advanced={"train": work.train, "task": work.task})
        torch.manual_seed(recipe.seed)
        compressed = tech.handler(compressed, stage.config, ctx)
        notes[f"{i}:{stage.kind}:{stage.config.method}"] = stage_report(stage.kind, compressed, ctx)
    return compressed.eval(), notes


def compress(
    recipe: Recipe | dict[str, Any] | str | Path,
    out: str | Path | None = None,
    *,
    force: bool = False,
    max_drop: float | None = None,
    keep_failed: bool = False,
) -> Result:
    """Compress the recipe's model, measure original vs compressed, and write ``out``.

    Args:
        recipe: a :class:`Recipe`, its dict form, or a path to a YAML/JSON recipe.
        out: output directory (manifest.json, model.safetensors, metrics.json, report.html and
            model.onnx when exported). ``None`` measures without writing anything.
        force: replace an existing ``out``.
        max_drop: fail (no artifact kept) when the metric gets worse by more than this.
        keep_failed: with ``max_drop``, keep the artifact anyway (the error is still raised).

    Returns:
        :class:`Result` with the compressed model, the metrics.json body and notes.

    Raises:
        RecipeError, ModelError, DataError, ArtifactError: bad input, with the fix.
        ConstraintError: ``max_drop`` exceeded.
    """
    from netpress.export.artifact import save_artifact

    if isinstance(recipe, (str, Path)):
        recipe = Recipe.load(recipe)
    elif isinstance(recipe, dict):
        recipe = Recipe.from_dict(recipe)
    if out is not None:
        check_out(Path(out), force)
    torch.manual_seed(recipe.seed)
    torch.set_num_threads(recipe.threads)
    start = time.perf_counter()
    work = resolve_workload(recipe)
    with tempfile.TemporaryDirectory(prefix="netpress-scratch-") as scratch_name:
        scratch = Path(scratch_name)
        status("measuring the original model")
        example = work.evaluation[0].slice(recipe.batch)
        orig_dir = scratch / "original"
        save_artifact(work.model, orig_dir, source=work.source, recipe={}, metrics=None)
        orig_deployed = deploy(work.model, example, recipe.runtime, recipe.threads, scratch / "orig.onnx")
        original = measure(orig_deployed, work, recipe, _weights_bytes(orig_dir))
        original.metric, orig_secondary, ref = quality(work, orig_deployed, None)

        t0 = time.perf_counter()
        compressed_model, notes = apply_stages(work.model, recipe, work)
        stage_seconds = time.perf_counter() - t0
        work = _student_source(work, notes)
        check_finite(compressed_model, [])
        deployed = deploy(compressed_model, example, recipe.runtime, recipe.threads,
                          scratch / "compressed.onnx")
        value, comp_secondary, outputs = quality(work, deployed, ref)
        check_finite(compressed_model, outputs)

        art_dir = scratch / "artifact"
        save_artifact(compressed_model, art_dir, source=work.source, recipe=recipe.to_dict())
        compressed = measure(deployed, work, recipe, _weights_bytes(art_dir))
        compressed.metric = value
        metrics = build_metrics(recipe.model, recipe.to_dict(), recipe.runtime, recipe.threads,
                                recipe.batch, work.metric, original, compressed, stage_seconds)
        secondary = {"original": orig_secondary, "compressed": comp_secondary}
        result = Result(compressed_model, metrics, secondary, notes, None)
        failure = _drop_failure(metrics, max_drop)
        if out is not None and (failure is None or keep_failed):
            result.out = _write_dir(Path(out), force, result, recipe, work, deployed)
        status(f"done in {time.perf_counter() - start:.1f} s")
    if failure is not None:
        raise failure
    return result


def _weights_bytes(art_dir: Path) -> int:
    """Bytes on disk of the artifact's tensor files (the model itself, not the report)."""
    from netpress.measure import file_bytes

    return sum(file_bytes(p) for p in art_dir.glob("*.safetensors"))


_HIGHER_IS_BETTER = {"accuracy": True, "top1_agreement": True, "cosine": True, "kl": False}


def _drop_failure(metrics: dict[str, Any], max_drop: float | None) -> ConstraintError | None:
    if max_drop is None:
        return None
    a, b = metrics["original"]["metric"], metrics["compressed"]["metric"]
    drop = (a - b) if _HIGHER_IS_BETTER[metrics["metric_name"]] else (b - a)
    if drop > max_drop:
        return ConstraintError(
            f"{metrics['metric_name']} dropped by {drop:.4f}", got=f"{a:.4f} -> {b:.4f}",
            expected=f"a drop of at most {max_drop}",
            fix="compress less aggressively, or pass --keep-failed to keep the artifact anyway",
        )
    return None


def _write_dir(
    out: Path, force: bool, result: Result, recipe: Recipe, work: Workload, deployed: Deployed
) -> Path:
    from netpress.export.artifact import save_artifact
    from netpress.export.onnx import export_onnx, verify_onnx, verify_tolerance
    from netpress.report.html import write_html

    with atomic_dir(out, force) as tmp:
        extra = []
        if "onnx" in recipe.export:
            onnx_path = tmp / "model.onnx"
            if deployed.onnx_path is not None:  # the very file the metrics were measured on
                shutil.copyfile(deployed.onnx_path, onnx_path)
            else:
                export_onnx(result.model, work.evaluation[0].slice(recipe.batch), onnx_path,
                            runtime=recipe.runtime)
            diff = verify_onnx(result.model, onnx_path, work.evaluation[:1],
                               **verify_tolerance(onnx_path))
            result.notes["onnx_max_abs_diff"] = diff
            extra.append(onnx_path)
        write_json(tmp / "metrics.json", result.metrics)
        write_html(tmp / "report.html", result.metrics,
                   {"secondary_metrics": result.secondary, "stages": result.notes})
        extra += [tmp / "metrics.json", tmp / "report.html"]
        save_artifact(result.model, tmp, source=work.source, recipe=recipe.to_dict(),
                      metrics={**result.metrics, "secondary": result.secondary},
                      extra_files=extra)
    return out.absolute()


def evaluate_dir(path: str | Path) -> dict[str, Any]:
    """Reload an artifact and re-measure its metric on the held-out data its recipe names."""
    from netpress.export.artifact import load, read_manifest

    manifest = read_manifest(path)
    recipe = Recipe.from_dict(manifest["recipe"])
    model = load(path)
    work = resolve_workload(recipe)
    example = work.evaluation[0].slice(recipe.batch)
    with tempfile.TemporaryDirectory(prefix="netpress-eval-") as scratch:
        _, _, ref = quality(work, deploy(work.model, example, recipe.runtime, recipe.threads,
                                         Path(scratch) / "orig.onnx"), None)
        value, secondary, _ = quality(work, deploy(model, example, recipe.runtime, recipe.threads,
                                                   Path(scratch) / "reloaded.onnx"), ref)
    return {"metric_name": work.metric, "metric": value, "runtime": recipe.runtime, **secondary}


__all__ = ["compress", "evaluate_dir", "Result", "Workload", "resolve_workload", "atomic_dir", "deploy"]
