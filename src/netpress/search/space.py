"""The planner's search space: technique families, their per-layer settings, and the seed points.

A trial picks a ``family`` and that family's parameters; :func:`stages_for` turns them into
ordinary recipe stages (so the best point is reproduced by ``netpress compress``). Per-layer choices
come from the sensitivity analysis (:mod:`netpress.search.sensitivity`): ``keep`` = the number of
most sensitive layers left in float (ranked by the column that matches the technique: ``w8a8`` for
static PTQ, the int8 weight column for weight-only, the highest sparsity for pruning).

Families (``plan.families``):

* ``ptq`` — static W8A8 (integer kernels on ONNX Runtime / OpenVINO): ``ptq_keep`` float layers,
  activation observer, weight observer (``minmax``, ``mse`` or the output-aware ``output_mse``).
* ``int8_weight`` — weight-only int8, ``w8_keep`` float layers (size only; runs in float).
* ``magnitude_int8`` — global magnitude pruning at ``mag_sparsity`` (the ``mag_keep`` most
  sensitive layers unpruned), then weight-only int8.
* ``structured_ptq`` — channels removed (``str_ratio``, no fine-tuning), then static W8A8.
* ``mixed`` — Q9 mixed-precision weights (2/4/8 bits from its own sensitivity) at ``mixed_ratio``.

Example:
    >>> from netpress.search.space import stages_for
    >>> from netpress.search.sensitivity import SensitivityTable
    >>> t = SensitivityTable(["a", "b"], ["w8a8"], {"a": 4, "b": 4},
    ...     {"a": {"w8a8": 9.0}, "b": {"w8a8": 0.0}}, {"a": {"w8a8": 0.0}, "b": {"w8a8": 0.0}},
    ...     90.0, "calibration")
    >>> stages_for({"family": "ptq", "ptq_keep": 1, "ptq_act": "percentile", "ptq_wobs": "minmax"},
    ...            t)[0]["quantize"]["ignore"]
    ['a']
"""

from __future__ import annotations

from typing import Any

from netpress.search.sensitivity import SensitivityTable

KEEP_CHOICES = (0, 1, 2, 3, 4, 6, 8)


def _ranked(table: SensitivityTable, prefer: list[str]) -> list[str]:
    for col in prefer:
        if col in table.columns:
            return table.ranking(col)
    return table.ranking()


def _sparsity_col(table: SensitivityTable) -> list[str]:
    cols = sorted((c for c in table.columns if c.startswith("sparsity ")),
                  key=lambda c: -float(c.split()[1]))
    return cols


def keep_layers(table: SensitivityTable, family: str, keep: int) -> list[str]:
    """The ``keep`` most sensitive layers for ``family`` (left in float / unpruned)."""
    if keep <= 0:
        return []
    if family in ("ptq", "structured_ptq"):
        order = _ranked(table, ["w8a8", "int8", "int4"])
    elif family == "magnitude_int8":
        order = _ranked(table, _sparsity_col(table))
    else:
        order = _ranked(table, ["int8", "int4", "w8a8"])
    return order[:keep]


def suggest(trial: Any, families: list[str], n_layers: int) -> dict[str, Any]:
    """Sample one point with an Optuna trial (define-by-run, conditional on the family)."""
    keeps = [k for k in KEEP_CHOICES if k < max(n_layers, 1)]  # at least one layer compressed
    p: dict[str, Any] = {"family": trial.suggest_categorical("family", list(families))}
    f = p["family"]
    if f in ("ptq", "structured_ptq"):
        p["ptq_keep"] = trial.suggest_categorical("ptq_keep", keeps)
        p["ptq_act"] = trial.suggest_categorical("ptq_act", ["percentile", "minmax", "mse"])
        p["ptq_wobs"] = trial.suggest_categorical("ptq_wobs", ["minmax", "mse", "output_mse"])
    if f == "structured_ptq":
        p["str_ratio"] = trial.suggest_float("str_ratio", 0.05, 0.4, step=0.05)
    if f == "int8_weight":
        p["w8_keep"] = trial.suggest_categorical("w8_keep", keeps)
    if f == "magnitude_int8":
        p["mag_sparsity"] = trial.suggest_float("mag_sparsity", 0.2, 0.8, step=0.05)
        p["mag_keep"] = trial.suggest_categorical("mag_keep", keeps)
    if f == "mixed":
        p["mixed_ratio"] = trial.suggest_float("mixed_ratio", 4.5, 12.0, step=0.5)
    return p


def seed_points(families: list[str], table: SensitivityTable) -> list[dict[str, Any]]:
    """Sensible first trials, enqueued before the sampler takes over (most promising first).

    The number of float layers seeded for PTQ is the count of layers whose ``w8a8`` score stands
    out (more than 4x the median), capped at 3.
    """
    import statistics

    keep = 0
    if "w8a8" in table.columns and table.layers:
        # layers screened out of the end-to-end measurement count as insensitive (score 0)
        scores = [table.score(n, "w8a8") if table.measured(n) else 0.0 for n in table.layers]
        med = statistics.median(scores)
        keep = min(3, sum(s > 4 * max(med, 1e-9) for s in scores))
    allowed = [k for k in KEEP_CHOICES if k < max(len(table.layers), 1)]
    one = min(allowed, key=lambda k: abs(k - 1))
    keep = min(allowed, key=lambda k: abs(k - max(keep, 1)))
    out: list[dict[str, Any]] = []
    if "ptq" in families:  # the sensitivity-guided point first: the likeliest to be feasible
        out.append({"family": "ptq", "ptq_keep": keep, "ptq_act": "percentile",
                    "ptq_wobs": "minmax"})
        if keep != 0:
            out.append({"family": "ptq", "ptq_keep": 0, "ptq_act": "percentile",
                        "ptq_wobs": "minmax"})
    if "int8_weight" in families:
        out.append({"family": "int8_weight", "w8_keep": 0})
    if "magnitude_int8" in families:
        out.append({"family": "magnitude_int8", "mag_sparsity": 0.5, "mag_keep": one})
    if "structured_ptq" in families:
        out.append({"family": "structured_ptq", "str_ratio": 0.1, "ptq_keep": keep,
                    "ptq_act": "percentile", "ptq_wobs": "minmax"})
    if "mixed" in families:
        out.append({"family": "mixed", "mixed_ratio": 6.0})
    return out


def stages_for(params: dict[str, Any], table: SensitivityTable) -> list[dict[str, Any]]:
    """Recipe stages of one point (plain dicts, validated later by the recipe)."""
    f = params["family"]

    def ptq(keep: int) -> dict[str, Any]:
        return {"quantize": {"method": "ptq", "weights": {"observer": params["ptq_wobs"]},
                             "activations": {"observer": params["ptq_act"]},
                             "ignore": keep_layers(table, f, keep)}}

    if f == "ptq":
        return [ptq(params["ptq_keep"])]
    if f == "structured_ptq":
        return [{"prune": {"method": "structured", "ratio": params["str_ratio"]}},
                ptq(params["ptq_keep"])]
    if f == "int8_weight":
        return [{"quantize": {"method": "int8_weight",
                              "ignore": keep_layers(table, f, params["w8_keep"])}}]
    if f == "magnitude_int8":
        return [{"prune": {"method": "magnitude", "sparsity": params["mag_sparsity"],
                           "scope": "global",
                           "ignore": keep_layers(table, f, params["mag_keep"])}},
                {"quantize": {"method": "int8_weight"}}]
    if f == "mixed":
        return [{"quantize": {"method": "mixed", "bits": [2, 4, 8],
                              "size_ratio": params["mixed_ratio"], "finetune": {"epochs": 0}}}]
    raise ValueError(f"unknown family {f!r}")  # the recipe's PlanSpec validated the names


def describe(params: dict[str, Any]) -> str:
    """One short line for tables and plots."""
    f = params.get("family", "?")
    rest = ", ".join(f"{k}={v}" for k, v in params.items() if k != "family")
    return f"{f} ({rest})" if rest else f


__all__ = ["KEEP_CHOICES", "describe", "keep_layers", "seed_points", "stages_for", "suggest"]
