"""``netpress plan``: constraints in; the Pareto front, the best artifact and its recipe out (SPEC A2).

1. The original model is measured on the target runtime (metric on the validation and on the
   held-out evaluation split, artifact bytes, latency) and on ``speedup_vs`` (default: the same
   runtime).
2. **Splits** (:mod:`netpress.search.validation`): the last ``plan.validation`` share of the
   calibration examples is the *validation* split. Trials calibrate on the rest, are scored on
   validation and the constraints are checked there; the best point is chosen on validation.
   The evaluation split is used once, for the chosen point's reported metric (the claim).
3. Per-layer sensitivity (:mod:`netpress.search.sensitivity`) is measured on the trials'
   calibration examples (cached) and seeds the search: the first trials are enqueued from it, and
   per-layer choices (which layers stay float / unpruned) follow its ranking
   (:mod:`netpress.search.space`).
4. An Optuna multi-objective study (TPE, seeded; metric up, size down, latency down, where
   latency is taken relative to the paired reference timing so load drift does not bias it; the
   user's constraints passed to the sampler) proposes trials. Each trial is compressed, exported and
   evaluated by :func:`netpress.search.trial.run_trial` through the executor of ``workers``
   (in-process by default, Ray tasks with ``--workers ray``). A trial that crashes is recorded
   with its error and the study goes on.
5. **Latency** is timed in this (driver) process, one trial at a time, never while trials run:
   each trial's ONNX file is timed right after the reference model, so the speed-up is a paired
   ratio even when the machine's load changes. The best point is re-measured at the end in
   interleaved rounds (original, reference, best; lowest round median kept) before it is claimed.
6. **The claim**: the feasible points, best validation metric first, are rebuilt as ``netpress
   compress`` would (calibrating on the whole calibration split, so ``recipe.yaml`` reproduces the
   artifact exactly) and re-measured: latency and size (a point that fails them now is skipped
   for the next one), then the metric on the evaluation split. If that metric breaks
   ``max_drop`` the plan fails (exit 1): no other point is tried on evaluation data, which would
   be selection on it.
7. **Budget**: ``budget_minutes`` bounds the whole run's wall time (loading, sensitivity, trials,
   verification): no trial starts unless the slowest trial so far plus the estimated
   verification still fit (a bound on what starts; a slow last step can still overrun it).
8. Output DIR (written atomically): the best artifact meeting the constraints (manifest.json,
   model.safetensors, metrics.json, model.onnx), ``report.html`` (front plots, sensitivity heat map,
   every trial), ``front.json`` (every trial with params, stages, size/latency/metric, on-front
   flag, errors of failed ones) and ``recipe.yaml`` (``netpress compress recipe.yaml`` rebuilds the
   best point). When no point meets the constraints DIR gets only front.json and report.html, the
   closest points and the binding constraint are printed, and :class:`ConstraintError` (exit 1)
   is raised.

**Resume**: the study lives in SQLite at ``<DIR>.plan.db`` beside DIR (outside the atomic DIR).
Running the same command again continues it: ``trials`` counts the trials already finished, and
trials an interruption left half-done are re-queued with the same parameters.

Example:
    >>> from netpress.search.planner import plan  # doctest: +SKIP
    >>> res = plan("zoo:mobilenet_v2", "mnv2-plan", max_size_mb=4.7, min_speedup=1.5,
    ...            max_drop=0.03, runtime="openvino", metric="top1_agreement_confident")  # doctest: +SKIP
    >>> res.met, res.best["speedup"] >= 1.5  # doctest: +SKIP
    (True, True)
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from netpress.core.errors import ConstraintError, RecipeError
from netpress.core.progress import status
from netpress.core.recipe import PlanSpec, Recipe
from netpress.search import space
from netpress.search.pareto import LOWER_IS_BETTER, Constraints, binding, pareto_mask
from netpress.search.sensitivity import SensitivityTable, analyze
from netpress.search.trial import latency as _latency
from netpress.search.trial import measure_seconds, run_trial, workload
from netpress.search.validation import describe as validation_text

_START = [0.0]  # when the running plan() began (elapsed_s of each trial)


class PlanConstraintError(ConstraintError):
    """No point meets the constraints (exit code 1); the message lists the closest points."""

    where_limit = 4000


LATENCY_METHOD = ("timed in the driver process, one model at a time, never while trials run; each "
                  "trial right after the reference model (paired speed-up); the best point "
                  "re-measured in 3 interleaved rounds, lowest round median kept")


@dataclass
class PlanResult:
    """What ``plan`` produced: the front, the best point (``None`` when no point meets the
    constraints) and where things are."""

    out: Path
    storage: Path
    met: bool
    best: dict[str, Any] | None
    trials: list[dict[str, Any]]
    binding: list[str] = field(default_factory=list)
    closest: list[dict[str, Any]] = field(default_factory=list)
    new_trials: int = 0


def storage_path(out: str | Path) -> Path:
    """The study's SQLite file: ``<DIR>.plan.db`` beside DIR.

    Example:
        >>> storage_path("runs/mnv2").name
        'mnv2.plan.db'
    """
    out = Path(out).absolute()
    return out.with_name(out.name + ".plan.db")


def _resolve(recipe: Recipe | dict | str | Path) -> Recipe:
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, dict):
        return Recipe.from_dict(recipe)
    text = str(recipe)
    if text.endswith((".yaml", ".yml", ".json")):
        return Recipe.load(text)
    return Recipe.from_dict({"model": text})


def _spec(recipe: Recipe, overrides: dict[str, Any]) -> PlanSpec:
    base = (recipe.plan or PlanSpec()).model_dump()
    base.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return PlanSpec.model_validate(base)
    except Exception as exc:  # pydantic ValidationError -> RecipeError naming the key
        from pydantic import ValidationError

        from netpress.core.config import validation_to_recipe_error

        if isinstance(exc, ValidationError):
            raise validation_to_recipe_error(exc, "plan") from None
        raise


def _study_name(recipe: Recipe, spec: PlanSpec, metric: str) -> str:
    d = recipe.to_dict()
    key = {k: d[k] for k in ("model", "data", "metric", "seed", "eval_limit", "runtime",
                              "threads", "batch")}
    key.update(families=spec.families, sensitivity=spec.sensitivity.model_dump(),
               speedup_vs=spec.speedup_vs, plan_metric=metric, validation=spec.validation, v=2)
    return "plan-" + hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


class _Timer:
    """Reference (original on ``speedup_vs``) and trial latencies, timed one at a time."""

    def __init__(self, recipe: Recipe, spec: PlanSpec, work: Any, scratch: Path) -> None:
        from netpress.export.onnx import export_onnx

        self.runtime, self.threads = recipe.runtime, recipe.threads
        self.ref_runtime = spec.speedup_vs or recipe.runtime
        self.example = work.evaluation[0].slice(recipe.batch)
        self.model = work.model
        self.scratch = scratch
        needs_onnx = {self.runtime, self.ref_runtime} != {"torch"}
        self.orig_onnx = (export_onnx(work.model, self.example, scratch / "original.onnx")
                          if needs_onnx else None)

    def original(self, runtime: str | None = None) -> float:
        runtime = runtime or self.runtime
        target = self.model if runtime == "torch" else self.orig_onnx
        return _latency(runtime, self.threads, target, self.example)

    def reference(self) -> float:
        return self.original(self.ref_runtime)

    def trial(self, target: Any) -> float:
        """``target``: the trial's ONNX file, or its module for runtime torch."""
        return _latency(self.runtime, self.threads, target, self.example)


def plan(
    recipe: Recipe | dict[str, Any] | str | Path,
    out: str | Path,
    *,
    max_size_mb: float | None = None,
    min_speedup: float | None = None,
    max_latency_ms: float | None = None,
    max_drop: float | None = None,
    budget_minutes: float | None = None,
    trials: int | None = None,
    validation: float | None = None,
    runtime: str | None = None,
    workers: str | None = None,
    seed: int | None = None,
    metric: str | None = None,
    speedup_vs: str | None = None,
    families: list[str] | None = None,
    force: bool = False,
    trial_fn: Callable[[dict[str, Any]], dict[str, Any]] = run_trial,
    sensitivity_cache: bool = True,
) -> PlanResult:
    """Search compression settings under constraints; write DIR (see the module doc).

    Args:
        recipe: a recipe (its ``plan:`` block gives defaults), a recipe path, or a model spec
            such as ``zoo:mobilenet_v2``.
        out: output directory (refused if it exists, unless ``force``).
        max_size_mb, min_speedup, max_latency_ms, max_drop: the constraints (None = none).
        budget_minutes: wall-time budget of this invocation, everything included (see step 7).
        trials: total trials of the study (finished ones of a resumed study count).
        validation: share of the calibration examples held out to score trials (see step 2).
        runtime: onnxruntime | openvino | torch (overrides the recipe's).
        workers: None/"inprocess", "ray", "ray://HOST:PORT" or "HOST:PORT".
        seed: sampler and compression seed (overrides the recipe's).
        metric: the metric optimised and limited by ``max_drop``: the recipe's metric (default)
            or a secondary one such as ``top1_agreement_confident``.
        speedup_vs: runtime of the reference latency (default: ``runtime``).
        families: technique families searched (default: all; see :mod:`netpress.search.space`).
        force: replace an existing ``out``.
        trial_fn: the trial function (picklable, top level); tests substitute it.
        sensitivity_cache: read / write the sensitivity cache (False: measured from scratch).

    Returns:
        :class:`PlanResult` (``met`` true and ``best`` set when a point meets the constraints).

    Raises:
        ConstraintError: no point meets the constraints (DIR holds front.json and report.html).
        RecipeError, ModelError, DataError, ArtifactError: bad input, with the fix.
    """
    import optuna

    from netpress.pipeline import check_out
    from netpress.search.workers import make_executor

    recipe = _resolve(recipe)
    out = Path(out).absolute()
    check_out(out, force)
    updates: dict[str, Any] = {"stages": [], "plan": None}
    if runtime is not None:
        updates["runtime"] = runtime
    if seed is not None:
        updates["seed"] = seed
    spec = _spec(recipe, dict(max_size_mb=max_size_mb, min_speedup=min_speedup,
                              max_latency_ms=max_latency_ms, max_drop=max_drop,
                              budget_minutes=budget_minutes, trials=trials, workers=workers,
                              speedup_vs=speedup_vs, families=families, metric=metric,
                              validation=validation))
    base = Recipe.from_dict({**recipe.to_dict(), **updates})
    torch.manual_seed(base.seed)
    torch.set_num_threads(base.threads)
    start = time.perf_counter()
    _START[0] = start
    status("measuring the original model")
    work, _ref, orig_quality = workload(base)
    eval_seconds = measure_seconds(base)  # export + the original on the evaluation split
    swork, _sref, val_quality = workload(base, spec.validation)
    metric = spec.metric or work.metric
    if metric not in orig_quality or metric not in val_quality:
        raise RecipeError("plan metric", got=metric,
                          expected=f"one of {', '.join(k for k in orig_quality if k != 'confident_count')}",
                          fix="use the recipe's metric or a secondary metric measured for this task")
    lower = metric in LOWER_IS_BETTER
    cons = Constraints(max_size_bytes=None if spec.max_size_mb is None else spec.max_size_mb * 1e6,
                       min_speedup=spec.min_speedup, max_latency_ms=spec.max_latency_ms,
                       max_drop=spec.max_drop)
    with tempfile.TemporaryDirectory(prefix="netpress-plan-") as scratch_name:
        scratch = Path(scratch_name)
        timer = _Timer(base, spec, work, scratch)
        original = _original(base, work, timer, scratch, val_quality[metric],
                             orig_quality[work.metric])
        original["metric_evaluation"] = orig_quality[metric]
        status("per-layer sensitivity on the trials' calibration examples")
        phases = {"load_and_original_s": round(time.perf_counter() - start, 1)}
        table = analyze(work.model, swork.calibration, spec.sensitivity, cache=sensitivity_cache)
        phases["sensitivity_s"] = round(time.perf_counter() - start - phases["load_and_original_s"],
                                        1)
        db = storage_path(out)
        db.parent.mkdir(parents=True, exist_ok=True)
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        sampler = optuna.samplers.TPESampler(seed=base.seed, n_startup_trials=4)
        study = optuna.create_study(
            study_name=_study_name(base, spec, metric), storage=f"sqlite:///{db}",
            sampler=sampler, load_if_exists=True,
            directions=["minimize" if lower else "maximize", "minimize", "minimize"])
        _requeue_interrupted(study)
        if not study.trials:
            for p in space.seed_points(list(spec.families), table):
                study.enqueue_trial(p, skip_if_exists=True)
        new = 0
        costs: list[float] = []  # wall seconds of each batch of trials (compress + time)
        with make_executor(spec.workers) as ex:
            while _finished(study) < spec.trials:
                if spec.budget_minutes and not _fits(start, spec.budget_minutes, costs,
                                                     _verify_estimate(costs, eval_seconds)):
                    status(f"budget of {spec.budget_minutes:g} min: no room for another trial "
                           "and the verification")
                    break
                t_batch = time.perf_counter()
                n = min(ex.parallelism, spec.trials - _finished(study))
                asked = [study.ask() for _ in range(n)]
                points = [space.suggest(t, list(spec.families), len(table.layers)) for t in asked]
                payloads = [{"recipe": {**base.to_dict(), "stages": space.stages_for(p, table)},
                             "threads": base.threads if ex.parallelism == 1 else 1,
                             "validation": spec.validation}
                            for p in points]
                status(f"trials {_finished(study) + 1}..{_finished(study) + n} of {spec.trials}: "
                       + "; ".join(space.describe(p) for p in points))
                outcomes = ex.map(trial_fn, payloads)
                for t, p, pay, o in zip(asked, points, payloads, outcomes, strict=True):
                    _tell(study, t, p, pay, o, timer, cons, original, metric, lower, scratch)
                    new += 1
                costs.append(time.perf_counter() - t_batch)
        phases["trials_s"] = round(time.perf_counter() - start - sum(phases.values()), 1)
        records = _records(study, cons, original, lower)
        result = PlanResult(out, db, False, None, records, new_trials=new)
        splits = {"trials": validation_text(swork, spec.validation),
                  "claim": f"evaluation split: {sum(b.size for b in work.evaluation)} held-out "
                           "examples, used only for the chosen point's reported metric",
                  "validation_examples": sum(b.size for b in swork.evaluation),
                  "evaluation_examples": sum(b.size for b in work.evaluation)}
        _finish(result, base, work, table, timer, cons, original, metric, lower, spec, scratch,
                force, splits, start, phases)
    return result


def _verify_estimate(costs: list[float], eval_seconds: float) -> float:
    """Seconds the verification is expected to take: the slowest trial again (rebuilt), the
    evaluation split (as long as exporting + measuring the original took), 9 timings, outputs.

    Example:
        >>> _verify_estimate([10.0, 30.0], 20.0)
        110.0
    """
    if not costs:
        return 0.0
    return max(costs) + eval_seconds + 60.0


def _fits(start: float, budget_minutes: float, costs: list[float], finish: float) -> bool:
    """Whether another batch of trials (as slow as the slowest so far) and the finish fit.

    Example:
        >>> import time
        >>> _fits(time.perf_counter(), 1.0, [], 0.0), _fits(time.perf_counter(), 1.0, [50.0], 20.0)
        (True, False)
    """
    elapsed = time.perf_counter() - start
    if not costs:
        return elapsed < budget_minutes * 60
    return elapsed + max(costs) + finish <= budget_minutes * 60


def _original(recipe: Recipe, work: Any, timer: _Timer, scratch: Path,
              value: float, main: float) -> dict[str, Any]:
    from netpress.export.artifact import save_artifact
    from netpress.measure import count_macs, count_nonzero, count_params

    save_artifact(work.model, scratch / "orig-art", source=work.source, recipe={})
    size = sum(p.stat().st_size for p in (scratch / "orig-art").glob("*.safetensors"))
    lat, ref = timer.original(), timer.reference()
    return {"metric": value, "metric_main": main, "size_bytes": int(size), "latency_ms": lat,
            "ref_latency_ms": ref,
            "speedup": ref / lat, "params": count_params(work.model),
            "nonzero_params": count_nonzero(work.model),
            "macs": count_macs(work.model, timer.example)}


def _finished(study: Any) -> int:
    from optuna.trial import TrialState

    return sum(t.state == TrialState.COMPLETE or (t.state == TrialState.FAIL
                                                  and "error" in t.user_attrs)
               for t in study.trials)


def _requeue_interrupted(study: Any) -> None:
    """Trials left RUNNING by an interrupted run: mark them failed and queue their params again."""
    from optuna.trial import TrialState

    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study._storage.set_trial_user_attr(t._trial_id, "interrupted", True)
        study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        if t.params:
            study.enqueue_trial(t.params, skip_if_exists=False)


def _tell(study: Any, trial: Any, params: dict, payload: dict, outcome: Any, timer: _Timer,
          cons: Constraints, original: dict, metric: str, lower: bool, scratch: Path) -> None:
    from optuna.trial import TrialState

    trial.set_user_attr("params", params)
    trial.set_user_attr("stages", payload["recipe"]["stages"])
    value = outcome.value if outcome.ok else None
    error = outcome.error
    m = float("nan")
    if value is not None:
        m = float(value["metrics"].get(metric, float("nan")))
        if not torch.isfinite(torch.tensor(m)):
            error = f"non-finite metric {m}"
    if error is not None or value is None:
        trial.set_user_attr("error", (error or "no result")[:2000])
        trial.set_user_attr("seconds", round(outcome.seconds, 2))
        study.tell(trial, state=TrialState.FAIL)
        status(f"trial {trial.number} failed: {(error or '').splitlines()[0][:200]}")
        return
    try:
        if value["onnx"] is not None:
            path = scratch / f"trial-{trial.number}.onnx"
            path.write_bytes(value["onnx"])
            ref = timer.reference()
            lat = timer.trial(path)
            path.unlink()
        else:
            ref, lat = timer.reference(), float(value["latency_ms"])
    except Exception as exc:  # noqa: BLE001 - a model the runtime cannot time is a failed trial
        trial.set_user_attr("error", f"latency: {type(exc).__name__}: {exc}"[:2000])
        study.tell(trial, state=TrialState.FAIL)
        return
    point = {"metric": float(m), "size_bytes": value["size_bytes"], "latency_ms": round(lat, 4),
             "ref_latency_ms": round(ref, 4), "speedup": round(ref / lat, 4)}
    viol = cons.violations(point, original["metric"], lower)
    trial.set_user_attr("point", point)
    trial.set_user_attr("secondary", value["metrics"])
    trial.set_user_attr("measure", {"param_count": value["params"],
                                    **{k: value[k] for k in ("nonzero_params", "macs",
                                                             "compress_seconds")}})
    trial.set_user_attr("seconds", round(outcome.seconds, 2))
    for k in cons.active():  # the sampler prefers feasible points (<= 0 means met)
        trial.set_constraint(k, viol.get(k, 0.0))
    trial.set_user_attr("elapsed_s", round(time.perf_counter() - _START[0], 1))
    # third objective: latency relative to the paired reference (robust to load drift)
    study.tell(trial, [point["metric"], point["size_bytes"], lat / ref])


def _records(study: Any, cons: Constraints, original: dict, lower: bool) -> list[dict[str, Any]]:
    """Every finished trial as a front.json entry (on_front / feasible recomputed here)."""
    from optuna.trial import TrialState

    rows: list[dict[str, Any]] = []
    for t in study.trials:
        a = t.user_attrs
        if t.state == TrialState.COMPLETE and "point" in a:
            viol = cons.violations(a["point"], original["metric"], lower)
            rows.append({"number": t.number, "state": "complete", "params": a.get("params", {}),
                         "stages": a.get("stages", []), **a["point"],
                         "secondary": a.get("secondary", {}), **a.get("measure", {}),
                         "seconds": a.get("seconds"), "elapsed_s": a.get("elapsed_s"),
                         "violations": viol, "feasible": not viol})
        elif t.state == TrialState.FAIL and "error" in a:
            rows.append({"number": t.number, "state": "failed", "params": a.get("params", {}),
                         "stages": a.get("stages", []), "error": a["error"],
                         "seconds": a.get("seconds")})
    done = [r for r in rows if r["state"] == "complete"]
    relative = [{**r, "latency_ms": r["latency_ms"] / r["ref_latency_ms"]} for r in done]
    for r, on in zip(done, pareto_mask(relative, lower), strict=True):
        r["on_front"] = on
    return rows


def _order_best(cands: list[dict[str, Any]], lower: bool) -> list[dict[str, Any]]:
    """Best metric first; then smaller latency (relative to its paired reference), then size."""
    return sorted(cands, key=lambda r: ((r["metric"] if lower else -r["metric"]),
                                        r["latency_ms"] / r["ref_latency_ms"], r["size_bytes"]))


def _finish(result: PlanResult, recipe: Recipe, work: Any, table: SensitivityTable,
            timer: _Timer, cons: Constraints, original: dict, metric: str, lower: bool,
            spec: PlanSpec, scratch: Path, force: bool, splits: dict[str, Any],
            start: float, phases: dict[str, float]) -> None:
    from netpress.search.plan_report import write_outputs

    done = [r for r in result.trials if r["state"] == "complete"]
    feasible = _order_best([r for r in done if r["feasible"]], lower)
    built = None
    t_verify = time.perf_counter()
    for cand in feasible[:3]:  # re-measured before it is claimed; noise may undo a close call
        status(f"verifying trial {cand['number']} ({space.describe(cand['params'])}) on the "
               "evaluation split")
        built = _verify(cand, recipe, work, timer, cons, original, metric, lower, scratch)
        if built is not None:
            result.met, result.best = True, cand
            break
        if "max_drop" in cand["verified"]["violations"]:
            break  # trying the next point on evaluation data would select on it
    if not result.met:
        points = done if done else []
        front = [r for r in points if r.get("on_front")] or points
        names, idx = binding(front, cons, original["metric"], lower)
        if feasible and not names:
            names = sorted({k for c in feasible[:3] for k in c.get("verify_violations", {})})
        result.binding = names
        result.closest = [front[i] for i in idx]
    meta = {"model": recipe.model, "runtime": recipe.runtime, "threads": recipe.threads,
            "batch": recipe.batch, "metric_name": metric, "metric_lower_is_better": lower,
            "speedup_vs": timer.ref_runtime, "constraints": cons.active(),
            "constraints_text": cons.describe(), "met": result.met, "binding": result.binding,
            "best": None if result.best is None else result.best["number"],
            "splits": {**splits, "note": "trial metrics, the front and original.metric are on "
                       "the validation split; best.verified and original.metric_evaluation on "
                       "the evaluation split"},
            "original": original, "storage": str(result.storage), "families": spec.families,
            "latency_method": LATENCY_METHOD, "workers": spec.workers or "inprocess",
            "trials_requested": spec.trials, "new_trials": result.new_trials,
            "budget_minutes": spec.budget_minutes,
            "wall_seconds_before_outputs": round(time.perf_counter() - start, 1),
            "phases": {**phases, "verify_s": round(time.perf_counter() - t_verify, 1)},
            "sensitivity": {"key": table.key, "cached": table.cached, "data": table.data,
                            "seconds": table.seconds, "columns": table.columns,
                            "most_sensitive": {c: table.ranking(c)[:8] for c in table.columns}}}
    write_outputs(result.out, force, meta, result.trials, table, recipe, work, built)
    if not result.met:
        lines = [f"  trial {r['number']}: {space.describe(r['params'])}: {metric} "
                 f"{r['metric']:.4f} (validation), {r['size_bytes'] / 1e6:.3f} MB, "
                 f"{r['latency_ms']:.2f} ms ({r['speedup']:.2f}x); breaks "
                 f"{', '.join(r['violations']) or 'none (re-measured)'}"
                 for r in result.closest]
        for c in feasible[:3]:
            v = c.get("verified")
            if v and v["violations"]:
                lines.append(f"  trial {c['number']} re-measured: {metric} {v['metric']:.4f} on "
                             f"the evaluation split, {v['speedup']:.2f}x; breaks "
                             f"{', '.join(v['violations'])}")
        raise PlanConstraintError(
            f"no plan meets the constraints ({cons.describe()}); binding: "
            f"{', '.join(result.binding) or 'none'}; closest points:\n" + "\n".join(lines) + "\n",
            got=f"{len(done)} measured points, none meeting every constraint",
            expected="at least one such point",
            fix=f"relax {' / '.join(result.binding) or 'the constraints'}, raise --trials or "
                f"--budget-minutes, or add families; the front is in {result.out}/front.json",
        )


def _verify(cand: dict[str, Any], recipe: Recipe, work: Any, timer: _Timer, cons: Constraints,
            original: dict, metric: str, lower: bool, scratch: Path) -> dict[str, Any] | None:
    """Rebuild ``cand`` on the whole calibration split, as ``netpress compress`` would; measure its
    size, its metric on the evaluation split and its latency interleaved with the references.
    None if it breaks a constraint now (``cand["verified"]`` says which)."""
    import numpy as np

    from netpress.export.artifact import save_artifact
    from netpress.pipeline import apply_stages, check_finite, deploy, quality

    best_recipe = Recipe.from_dict({**recipe.to_dict(), "stages": cand["stages"],
                                    "export": ["artifact", "onnx"]})
    t0 = time.perf_counter()
    model, notes = apply_stages(work.model, best_recipe, work)
    seconds = time.perf_counter() - t0
    check_finite(model, [])
    art = scratch / f"best-{cand['number']}-art"
    save_artifact(model, art, source=work.source, recipe={})
    size = sum(p.stat().st_size for p in art.glob("*.safetensors"))
    dep = deploy(model, timer.example, recipe.runtime, recipe.threads,
                 scratch / f"best-{cand['number']}.onnx")
    _, ref_out, _ = workload(recipe)
    value, secondary, outputs = quality(work, dep, ref_out)
    check_finite(model, outputs)
    rounds: dict[str, list[float]] = {"orig": [], "ref": [], "best": []}
    for _ in range(3):
        rounds["orig"].append(timer.original())
        rounds["ref"].append(timer.reference())
        rounds["best"].append(timer.trial(dep.onnx_path or model))
    lat = {k: float(np.min(v)) for k, v in rounds.items()}
    measured = {**secondary, work.metric: value}
    point = {"metric": float(measured[metric]), "size_bytes": int(size),
             "latency_ms": round(lat["best"], 4), "ref_latency_ms": round(lat["ref"], 4),
             "speedup": round(lat["ref"] / lat["best"], 4)}
    viol = cons.violations(point, original["metric_evaluation"], lower)
    cand["verified"] = {**point, "metric_split": "evaluation", "secondary": measured,
                        "original_metric": original["metric_evaluation"],
                        "original_latency_ms": round(lat["orig"], 4),
                        "rounds": rounds, "violations": viol,
                        "calibration": "the whole calibration split (as netpress compress)"}
    if viol:
        cand["verify_violations"] = viol
        status(f"trial {cand['number']} fails on re-measurement: {viol}")
        return None
    return {"model": model, "deployed": dep, "recipe": best_recipe, "value": value,
            "secondary": secondary, "seconds": seconds, "notes": notes, "latency": lat}


__all__ = ["PlanConstraintError", "PlanResult", "plan", "storage_path", "LATENCY_METHOD"]
