"""The planner (A2): constraints, crashes, resume, outputs. Trials are faked where the search logic
is what is tested (the fake still goes through the executor and the driver's bookkeeping); one test
runs real trials end to end. Runtime ``torch`` keeps ONNX exports out of the fast tests."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from netpress.core.errors import ConstraintError, RecipeError
from netpress.core.recipe import Recipe
from netpress.search.planner import plan, storage_path

SENS = {"sparsity": [0.5], "bits": [], "ranks": [], "w8a8": True, "max_examples": 32}
BASE = {"model": "zoo:digits_cnn", "data": "zoo:digits", "runtime": "torch", "eval_limit": 64,
        "plan": {"sensitivity": SENS, "families": ["int8_weight", "magnitude_int8"]}}

CALLS: list[dict] = []


def fake_trial(payload: dict) -> dict:
    """Deterministic stand-in for run_trial: size falls with sparsity, accuracy with it too."""
    stages = payload["recipe"]["stages"]
    CALLS.append(stages)
    prune = next((s["prune"] for s in stages if "prune" in s), None)
    if prune is not None and prune.get("sparsity", 0) > 0.7:
        raise RuntimeError("simulated crash at high sparsity")
    sparsity = prune["sparsity"] if prune else 0.0
    acc = round(0.99 - 0.2 * sparsity ** 2, 4)
    return {"metrics": {"accuracy": acc, "top1_agreement": acc, "kl": 0.01},
            "size_bytes": int(28000 * (1 - 0.6 * sparsity)), "params": 1, "nonzero_params": 1,
            "macs": 1, "compress_seconds": 0.0, "onnx": None,
            "latency_ms": 1.0 + len(stages) * 0.1}


@pytest.fixture(autouse=True)
def _reset(monkeypatch):
    from netpress.search.trial import LATENCY

    CALLS.clear()
    for k, v in {"warmup": 2, "runs": 5, "max_seconds": 2.0}.items():  # timing is not tested here
        monkeypatch.setitem(LATENCY, k, v)


def test_best_artifact_front_and_recipe(tmp_path):
    out = tmp_path / "plan"
    res = plan(BASE, out, trials=4, max_size_mb=0.03, trial_fn=fake_trial)
    assert res.met and res.best is not None
    assert len(CALLS) == 4 and res.new_trials == 4
    for name in ("manifest.json", "model.safetensors", "metrics.json", "report.html",
                 "front.json", "recipe.yaml"):
        assert (out / name).is_file(), name
    front = json.loads((out / "front.json").read_text())
    assert len(front["trials"]) == 4 and front["met"] and front["best"] == res.best["number"]
    done = [t for t in front["trials"] if t["state"] == "complete"]
    assert any(t["on_front"] for t in done)
    assert all({"params", "stages", "metric", "size_bytes", "latency_ms", "speedup", "feasible"}
               <= set(t) for t in done)
    # the first trials are the sensitivity-seeded ones, in order
    assert [t["params"]["family"] for t in front["trials"][:2]] == ["int8_weight", "magnitude_int8"]
    recipe = Recipe.from_dict(yaml.safe_load((out / "recipe.yaml").read_text()))
    assert [s.to_dict() for s in recipe.stages] == [
        Recipe.from_dict({"model": "x", "stages": res.best["stages"]}).stages[i].to_dict()
        for i in range(len(res.best["stages"]))]
    assert recipe.plan is None and "onnx" in recipe.export
    metrics = json.loads((out / "metrics.json").read_text())
    # re-measured, not copied from the fake: real int8 weights of the real digits CNN
    assert metrics["ratios"]["size"] > 3.0 and metrics["compressed"]["metric"] > 0.9
    assert res.best["verified"]["size_bytes"] <= 0.03e6
    assert storage_path(out).is_file() and not (out / storage_path(out).name).exists()
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64") == 3  # two front plots and the heat map


def test_crashing_trial_is_recorded_and_skipped(tmp_path, monkeypatch):
    from netpress.search import space

    real = space.seed_points
    monkeypatch.setattr(space, "seed_points", lambda fam, t: [
        *real(fam, t), {"family": "magnitude_int8", "mag_sparsity": 0.8, "mag_keep": 0}])
    res = plan(BASE, tmp_path / "p", trials=4, trial_fn=fake_trial)
    failed = [t for t in res.trials if t["state"] == "failed"]
    assert len(failed) == 1 and "simulated crash" in failed[0]["error"]
    assert failed[0]["params"]["mag_sparsity"] == 0.8
    assert len(res.trials) == 4 and res.met  # the study went on after the crash


def test_unmet_constraints_exit_1_and_name_the_binding_one(tmp_path):
    out = tmp_path / "p"
    with pytest.raises(ConstraintError) as info:
        plan(BASE, out, trials=3, max_size_mb=0.001, trial_fn=fake_trial)
    assert info.value.exit_code == 1
    msg = str(info.value)
    assert "binding: max_size_bytes" in msg and "closest points" in msg and "trial 0" in msg
    assert not (out / "manifest.json").exists() and not (out / "model.safetensors").exists()
    front = json.loads((out / "front.json").read_text())
    assert front["met"] is False and front["binding"] == ["max_size_bytes"]


def test_resume_continues_without_redoing_work(tmp_path):
    out = tmp_path / "p"
    first = plan(BASE, out, trials=3, trial_fn=fake_trial)
    assert len(CALLS) == 3
    done_before = {t["number"]: t["params"] for t in first.trials}
    second = plan(BASE, out, trials=5, trial_fn=fake_trial, force=True)
    assert len(CALLS) == 5 and second.new_trials == 2  # only the two new trials ran
    assert len(second.trials) == 5
    assert {t["number"]: t["params"] for t in second.trials[:3]} == done_before
    third = plan(BASE, out, trials=5, trial_fn=fake_trial, force=True)  # nothing left to do
    assert len(CALLS) == 5 and third.new_trials == 0 and len(third.trials) == 5


def interrupting_trial(payload: dict) -> dict:
    if len(CALLS) == 1:
        CALLS.append(payload["recipe"]["stages"])
        raise KeyboardInterrupt
    return fake_trial(payload)


def test_interrupted_study_requeues_the_unfinished_trial(tmp_path):
    out = tmp_path / "p"
    with pytest.raises(KeyboardInterrupt):
        plan(BASE, out, trials=3, trial_fn=interrupting_trial)
    assert not out.exists() and storage_path(out).is_file()  # nothing claimed, progress kept
    interrupted = CALLS[1]
    res = plan(BASE, out, trials=3, trial_fn=interrupting_trial)
    assert CALLS[2] == interrupted  # the half-done trial runs again with the same parameters
    assert len(CALLS) == 4 and len([t for t in res.trials if t["state"] == "complete"]) == 3


def test_bad_input(tmp_path):
    with pytest.raises(RecipeError, match="plan metric"):
        plan(BASE, tmp_path / "p", trials=1, metric="bleu", trial_fn=fake_trial)
    with pytest.raises(RecipeError, match="plan.families"):
        plan(BASE, tmp_path / "p", trials=1, families=["nope"], trial_fn=fake_trial)
    (tmp_path / "exists").mkdir()
    with pytest.raises(Exception, match="existing path"):
        plan(BASE, tmp_path / "exists", trials=1, trial_fn=fake_trial)


def test_real_trials_end_to_end(tmp_path):
    """Real compression and measurement of two trials (digits CNN, torch runtime)."""
    from netpress.measure import compute_metric
    from netpress.pipeline import apply_stages, resolve_workload
    from netpress.search.validation import search_split

    res = plan(BASE, tmp_path / "p", trials=2, max_drop=0.05, validation=0.25)
    assert res.met
    done = [t for t in res.trials if t["state"] == "complete"]
    assert len(done) == 2
    by_family = {t["params"]["family"]: t for t in done}
    # 50% magnitude pruning + int8 stores fewer bytes than int8 alone; both keep accuracy
    assert by_family["magnitude_int8"]["size_bytes"] < by_family["int8_weight"]["size_bytes"]
    assert all(t["metric"] > 0.9 and t["latency_ms"] > 0 for t in done)
    # trials are scored on the validation split (64 of the 256 calibration digits), the claim on
    # the evaluation split: recompute both independently
    recipe = Recipe.from_dict({**BASE, "plan": None})
    work = resolve_workload(recipe)
    swork = search_split(work, 0.25)
    assert sum(b.size for b in swork.evaluation) == 64
    t = by_family["magnitude_int8"]
    model, _ = apply_stages(work.model, Recipe.from_dict({**BASE, "plan": None,
                                                          "stages": t["stages"]}), swork)
    with torch.no_grad():
        val_out = [b.run(model) for b in swork.evaluation]
    assert t["metric"] == pytest.approx(compute_metric("accuracy", val_out, swork.evaluation,
                                                       val_out))
    front = json.loads((tmp_path / "p" / "front.json").read_text())
    assert "validation split: the last 64" in front["splits"]["trials"]
    assert front["splits"]["evaluation_examples"] == 64  # eval_limit
    best = res.best
    assert best["verified"]["metric_split"] == "evaluation"
    full, _ = apply_stages(work.model, Recipe.from_dict({**BASE, "plan": None,
                                                         "stages": best["stages"]}), work)
    with torch.no_grad():
        ev = [b.run(full) for b in work.evaluation]
    assert best["verified"]["metric"] == pytest.approx(
        compute_metric("accuracy", ev, work.evaluation, ev))
    metrics = json.loads((tmp_path / "p" / "metrics.json").read_text())
    assert metrics["compressed"]["metric"] == pytest.approx(best["verified"]["metric"])


def test_validation_split_is_disjoint_from_what_trials_fit_and_from_evaluation():
    from netpress.pipeline import resolve_workload
    from netpress.search.validation import _example_keys, search_split

    work = resolve_workload(Recipe.from_dict({"model": "zoo:digits_cnn", "data": "zoo:digits"}))
    swork = search_split(work, 0.5)

    def keys(batches):
        return [k for b in batches for k in _example_keys(b)]

    val, fit, train = keys(swork.evaluation), keys(swork.calibration), keys(swork.train)
    assert len(val) == 128 and len(fit) == 128  # of the 256 calibration digits
    assert not set(val) & set(fit) and not set(val) & set(train)
    assert not set(val) & set(keys(work.evaluation))  # held-out digits never validate
    assert len(train) == len(keys(work.train)) - 128  # only the validation digits left train
    assert swork.model is work.model and keys(work.calibration)[-128:] == val
    # the photos bundle's train split is its calibration split: both lose the validation crops
    w = work.__class__(work.model, {}, work.calibration, work.evaluation, "accuracy",
                       train=list(work.calibration))
    assert keys(search_split(w, 0.5).train) == fit


def test_validation_option_is_checked(tmp_path):
    with pytest.raises(RecipeError, match="validation"):
        plan(BASE, tmp_path / "p", trials=1, validation=1.0, trial_fn=fake_trial)
    seen = []

    def spy(payload):
        seen.append(payload["validation"])
        return fake_trial(payload)

    plan({**BASE, "plan": {**BASE["plan"], "validation": 0.3}}, tmp_path / "q", trials=1,
               trial_fn=spy)
    assert seen == [0.3]
