"""``netpress bench plan_nas``: student NAS (A3) against a hand-picked student of the same budget.

For the zoo ``digits_cnn`` and ``mnist1d_cnn`` teachers, with a parameter budget of 1/5 of the
teacher's (>= 4x fewer parameters) and, for digits, also 1/20 (at 1/5 a uniformly narrowed digits
student already matches its teacher, so that budget cannot tell students apart):

* ``hand-picked``: the teacher narrowed uniformly (:func:`netpress.distill.derive_student`) at the
  largest width that fits the budget — the usual manual choice.
* ``nas``: :func:`netpress.search.nas.search_student` (Optuna TPE over depth, per-block channels,
  kernel, pooling and head); candidates are scored on a held-out 20 % of the *train* split.

Both students are then trained with the same distillation recipe (Hinton KD, T=4, alpha=0.7, lr 0.01,
same epochs, the whole train split) for 3 seeds and evaluated on the held-out *evaluation* split;
rows report the mean accuracy, notes the std and per-seed values. ``compress_seconds`` of the NAS row
is the search itself (one seed). Training runs on one thread; latency is torch eager, batch 1,
1 thread, measured in this process for the teacher and both students.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch
import torch.nn as nn

from netpress.bench import row
from netpress.measure import collect_outputs, compute_metric, count_params, latency_torch

SUITE = "plan_nas"
SEEDS = (0, 1, 2)
# data -> (zoo model, final distillation epochs, search trials, epochs per candidate)
DATA = {"digits": ("digits_cnn", 15, 16, 6), "mnist1d": ("mnist1d_cnn", 8, 16, 3)}
# (data, budget divisor): the student budget is the teacher's parameter count / divisor
CASES = (("digits", 5), ("digits", 20), ("mnist1d", 5))


def _acc(model: nn.Module, batches: list) -> float:
    return compute_metric("accuracy", collect_outputs(model, batches), batches, None)


def _latency(model: nn.Module, batch: Any) -> float:
    return latency_torch(model, batch.slice(1), threads=1, warmup=10, runs=100,
                         max_seconds=5.0).median_ms


def hand_picked(teacher: nn.Module, max_params: int, seed: int = 0) -> tuple[nn.Module, float]:
    """The uniformly narrowed teacher at the largest width (step 0.01) within ``max_params``."""
    from netpress.distill import derive_student

    best: tuple[nn.Module, float] | None = None
    for pct in range(1, 101):
        student = derive_student(teacher, width=pct / 100, seed=seed)
        if count_params(student) > max_params:
            break
        best = (student, pct / 100)
    assert best is not None, "budget below the narrowest derived student"
    return best


def _distil(student: nn.Module, teacher: nn.Module, data: list, epochs: int, seed: int) -> nn.Module:
    from netpress.distill import distill
    from netpress.search.nas import KD_RECIPE

    student, _ = distill(student, teacher, data, {**KD_RECIPE, "epochs": epochs, "seed": seed},
                         task="classification")
    return student.eval()


def _row(case: str, tool: str, method: str, acc: float, params: int, lat: float, t_lat: float,
         seconds: float | None, notes: str) -> dict[str, Any]:
    return row(suite=SUITE, case=case, tool=tool, method=method, metric_name="accuracy",
               metric=round(acc, 4), size_bytes=4 * params, latency_ms=round(lat, 4),
               speedup_vs_fp32=round(t_lat / lat, 2), compress_seconds=seconds,
               runtime="torch", threads=1, batch=1, notes=notes)


def nas_case(data: str, divisor: int, quick: bool) -> list[dict[str, Any]]:
    from netpress import zoo
    from netpress.search.nas import NasBudget, search_student

    name, final_epochs, trials, epochs = DATA[data]
    if quick:
        final_epochs, trials, epochs = max(2, final_epochs // 4), 3, 1
    seeds = SEEDS[:1] if quick else SEEDS
    teacher, bundle = zoo.load_model(name), zoo.load_data(data)
    t_params = count_params(teacher)
    budget = t_params // divisor
    example = bundle.evaluation[0]

    t0 = time.perf_counter()
    found = search_student(teacher, bundle, NasBudget(max_params=budget), trials=trials,
                           epochs=epochs, final_epochs=None, seed=0)
    search_s = time.perf_counter() - t0
    _, width = hand_picked(teacher, budget)

    accs: dict[str, list[float]] = {"hand": [], "nas": []}
    students: dict[str, nn.Module] = {}
    for seed in seeds:
        hand, _ = hand_picked(teacher, budget, seed=seed)
        students["hand"] = _distil(hand, teacher, bundle.train, final_epochs, seed)
        students["nas"] = _distil(found.arch.build(seed), teacher, bundle.train, final_epochs, seed)
        for key, model in students.items():
            accs[key].append(_acc(model, bundle.evaluation))
    t_lat = _latency(teacher, example)
    lat = {k: _latency(m, example) for k, m in students.items()}
    params = {k: count_params(m) for k, m in students.items()}
    mean = {k: statistics.mean(v) for k, v in accs.items()}
    std = {k: statistics.stdev(v) if len(v) > 1 else 0.0 for k, v in accs.items()}
    trained = [h for h in found.history if h["state"] == "trained"]
    recipe = f"KD T=4 a=0.7 lr 0.01, {final_epochs} epochs on the train split"
    case = f"nas_{data}_{divisor}x"
    rows = [_row(case, "netpress", "teacher (zoo fp32)", _acc(teacher, bundle.evaluation), t_params,
                 t_lat, t_lat, None, f"{t_params} params; student budget {budget} "
                 f"(1/{divisor})")]
    for key, tool, method in (("hand", "baseline", f"hand-picked: uniform width {width:.2f}"),
                              ("nas", "netpress", f"nas: {found.arch.describe()}")):
        seeds_txt = [round(v, 4) for v in accs[key]]
        note = (f"mean ± std {mean[key]:.4f} ± {std[key]:.4f} over seeds {seeds_txt}; "
                f"{params[key]} params ({t_params / params[key]:.1f}x fewer); {recipe}")
        if key == "nas":
            note += (f"; search: {len(trained)} candidates x {epochs} epochs, val acc "
                     f"{found.val_metric:.4f} (20 % of train held out), {search_s:.0f} s; "
                     f"gain over hand-picked {mean['nas'] - mean['hand']:+.4f}")
        rows.append(_row(case, tool, method, mean[key], params[key], lat[key], t_lat,
                         round(search_s, 1) if key == "nas" else None, note))
    return rows


def run(quick: bool = False) -> list[dict[str, Any]]:
    """All plan_nas rows (digits, then MNIST-1D)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return [r for data, divisor in CASES for r in nas_case(data, divisor, quick)]
    finally:
        torch.set_num_threads(threads)
