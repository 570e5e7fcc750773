"""Technique configs and the registry that maps ``(stage, method)`` to a config class and handler.

Every technique has exactly one pydantic config class (``extra="forbid"``, a ``version`` field,
round-trips to a plain dict) and one handler ``handler(model, config, ctx) -> model``. Recipes,
the Python API and the CLI all go through :func:`get_technique`, so an unknown method gets the
same error everywhere, naming the registered ones.

Example:
    >>> from netpress.core.config import TechniqueConfig, register, get_technique
    >>> class NoopConfig(TechniqueConfig):
    ...     method: str = "noop-doc"
    >>> @register("prune", "noop-doc", NoopConfig, summary="does nothing")
    ... def _noop(model, config, ctx):
    ...     return model
    >>> get_technique("prune", "noop-doc").config_cls is NoopConfig
    True
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from netpress.core.errors import RecipeError

STAGES = ("prune", "quantize", "distill", "lowrank")


class TechniqueConfig(BaseModel):
    """Base of every technique config: strict keys, a version, dict round-trip."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    version: int = 1
    method: str

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict that :meth:`from_dict` turns back into an equal config."""
        return self.model_dump(mode="json")

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "config") -> TechniqueConfig:
        """Validate ``data``; any problem becomes a :class:`RecipeError` naming the key."""
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise validation_to_recipe_error(exc, where) from None


@dataclass
class StageContext:
    """What a handler may use besides the model and its config.

    Attributes:
        data: calibration / fine-tuning batches (a list of :class:`netpress.core.data.Batch`).
        original: the uncompressed model (teacher for distillation, reference for metrics).
        seed: the run's seed.
        report: a dict the handler may fill with notes for the report (e.g. layers kept in float).
        advanced: technique-specific extra options, passed through untouched.
    """

    data: list[Any] | None = None
    original: Any = None
    seed: int = 0
    report: dict[str, Any] = field(default_factory=dict)
    advanced: Any = None


Handler = Callable[[Any, TechniqueConfig, StageContext], Any]


@dataclass(frozen=True)
class Technique:
    stage: str
    method: str
    config_cls: type[TechniqueConfig]
    handler: Handler
    summary: str


_REGISTRY: dict[tuple[str, str], Technique] = {}


def register(
    stage: str, method: str, config_cls: type[TechniqueConfig], summary: str
) -> Callable[[Handler], Handler]:
    """Decorator registering ``handler`` as the implementation of ``stage: {method: ...}``."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; stages are {STAGES}")

    def deco(handler: Handler) -> Handler:
        _REGISTRY[(stage, method)] = Technique(stage, method, config_cls, handler, summary)
        return handler

    return deco


def techniques() -> list[Technique]:
    """Every registered technique, sorted by stage then method."""
    _load_builtin()
    return sorted(_REGISTRY.values(), key=lambda t: (STAGES.index(t.stage), t.method))


def get_technique(stage: str, method: str, where: str | None = None) -> Technique:
    """Look up a technique; unknown stage or method raises :class:`RecipeError` listing options."""
    _load_builtin()
    where = where or stage
    if stage not in STAGES:
        raise RecipeError(
            where, got=stage, expected=f"one of {', '.join(STAGES)}", fix="rename the stage"
        )
    tech = _REGISTRY.get((stage, method))
    if tech is None:
        known = sorted(m for s, m in _REGISTRY if s == stage)
        raise RecipeError(
            f"{where}.method",
            got=method,
            expected=f"one of {', '.join(known) or '(none registered yet)'}",
            fix="pick a registered method (`netpress techniques` lists them)",
        )
    return tech


def parse_config(stage: str, data: Any, where: str | None = None) -> TechniqueConfig:
    """Turn ``{"method": ..., ...}`` (or a config object) into the registered config class."""
    where = where or stage
    if isinstance(data, TechniqueConfig):
        get_technique(stage, data.method, where)
        return data
    if not isinstance(data, dict):
        raise RecipeError(
            where, got=data, expected="a mapping with a `method` key", fix="e.g. {method: magnitude}"
        )
    method = data.get("method")
    if not isinstance(method, str):
        raise RecipeError(
            f"{where}.method", got=method, expected="a method name (string)",
            fix="add `method:`; `netpress techniques` lists them",
        )
    tech = get_technique(stage, method, where)
    return tech.config_cls.from_dict(data, where)


def validation_to_recipe_error(exc: ValidationError, where: str) -> RecipeError:
    """First pydantic error as a :class:`RecipeError` with a dotted path and a fix."""
    err = exc.errors()[0]
    loc = ".".join(str(p) if not isinstance(p, int) else f"[{p}]" for p in err["loc"])
    path = f"{where}.{loc}".replace(".[", "[") if loc else where
    kind = err["type"]
    if kind == "extra_forbidden":
        return RecipeError(
            path, got="an unknown key", expected="only the documented keys",
            fix="remove or rename it (unknown keys are errors so typos never pass silently)",
        )
    if kind == "missing":
        return RecipeError(path, got="nothing", expected="a value", fix="add this required key")
    if kind == "value_error":  # netpress's own validators: their text, as written
        text = err["msg"].removeprefix("Value error, ")
        return RecipeError(path, got=err.get("input"), expected="a consistent value", fix=text)
    return RecipeError(path, got=err.get("input"), expected=err["msg"].lower(),
                       fix=_fix_for(kind, err.get("ctx") or {}, path))


_BOUNDS = {"less_than_equal": ("le", "<="), "less_than": ("lt", "<"),
           "greater_than_equal": ("ge", ">="), "greater_than": ("gt", ">")}
_TYPES = {"int_type": "an integer", "int_parsing": "an integer", "float_type": "a number",
          "float_parsing": "a number", "bool_type": "true or false", "bool_parsing": "true or false",
          "string_type": "a string", "list_type": "a list", "dict_type": "a mapping",
          "model_type": "a mapping", "int_from_float": "an integer"}


def _fix_for(kind: str, ctx: dict[str, Any], path: str) -> str:
    """A fix that says what to write, from the pydantic error's kind and context."""
    if kind in _BOUNDS and _BOUNDS[kind][0] in ctx:
        key, op = _BOUNDS[kind]
        return f"set {path} to a value {op} {ctx[key]}"
    if kind == "literal_error" and "expected" in ctx:
        return f"use {ctx['expected']}"
    if kind in _TYPES:
        return f"give {path} {_TYPES[kind]}"
    return "correct the value"


_LOADED = False


def _load_builtin() -> None:
    """Import the technique packages so their ``@register`` calls run (once)."""
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    import netpress.distill  # noqa: F401
    import netpress.lowrank  # noqa: F401
    import netpress.prune  # noqa: F401
    import netpress.quantize  # noqa: F401
    import netpress.search.nas  # noqa: F401  (distill: {method: nas})
