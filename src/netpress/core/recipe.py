"""Recipes: the YAML/JSON description of a compression run, and the same objects in Python.

A recipe names a model, data, a metric, an ordered list of stages and what to export. Every stage is
``{kind: {method: ..., ...}}`` and is validated by the registered config class of that method, so
unknown keys and wrong types are :class:`RecipeError` before any work starts.

Example:
    >>> from netpress.core.recipe import Recipe
    >>> r = Recipe.from_dict({
    ...     "model": "zoo:digits_cnn", "data": "zoo:digits", "metric": "accuracy",
    ...     "stages": [{"prune": {"method": "magnitude", "sparsity": 0.5}}],
    ... })
    >>> r.stages[0].kind, r.stages[0].config.method
    ('prune', 'magnitude')
    >>> Recipe.from_dict(r.to_dict()) == r
    True
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from netpress.core.config import (
    STAGES,
    TechniqueConfig,
    parse_config,
    validation_to_recipe_error,
)
from netpress.core.errors import RecipeError
from netpress.search.sensitivity import SensitivityConfig

EXPORTS = ("artifact", "onnx")
RUNTIMES = ("onnxruntime", "openvino", "torch")
METRICS = ("accuracy", "top1_agreement", "kl", "cosine")


class Stage(BaseModel):
    """One step of a recipe: a stage kind and its validated technique config."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    kind: str
    config: TechniqueConfig

    def to_dict(self) -> dict[str, Any]:
        return {self.kind: self.config.to_dict()}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Stage) and self.to_dict() == other.to_dict()


class _Fields(BaseModel):
    """The recipe's top-level keys (stages are validated separately, per method)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    version: int = 1
    model: str = Field(min_length=1, max_length=4096)
    data: str | None = Field(default=None, max_length=4096)
    metric: Literal["accuracy", "top1_agreement", "kl", "cosine"] | None = None
    stages: list[Any] = Field(default_factory=list, max_length=64)
    export: list[Literal["artifact", "onnx"]] = Field(default_factory=lambda: ["artifact"])  # type: ignore[arg-type]
    seed: int = Field(default=0, ge=0, le=2**32 - 1)
    runtime: Literal["onnxruntime", "openvino", "torch"] = "onnxruntime"
    threads: int = Field(default=2, ge=1, le=256)
    batch: int = Field(default=1, ge=1, le=4096)
    eval_limit: int | None = Field(default=None, ge=1, le=10**7)
    plan: Any = None


PlanFamily = Literal["ptq", "int8_weight", "magnitude_int8", "structured_ptq", "mixed"]
PLAN_FAMILIES: tuple[str, ...] = PlanFamily.__args__  # type: ignore[attr-defined]


class PlanSpec(BaseModel):
    """The optional ``plan:`` block: what ``netpress plan`` searches for (CLI flags override it).

    Attributes:
        max_size_mb: artifact weight bytes at most this many MB (10^6 bytes).
        min_speedup: at least this speed-up vs the original model on ``speedup_vs``.
        max_latency_ms: measured latency at most this.
        max_drop: metric drop vs the original at most this (metric units).
        budget_minutes: stop starting new trials after this long (this invocation).
        trials: total trials of the study (a resumed study counts the ones already done).
        workers: None/"inprocess", "ray", "ray://HOST:PORT" or "HOST:PORT".
        speedup_vs: runtime of the reference latency (default: the recipe's ``runtime``).
        metric: the metric optimised and limited by ``max_drop`` (default: the recipe's metric;
            e.g. ``top1_agreement_confident``, a secondary metric measured for classifiers).
        families: technique combinations the search may use (default: all).
        sensitivity: the per-layer analysis (see :mod:`netpress.search.sensitivity`).
        validation: share of the calibration examples held out to score trials and check the
            constraints (the last ones; no trial calibrates or fine-tunes on them). The best point
            is chosen on them; only its reported metric comes from the evaluation split (see
            :mod:`netpress.search.validation`).

    Example:
        >>> PlanSpec(max_size_mb=4, families=["ptq"]).trials
        20
        >>> PlanSpec().validation
        0.5
    """

    model_config = ConfigDict(extra="forbid")

    max_size_mb: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    min_speedup: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    max_latency_ms: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    max_drop: float | None = Field(default=None, ge=0, allow_inf_nan=False)
    budget_minutes: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    trials: int = Field(default=20, ge=1, le=100_000)
    workers: str | None = Field(default=None, max_length=300)
    speedup_vs: Literal["onnxruntime", "openvino", "torch"] | None = None
    metric: str | None = Field(default=None, max_length=64)
    families: list[PlanFamily] = Field(default_factory=lambda: list(PLAN_FAMILIES),  # type: ignore[arg-type]
                                       min_length=1)
    sensitivity: SensitivityConfig = Field(default_factory=SensitivityConfig)
    validation: float = Field(default=0.5, gt=0, lt=1, allow_inf_nan=False)


class Recipe(BaseModel):
    """A validated recipe. Build it with :meth:`from_dict`, :meth:`load` or directly in Python.

    Attributes:
        model: ``zoo:NAME``, a ``.pt2`` torch.export file, or ``hf:DIR``.
        data: ``zoo:NAME`` (calibration, fine-tune and held-out evaluation splits).
        metric: ``accuracy``, ``top1_agreement``, ``kl`` or ``cosine`` (default: the data's own).
        stages: ordered :class:`Stage` list.
        export: subset of ``artifact`` and ``onnx``.
        seed, runtime, threads, batch: reproducibility and how latency is measured.
        eval_limit: evaluate on at most this many held-out examples (default: all).
        plan: optional :class:`PlanSpec` read by ``netpress plan`` (``compress`` ignores it).
    """

    model_config = ConfigDict(extra="forbid")

    version: int = 1
    model: str
    data: str | None = None
    metric: str | None = None
    stages: list[Stage] = Field(default_factory=list)
    export: list[str] = Field(default_factory=lambda: ["artifact"])
    seed: int = 0
    runtime: str = "onnxruntime"
    threads: int = 2
    batch: int = 1
    eval_limit: int | None = None
    plan: PlanSpec | None = None

    @classmethod
    def from_dict(cls, data: Any, where: str = "recipe") -> Recipe:
        """Validate a plain mapping (as read from YAML/JSON) into a :class:`Recipe`.

        Raises:
            RecipeError: naming the offending key path, what was received and how to fix it.
        """
        if not isinstance(data, dict):
            raise RecipeError(
                where, got=type(data).__name__, expected="a mapping with keys model, data, stages",
                fix="start the file with `model: zoo:mobilenet_v2` (see README)",
            )
        try:
            fields = _Fields.model_validate(data)
        except ValidationError as exc:
            raise validation_to_recipe_error(exc, where) from None
        stages = [_parse_stage(s, f"{where}.stages[{i}]") for i, s in enumerate(fields.stages)]
        values = fields.model_dump()
        values["stages"] = stages
        if fields.plan is not None:
            try:
                values["plan"] = PlanSpec.model_validate(fields.plan)
            except ValidationError as exc:
                raise validation_to_recipe_error(exc, f"{where}.plan") from None
        return cls(**values)

    @classmethod
    def load(cls, path: str | Path) -> Recipe:
        """Read a ``.yaml``/``.yml``/``.json`` recipe file.

        Raises:
            RecipeError: the file is missing, unreadable, not valid YAML/JSON, or invalid.
        """
        path = Path(path)
        if not path.is_file():
            raise RecipeError(
                str(path), got="no such file", expected="a recipe .yaml or .json file",
                fix="check the path",
            )
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise RecipeError(
                str(path), got=type(exc).__name__, expected="a UTF-8 text file",
                fix="save the recipe as UTF-8 YAML or JSON",
            ) from None
        return cls.from_dict(parse_text(text, str(path)), where=path.name)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict that :meth:`from_dict` accepts and that compares equal after a round trip."""
        out = self.model_dump(exclude={"stages", "plan"})
        out["stages"] = [s.to_dict() for s in self.stages]
        if self.plan is not None:
            out["plan"] = self.plan.model_dump(mode="json")
        return out


def parse_text(text: str, where: str) -> Any:
    """Parse YAML (a superset of JSON); syntax errors become :class:`RecipeError` with the line."""
    if len(text) > 1_000_000:
        raise RecipeError(where, got=f"{len(text)} characters", expected="a recipe under 1 MB",
                          fix="recipes are short; check you passed the right file")
    if _flow_depth(text) > 64:  # PyYAML needs seconds to hit its recursion limit on [[[[...
        raise RecipeError(where, got="brackets nested more than 64 deep", expected="a flat recipe",
                          fix="remove the deeply nested structure")
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise RecipeError(
            f"{where}{line}", got=f"malformed YAML ({problem})", expected="valid YAML or JSON",
            fix="check indentation, colons and quotes on that line",
        ) from None
    except RecursionError:
        raise RecipeError(where, got="nesting too deep", expected="a flat recipe",
                          fix="remove the deeply nested structure") from None
    except (ValueError, TypeError, AttributeError, OverflowError) as exc:
        # PyYAML's constructors raise these for e.g. `2020-02-30`, `!!int abc`, 5000-digit ints
        raise RecipeError(where, got=f"a YAML value that cannot be read ({type(exc).__name__})",
                          expected="plain strings, numbers, lists and mappings",
                          fix="quote the value, or fix the date/number it is read as") from None


def _flow_depth(text: str) -> int:
    """Deepest nesting of ``[`` / ``{`` (quotes ignored: an over-estimate only for odd strings)."""
    depth = deepest = 0
    for m in re.finditer(r"[\[\]{}]", text):
        depth = depth + 1 if m.group() in "[{" else max(depth - 1, 0)
        deepest = max(deepest, depth)
    return deepest


def _parse_stage(item: Any, where: str) -> Stage:
    if isinstance(item, Stage):
        return item
    if not isinstance(item, dict) or len(item) != 1:
        raise RecipeError(
            where, got=item, expected="a one-key mapping like {prune: {method: magnitude}}",
            fix="write each stage as `- KIND: {method: ..., ...}`",
        )
    (kind, body), = item.items()
    if kind not in STAGES:
        raise RecipeError(
            where, got=kind, expected=f"a stage kind: {', '.join(STAGES)}", fix="rename the stage"
        )
    return Stage(kind=kind, config=parse_config(kind, body, f"{where}.{kind}"))


def dumps(recipe: Recipe) -> str:
    """The recipe as pretty JSON (what manifests store)."""
    return json.dumps(recipe.to_dict(), indent=2, sort_keys=True)


__all__ = ["Recipe", "Stage", "PlanSpec", "PLAN_FAMILIES", "parse_text", "dumps", "EXPORTS",
           "RUNTIMES", "METRICS"]
