"""Recipe fuzzing: generated malformed recipes through ``Recipe.from_dict``, ``Recipe.load``
and the CLI's ``netpress compress``: only ``RecipeError`` naming a key path and a fix, exit code 2,
nothing written.

Example:
    >>> from netpress.reliability.fuzz import run_fuzz  # doctest: +SKIP
    >>> run_fuzz(50).failures  # doctest: +SKIP
    []
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from netpress.core.errors import RecipeError
from netpress.reliability.common import BASE_RECIPE, Section

TOP_KEYS = ("version", "model", "data", "metric", "stages", "export", "seed", "runtime", "threads",
            "batch", "eval_limit")
RECIPE_NAME = "r.yaml"


@dataclass
class Malformed:
    """A malformed recipe: a Python object (``obj``) or raw file text/bytes (``text``).

    ``hint`` must appear in the error's message (a key path or the file name).
    """

    kind: str
    hint: str
    obj: Any = None
    text: str | bytes | None = None

    def file_bytes(self) -> bytes:
        if self.text is not None:
            return self.text.encode("utf-8") if isinstance(self.text, str) else self.text
        return yaml.safe_dump(self.obj, allow_unicode=True, sort_keys=False).encode("utf-8")


def _deep(depth: int, leaf: Any = 1, as_dict: bool = False) -> Any:
    value = leaf
    for _ in range(depth):
        value = {"a": value} if as_dict else [value]
    return value


def _wrong_top_values(key: str) -> Any:
    """Values that ``key`` must refuse (hypothesis strategy)."""
    from hypothesis import strategies as st

    junk = st.one_of(st.floats(allow_nan=True), st.lists(st.integers(), max_size=3),
                     st.dictionaries(st.text(max_size=5), st.integers(), max_size=2))
    huge = st.integers(4097, 200_000).map(lambda n: "x" * n)
    ints = {"seed": (0, 2**32 - 1), "threads": (1, 256), "batch": (1, 4096),
            "eval_limit": (1, 10**7)}
    if key in ("model", "data"):
        bad = st.one_of(st.integers(), st.booleans(), junk, huge)
        return bad if key == "data" else st.one_of(bad, st.none(), st.just(""))
    if key in ints:
        lo, hi = ints[key]
        out_of_range = st.one_of(st.integers(max_value=lo - 1), st.integers(min_value=hi + 1))
        return st.one_of(out_of_range, st.booleans(), st.text(max_size=8), junk)
    if key in ("metric", "runtime"):
        from netpress.core.recipe import _Fields

        allowed = set(_literal_values(_Fields.model_fields[key].annotation))
        return st.one_of(st.text(max_size=30).filter(lambda s: s not in allowed), st.integers(),
                         junk, huge)
    if key == "export":
        return st.one_of(st.text(max_size=10), st.integers(), st.dictionaries(
            st.text(max_size=3), st.integers(), max_size=2), st.lists(
            st.text(max_size=12).filter(lambda s: s not in ("artifact", "onnx")),
            min_size=1, max_size=3))
    if key == "stages":
        return st.one_of(st.text(max_size=10), st.integers(), st.none(), st.booleans(),
                         st.integers(65, 300).map(lambda n: [BASE_RECIPE["stages"][0]] * n))
    return st.one_of(st.text(max_size=8), st.floats(), st.none(), st.lists(st.integers()))  # version


def _literal_values(annotation: Any) -> list[Any]:
    import typing

    out: list[Any] = []
    for arg in typing.get_args(annotation):
        out += _literal_values(arg) if typing.get_args(arg) else [arg]
    return out


def _technique_fields() -> list[tuple[str, str, str, dict[str, Any]]]:
    """(stage, method, field) of every registered technique field that refuses a nested mapping."""
    from pydantic import BaseModel

    from netpress.core.config import techniques

    out = []
    for tech in techniques():
        base = _valid_config(tech)
        if base is None:
            continue
        for name, info in tech.config_cls.model_fields.items():
            text = str(info.annotation)
            nested_model = isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel)
            if name in ("version", "method") or nested_model or any(
                    w in text for w in ("dict", "Any", "Mapping", "BaseModel", "object")):
                continue
            out.append((tech.stage, tech.method, name, base))
    return out


def _valid_config(tech: Any) -> dict[str, Any] | None:
    """A small valid config of ``tech`` (so a mutation is the only thing wrong), if one is found."""
    for extra in ({}, {"sparsity": 0.5}, {"bits": 8}, {"bits": 4}, {"rank": 4}):
        body = {"method": tech.method, **extra}
        try:
            tech.config_cls.model_validate(body)
        except Exception:  # noqa: BLE001 - not a valid base; try the next
            continue
        return body
    return None


def malformed_recipes() -> Any:
    """Hypothesis strategy of :class:`Malformed` recipes, each invalid by construction."""
    from hypothesis import strategies as st

    from netpress.core.config import STAGES, techniques

    base = BASE_RECIPE
    key_text = st.text(st.characters(codec="utf-8", exclude_categories=("Cc", "Cs", "Zl", "Zp")),
                       min_size=1, max_size=40)
    tricky = st.sampled_from(["[bold]x", "[/]", "x[/red]", ":smile:", "[link=file:///x]y",
                              "\\", "%s%n", "{0}", "$(touch x)", "../../x", "a.b.c"])
    unknown_key = st.one_of(key_text.filter(lambda k: k not in TOP_KEYS), tricky,
                            st.integers(1000, 50_000).map(lambda n: "k" * n))
    value = st.one_of(st.none(), st.integers(), st.floats(), st.text(max_size=20),
                      st.lists(st.integers(), max_size=3))
    known = {(t.stage, t.method) for t in techniques()}
    fields = _technique_fields()

    def with_stage(i: int, stage: Any) -> dict[str, Any]:
        stages = list(base["stages"])
        stages[i % len(stages)] = stage
        return {**base, "stages": stages}

    cases = [
        st.builds(lambda k, v: Malformed("unknown top-level key", str(k)[:20], {**base, k: v}),
                  unknown_key, value),
        st.sampled_from(TOP_KEYS[1:]).flatmap(lambda k: _wrong_top_values(k).map(
            lambda v: Malformed(f"wrong type or range: {k}", k, {**base, k: v}))),
        st.builds(lambda v: Malformed("not a mapping", RECIPE_NAME, v),
                  st.one_of(value, st.lists(value, max_size=3))),
        st.builds(lambda i, s: Malformed("stage not a one-key mapping", f"stages[{i % 2}]",
                                         with_stage(i, s)), st.integers(0, 1), st.one_of(
            value, st.just({}), st.just({"prune": {"method": "magnitude"}, "quantize": {}}))),
        st.builds(lambda i, k: Malformed("unknown stage kind", f"stages[{i % 2}]",
                                         with_stage(i, {k: {"method": "magnitude"}})),
                  st.integers(0, 1), key_text.filter(lambda k: k not in STAGES)),
        st.builds(lambda kind, m: Malformed("unknown method", "method",
                                            with_stage(0, {kind: {"method": m}})),
                  st.sampled_from(STAGES), st.one_of(value, key_text).filter(
                      lambda m: not isinstance(m, str) or m not in {mm for _, mm in known})),
        st.builds(lambda kind, body: Malformed("stage body not a mapping", f"stages[0].{kind}",
                                               with_stage(0, {kind: body})),
                  st.sampled_from(STAGES), st.one_of(value, st.lists(value, max_size=2))),
        st.builds(lambda k, v: Malformed("unknown key in a technique", str(k)[:20],
                                         with_stage(0, {"prune": {"method": "magnitude",
                                                                  "sparsity": 0.5, k: v}})),
                  key_text.filter(lambda k: k not in ("version", "method", "sparsity",
                                                      "threshold", "scope", "targets",
                                                      "ignore")), value),
        st.builds(lambda v: Malformed("out-of-range sparsity", "sparsity", with_stage(
            0, {"prune": {"method": "magnitude", "sparsity": v}})), st.one_of(
            st.floats(min_value=1.0), st.floats(max_value=-1e-9), st.just(float("nan")),
            st.text(max_size=5))),
        st.builds(lambda v: Malformed("out-of-range bits", "bits", with_stage(
            1, {"quantize": {"method": "int8_weight", "bits": v}})), st.one_of(
            st.integers(max_value=1), st.integers(min_value=17), st.floats(), st.booleans())),
        st.builds(lambda d, as_dict, where: Malformed(
            "deep nesting", where, _place(base, where, _deep(d, as_dict=as_dict))),
            st.integers(2, 150), st.booleans(),
            st.sampled_from(["model", "stages[0]", "targets", "export"])),
    ]
    if fields:
        cases.append(st.builds(lambda f, v: Malformed(
            f"wrong type in {f[0]}:{f[1]}", f[2],
            with_stage(0, {f[0]: {**f[3], f[2]: v}})),
            st.sampled_from(fields), st.one_of(st.just({"nested": [1, {"x": None}]}),
                                               st.integers(2, 50).map(_deep))))
    return st.one_of(*cases, _malformed_text())


def _place(base: dict[str, Any], where: str, value: Any) -> dict[str, Any]:
    out = json.loads(json.dumps(base))
    if where == "model":
        out["model"] = value
    elif where == "stages[0]":
        out["stages"][0] = value
    elif where == "targets":
        out["stages"][0]["prune"]["targets"] = value
    else:
        out["export"] = [value]
    return out


_BREAKERS = (
    "\tbogus: 1", "]", "}", "bogus: [1, 2", "model: \"unterminated", "*undefined_alias",
    "a: b: c", "- stray item", "bogus: !!python/object/apply:os.system ['true']", "? [x]\n: 1",
    "bogus: !!int abc", "bogus: 2020-02-30", "bogus: !!timestamp x", "bogus: !!float x",
    "bogus: !!binary '!'", "bogus: " + "9" * 5000, "<<: 5", "%YAML 1.1\n--- x",
)


def _malformed_text() -> Any:
    from hypothesis import strategies as st

    good = yaml.safe_dump(BASE_RECIPE, sort_keys=False)
    lines = good.splitlines()
    as_json = json.dumps(BASE_RECIPE)
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(  # 9**9 leaves if expanded
        f"{c}: &{c} [{', '.join(['*' + p] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi",
                                                                    strict=True))
    return st.one_of(
        st.builds(lambda i, b: Malformed("broken YAML line", RECIPE_NAME, text="\n".join(
            lines[:i] + [b] + lines[i:]) + "\n"), st.integers(0, len(lines)),
            st.sampled_from(_BREAKERS)),
        st.builds(lambda n: Malformed("truncated JSON", RECIPE_NAME, text=as_json[:n]),
                  st.integers(1, len(as_json) - 1)),
        st.builds(lambda i, b: Malformed("invalid UTF-8", RECIPE_NAME, text=good.encode()[:i]
                                         + b + good.encode()[i:]),
                  st.integers(0, len(good)), st.sampled_from([b"\xff", b"\xc3\x28", b"\xed\xa0\x80"])),
        st.builds(lambda n, c: Malformed("deep nesting (text)", RECIPE_NAME,
                                         text=f"model: zoo:x\nbogus: {c[0] * n}1{c[1] * n}\n"),
                  st.integers(1_000, 5_000), st.sampled_from(["[]", ("{a: ", "}")])),
        st.builds(lambda n: Malformed("huge file", RECIPE_NAME, text="model: zoo:x\n# "
                                      + "x" * n + "\n"), st.integers(1_000_001, 1_500_000)),
        st.builds(lambda k: Malformed("alias bomb", RECIPE_NAME, text=bomb + f"model: zoo:x\n{k}: *i\n"),
                  st.sampled_from(["model", "stages", "export", "bogus"])),
    )


def check_from_dict(case: Malformed) -> str | None:
    """``Recipe.from_dict`` must raise a useful :class:`RecipeError` (or ``None`` is returned)."""
    from netpress.core.recipe import Recipe

    if case.text is not None:
        return None
    return _expect_recipe_error(lambda: Recipe.from_dict(case.obj), case, "from_dict")


def check_load(case: Malformed, workdir: Path) -> str | None:
    """``Recipe.load`` of the case's file must raise a useful :class:`RecipeError`."""
    from netpress.core.recipe import Recipe

    path = workdir / RECIPE_NAME
    path.write_bytes(case.file_bytes())
    try:
        return _expect_recipe_error(lambda: Recipe.load(path), case, "Recipe.load")
    finally:
        path.unlink()


def _expect_recipe_error(fn: Callable[[], Any], case: Malformed, entry: str) -> str | None:
    try:
        fn()
    except RecipeError as exc:
        return _message_problem(str(exc), case, entry)
    except BaseException as exc:  # noqa: BLE001 - exactly what the fuzzer looks for
        return f"{entry} [{case.kind}]: {type(exc).__name__}: {str(exc)[:200]}"
    return f"{entry} [{case.kind}]: accepted a malformed recipe"


def _message_problem(msg: str, case: Malformed, entry: str) -> str | None:
    hint = case.hint if entry != "from_dict" or case.hint != RECIPE_NAME else "recipe"
    if "Fix:" not in msg:
        return f"{entry} [{case.kind}]: no fix in {msg[:200]!r}"
    if hint not in msg and not (hint == RECIPE_NAME and "recipe" in msg):
        return f"{entry} [{case.kind}]: {hint!r} not named in {msg[:200]!r}"
    if len(msg) > 1000:
        return f"{entry} [{case.kind}]: message of {len(msg)} characters"
    return None


def check_cli(case: Malformed, workdir: Path) -> str | None:
    """``netpress compress FILE --out DIR`` in-process: exit 2, one line, no traceback, no files."""
    from netpress import cli

    path = workdir / RECIPE_NAME
    path.write_bytes(case.file_bytes())
    private = workdir / "tmp"  # the run's temp files land here (the shared /tmp is busy)
    private.mkdir(exist_ok=True)
    before = set(os.listdir(workdir))
    err, code = io.StringIO(), None
    argv, saved_tmp = sys.argv, tempfile.tempdir
    sys.argv = ["netpress", "compress", str(path), "--out", str(workdir / "out")]
    tempfile.tempdir = str(private)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            cli.main()
    except SystemExit as exc:
        code = exc.code
    except BaseException as exc:  # noqa: BLE001
        return f"cli [{case.kind}]: escaped main(): {type(exc).__name__}: {str(exc)[:200]}"
    finally:
        sys.argv, tempfile.tempdir = argv, saved_tmp
    text = err.getvalue()
    after = set(os.listdir(workdir))
    path.unlink()
    if code != 2:
        return f"cli [{case.kind}]: exit code {code!r}, stderr {text[:200]!r}"
    if "Traceback" in text or "internal error" in text:
        return f"cli [{case.kind}]: {text[:200]!r}"
    if after != before or os.listdir(private):
        return f"cli [{case.kind}]: wrote {sorted((after - before) | set(os.listdir(private)))}"
    return _message_problem(text, case, "cli")


def check_case(case: Malformed, workdir: Path, cli: bool = True) -> list[str]:
    """Every entry point on one case; the failures (empty when all behaved)."""
    out = [check_from_dict(case), check_load(case, workdir)]
    if cli and not (out[1] or "").endswith("accepted a malformed recipe"):  # never run a real job
        out.append(check_cli(case, workdir))
    return [f for f in out if f]


def run_fuzz(examples: int, seed: int = 0) -> Section:
    """``examples`` generated malformed recipes through from_dict / load / the CLI."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hseed

    section = Section("recipe fuzzing")
    kinds: dict[str, int] = {}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="netpress-fuzz-") as d:
        @hseed(seed)
        @settings(max_examples=examples, deadline=None, database=None, phases=[Phase.generate],
                  suppress_health_check=list(HealthCheck))
        @given(malformed_recipes())
        def one(case: Malformed) -> None:
            kinds[case.kind.split(":")[0]] = kinds.get(case.kind.split(":")[0], 0) + 1
            fails = check_case(case, Path(d))
            section.check("; ".join(fails) if fails else None)

        one()
    section.seconds = time.perf_counter() - start
    section.notes.append("by kind: " + ", ".join(f"{k} {v}" for k, v in sorted(kinds.items())))
    return section


