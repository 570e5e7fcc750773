"""Student NAS (SPEC A3): search a small CNN's width, depth, kernel and head under a budget, each
candidate trained by distillation from the teacher.

The search space is a family of plain sequential CNNs matching the teacher's input (1-D or 2-D convs):
``depth`` conv blocks (Conv → BatchNorm → ReLU) with their own channel counts, one kernel size,
``n_down`` 2x max-pools after the last blocks, and a head (``flatten`` or global average pool ``gap``,
optionally one hidden Linear layer). Optuna's TPE sampler proposes the *shape* (depth, the channel
growth from block to block, kernel, pooling, head, hidden width relative to the last block); the
width is then scaled to the largest that fits the budget (parameters, and/or torch eager latency at
batch 1 on one thread), so every candidate uses the budget it is given. Shapes that cannot fit at
all are rejected before training and do not count as trials. Every accepted candidate is distilled
from the teacher (Hinton KD through :func:`netpress.distill.distill`) on the *fit* part of the
training data and scored on a held-out *validation* part of the training data (the last
``val_fraction`` of its batches), never on the evaluation split. The winner is then retrained on
all the training data (``final_epochs``).

Candidates may run in parallel through :func:`netpress.search.workers.make_executor`
(``workers="ray"``); a candidate that crashes is recorded in the history and skipped.

Example:
    >>> import torch, torch.nn as nn
    >>> from netpress.core.data import Batch
    >>> from netpress.search.nas import NasBudget, search_student
    >>> _ = torch.manual_seed(0)
    >>> teacher = nn.Sequential(nn.Conv1d(1, 16, 3, padding=1), nn.ReLU(), nn.Flatten(),
    ...                         nn.Linear(16 * 16, 3))
    >>> data = [Batch((torch.randn(16, 1, 16),), torch.randint(0, 3, (16,))) for _ in range(4)]
    >>> res = search_student(teacher, data, NasBudget(max_params=600), trials=2, epochs=1,
    ...                      final_epochs=1)
    >>> res.params <= 600, len(res.history) >= 2, res.best_student(data[0].inputs[0]).shape
    (True, True, torch.Size([16, 3]))
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
import torch.nn as nn
from pydantic import Field, model_validator

from netpress.core.config import StageContext, TechniqueConfig, register
from netpress.core.data import Batch, as_batches
from netpress.core.errors import ConstraintError, DataError, ModelError, RecipeError
from netpress.measure import collect_outputs, compute_metric, count_params, latency_torch

__all__ = ["NasBudget", "NasConfig", "NasResult", "StudentArch", "search_student", "train_student",
           "smallest_arch"]

GROWTH = (0.5, 1.0, 1.5, 2.0)  # channels of block i+1 / block i
HIDDEN = (0.0, 1.0, 2.0)  # hidden Linear width / last block's channels (0: no hidden layer)
MAX_DEPTH = 4
MIN_CHANNELS, MAX_BASE = 2, 256
# The distillation recipe every candidate (and the final student) is trained with.
KD_RECIPE: dict[str, Any] = {"method": "kd", "temperature": 4.0, "alpha": 0.7, "lr": 0.01,
                             "keep_sparsity": False}


@dataclass(frozen=True)
class NasBudget:
    """What a student may cost; at least one limit must be set.

    Attributes:
        max_params: parameters (weights + biases + BatchNorm affine), as :func:`count_params`.
        max_latency_ms: median torch eager latency at batch 1 on one thread.
    """

    max_params: int | None = None
    max_latency_ms: float | None = None

    def check(self) -> None:
        if self.max_params is None and self.max_latency_ms is None:
            raise RecipeError("nas budget", got="no limit", expected="max_params or max_latency_ms",
                              fix="pass e.g. NasBudget(max_params=teacher_params // 5)")
        if self.max_params is not None and self.max_params < 1:
            raise RecipeError("nas budget.max_params", got=self.max_params, expected="an integer >= 1",
                              fix="pass a positive parameter budget")
        if self.max_latency_ms is not None and not self.max_latency_ms > 0:
            raise RecipeError("nas budget.max_latency_ms", got=self.max_latency_ms,
                              expected="a number > 0", fix="pass a positive latency budget")


@dataclass(frozen=True)
class StudentArch:
    """One point of the search space; :meth:`build` makes a fresh ``nn.Sequential``.

    Example:
        >>> arch = StudentArch(dims=2, in_channels=1, num_classes=10, channels=(8, 16), kernel=3,
        ...                    n_down=2, head="gap", hidden=0)
        >>> arch.build()(torch.zeros(2, 1, 8, 8)).shape, arch.params()
        (torch.Size([2, 10]), 1466)
    """

    dims: int
    in_channels: int
    num_classes: int
    channels: tuple[int, ...]
    kernel: int
    n_down: int
    head: Literal["flatten", "gap"]
    hidden: int
    spatial: tuple[int, ...] = ()  # input size without batch/channels; needed by ``flatten``

    def build(self, seed: int = 0) -> nn.Sequential:
        """A freshly initialised (seeded) student."""
        conv = nn.Conv1d if self.dims == 1 else nn.Conv2d
        bn = nn.BatchNorm1d if self.dims == 1 else nn.BatchNorm2d
        pool = nn.MaxPool1d if self.dims == 1 else nn.MaxPool2d
        torch.manual_seed(seed)
        layers: list[nn.Module] = []
        cin = self.in_channels
        for i, c in enumerate(self.channels):
            layers += [conv(cin, c, self.kernel, padding=self.kernel // 2), bn(c), nn.ReLU()]
            if i >= len(self.channels) - self.n_down:
                layers.append(pool(2))  # (B, c, L/2) or (B, c, H/2, W/2)
            cin = c
        if self.head == "gap":
            layers += [(nn.AdaptiveAvgPool1d if self.dims == 1 else nn.AdaptiveAvgPool2d)(1),
                       nn.Flatten()]  # (B, C)
            feats = cin
        else:
            layers.append(nn.Flatten())  # (B, C * prod(spatial / 2**n_down))
            feats = cin * math.prod(s // 2 ** self.n_down for s in self.spatial)
        if self.hidden:
            layers += [nn.Linear(feats, self.hidden), nn.ReLU()]
            feats = self.hidden
        layers.append(nn.Linear(feats, self.num_classes))
        return nn.Sequential(*layers)

    def params(self) -> int:
        """Parameter count of :meth:`build` (computed, not estimated)."""
        return count_params(self.build())

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    def describe(self) -> str:
        """Short text, e.g. ``c8-16 k3 pool2 gap``."""
        hid = f" fc{self.hidden}" if self.hidden else ""
        return (f"c{'-'.join(map(str, self.channels))} k{self.kernel} pool{self.n_down} "
                f"{self.head}{hid}")


@dataclass
class NasResult:
    """What :func:`search_student` found.

    Attributes:
        best_student: the winning architecture, retrained on all the training data (eval mode).
        arch: its :class:`StudentArch`.
        params: its parameter count.
        val_metric: its validation accuracy during the search (held-out part of the train data).
        history: one dict per proposed candidate: ``number``, ``arch``, ``params``, ``latency_ms``,
            ``state`` (``trained``, ``rejected``, ``failed``), ``val_metric``, ``error``, ``seconds``.
        seconds: wall time of the whole search (retraining included).
    """

    best_student: nn.Module
    arch: StudentArch
    params: int
    val_metric: float
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class _Job:
    arch: StudentArch
    teacher: nn.Module
    fit: list[Batch]
    val: list[Batch]
    epochs: int
    seed: int
    threads: int


@contextmanager
def _threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _evaluate(job: _Job) -> dict[str, Any]:
    """Trial body (top level, so Ray can pickle it): distil a candidate, score it on validation."""
    with _threads(job.threads):
        student = train_student(job.arch, job.teacher, job.fit, epochs=job.epochs, seed=job.seed)
        outputs = collect_outputs(student, job.val)
    return {"val_metric": float(compute_metric("accuracy", outputs, job.val, None)),
            "state_dict": student.state_dict()}


def train_student(arch: StudentArch, teacher: nn.Module, data: Any, *, epochs: int, seed: int = 0,
                  recipe: dict[str, Any] | None = None) -> nn.Module:
    """Build ``arch`` (seeded) and distil ``teacher`` into it with :data:`KD_RECIPE`.

    Args:
        arch: the student architecture.
        teacher: the frozen teacher.
        data: training batches.
        epochs: passes over ``data``.
        seed: initialisation and batch-order seed.
        recipe: overrides of :data:`KD_RECIPE` (e.g. ``{"lr": 3e-3}``).

    Returns:
        The trained student in eval mode.

    Example:
        >>> t = nn.Sequential(nn.Flatten(), nn.Linear(8, 3))
        >>> arch = StudentArch(1, 1, 3, (4,), 3, 1, "gap", 0, (8,))
        >>> xs = [Batch((torch.randn(4, 1, 8),), torch.tensor([0, 1, 2, 0]))]
        >>> train_student(arch, t, xs, epochs=1)(xs[0].inputs[0]).shape
        torch.Size([4, 3])
    """
    from netpress.distill import distill

    student = arch.build(seed)
    config = {**KD_RECIPE, **(recipe or {}), "epochs": epochs, "seed": seed}
    student, _ = distill(student, teacher, data, config, task="classification")
    return student.eval()


def _family(teacher: nn.Module, example: Batch) -> dict[str, Any]:
    """Input dims / channels / size and class count of the teacher's task."""
    if not isinstance(example.inputs, tuple) or len(example.inputs) != 1:
        raise ModelError("nas teacher inputs", got="several or keyword inputs",
                         expected="one tensor input (B, C, L) or (B, C, H, W)",
                         fix="student NAS searches CNNs for 1-D signals or images")
    x = example.inputs[0]
    if x.dim() not in (3, 4):
        raise ModelError("nas teacher inputs", got=tuple(x.shape),
                         expected="(B, C, L) or (B, C, H, W)", fix="reshape the data to have channels")
    with torch.no_grad():
        was = teacher.training
        out = teacher.eval()(x[:2])
        teacher.train(was)
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise ModelError("nas teacher outputs", got=getattr(out, "shape", type(out).__name__),
                         expected="class logits (B, classes)",
                         fix="student NAS supports classification teachers")
    spatial = tuple(int(s) for s in x.shape[2:])
    return {"dims": x.dim() - 2, "in_channels": int(x.shape[1]), "num_classes": int(out.shape[1]),
            "spatial": spatial, "max_down": max(0, min(3, int(math.log2(min(spatial)))))}


def smallest_arch(family: dict[str, Any]) -> StudentArch:
    """The cheapest point of the space (2 blocks of 2 channels, k3, most pooling, gap head)."""
    return StudentArch(family["dims"], family["in_channels"], family["num_classes"],
                       (MIN_CHANNELS,) * 2, 3, family["max_down"], "gap", 0, family["spatial"])


@dataclass(frozen=True)
class _Shape:
    """A point of the search space before its width is fixed."""

    family: tuple[tuple[str, Any], ...]
    growth: tuple[float, ...]
    kernel: int
    n_down: int
    head: Literal["flatten", "gap"]
    hidden: float

    def at(self, base: int) -> StudentArch:
        """The architecture whose first block has ``base`` channels."""
        fam = dict(self.family)
        chans, c = [], float(base)
        for g in (1.0, *self.growth):
            c *= g
            chans.append(max(MIN_CHANNELS, round(c)))
        hidden = round(self.hidden * chans[-1])
        return StudentArch(fam["dims"], fam["in_channels"], fam["num_classes"], tuple(chans),
                           self.kernel, min(self.n_down, len(chans)), self.head, hidden,
                           fam["spatial"])


def _suggest(trial: Any, family: dict[str, Any]) -> _Shape:
    depth = trial.suggest_int("depth", 2, MAX_DEPTH)
    growth = tuple(trial.suggest_categorical(f"growth{i}", GROWTH) for i in range(1, depth))
    kernels = (3, 5, 7) if family["dims"] == 1 else (3, 5)
    kernel = trial.suggest_categorical("kernel", kernels)
    n_down = trial.suggest_int("n_down", min(1, family["max_down"]), family["max_down"])
    head = trial.suggest_categorical("head", ("flatten", "gap"))
    hidden = trial.suggest_categorical("hidden", HIDDEN)
    return _Shape(tuple(sorted(family.items())), growth, kernel, n_down, head, hidden)


def _fits(arch: StudentArch, budget: NasBudget, example: Batch) -> bool:
    if budget.max_params is not None and arch.params() > budget.max_params:
        return False
    return budget.max_latency_ms is None or _latency_ms(arch, example) <= budget.max_latency_ms


def _fill(shape: _Shape, budget: NasBudget, example: Batch) -> StudentArch | None:
    """The widest architecture of ``shape`` within ``budget`` (``None``: not even the narrowest)."""
    if not _fits(shape.at(1), budget, example):
        return None
    lo, hi = 1, 2  # invariant: at(lo) fits; parameters and latency grow with the width
    while hi <= MAX_BASE and _fits(shape.at(hi), budget, example):  # doubling: never times a
        lo, hi = hi, 2 * hi  # model far over a latency budget
    hi = min(hi, MAX_BASE + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if _fits(shape.at(mid), budget, example) else (lo, mid)
    return shape.at(lo)


def _latency_ms(arch: StudentArch, example: Batch) -> float:
    return latency_torch(arch.build(), example.slice(1), threads=1, warmup=3, runs=20,
                         max_seconds=2.0).median_ms


def _split(batches: list[Batch], val_fraction: float) -> tuple[list[Batch], list[Batch]]:
    if not 0 < val_fraction < 1:
        raise RecipeError("nas val_fraction", got=val_fraction, expected="a number in (0, 1)",
                          fix="use e.g. 0.2")
    n_val = max(1, round(len(batches) * val_fraction))
    if len(batches) - n_val < 1:
        raise DataError("nas training data", got=f"{len(batches)} batch(es)",
                        expected="at least 2 batches (fit + validation)",
                        fix="pass more training data (the validation part is held out of it)")
    return batches[:-n_val], batches[-n_val:]


def search_student(
    teacher: nn.Module, data: Any, budget: NasBudget, *, trials: int = 20, epochs: int = 5,
    final_epochs: int | None = 15, seed: int = 0, val_fraction: float = 0.2,
    workers: str | None = None, threads: int = 1,
) -> NasResult:
    """Search a distilled CNN student of ``teacher`` within ``budget`` (see the module doc).

    Args:
        teacher: a classification CNN whose input is ``(B, C, L)`` or ``(B, C, H, W)``.
        data: training data: a zoo ``DataBundle`` (its ``train`` split) or batches. Its last
            ``val_fraction`` of batches scores the candidates; the evaluation split is never used.
        budget: the :class:`NasBudget`.
        trials: candidates trained (rejected over-budget proposals do not count).
        epochs: distillation epochs per candidate.
        final_epochs: epochs of the winner's retraining on all of ``data``; ``None`` keeps the
            candidate trained on the fit part.
        seed: sampler, initialisation and batch-order seed.
        val_fraction: share of the training batches held out for validation.
        workers: :func:`netpress.search.workers.make_executor` spec (``None``: in-process).
        threads: torch threads while training a candidate (1: these students are tiny, and more
            threads spin against other processes on a shared machine).

    Returns:
        A :class:`NasResult`.

    Raises:
        ConstraintError: no architecture of the space meets the budget (names the smallest one),
            or every candidate failed.
        RecipeError: bad budget / arguments.
        DataError: too little data.
        ModelError: a teacher that is not a classification CNN on 1-D / 2-D inputs.
    """
    import optuna

    from netpress.search.workers import make_executor

    t_start = time.perf_counter()
    budget.check()
    if trials < 1 or epochs < 1:
        raise RecipeError("nas trials/epochs", got=(trials, epochs), expected="integers >= 1",
                          fix="use e.g. trials=20, epochs=5")
    batches = as_batches(getattr(data, "train", data), where="nas training data")
    fit, val = _split(batches, val_fraction)
    family = _family(teacher, batches[0])
    teacher = copy.deepcopy(teacher).eval()

    cheapest = smallest_arch(family)
    if budget.max_params is not None and cheapest.params() > budget.max_params:
        raise ConstraintError(
            "nas budget.max_params", got=budget.max_params,
            expected=f">= {cheapest.params()} (the smallest student, {cheapest.describe()})",
            fix="raise the parameter budget")
    if budget.max_latency_ms is not None:
        fastest = _latency_ms(cheapest, batches[0])
        if fastest > budget.max_latency_ms:
            raise ConstraintError(
                "nas budget.max_latency_ms", got=budget.max_latency_ms,
                expected=f">= {fastest:.3f} ms (the smallest student, torch, batch 1, 1 thread)",
                fix="raise the latency budget")

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(4, trials // 3))
    study = optuna.create_study(direction="maximize", sampler=sampler)
    history: list[dict[str, Any]] = []
    seen: dict[StudentArch, float | None] = {}
    best: tuple[float, StudentArch, dict[str, torch.Tensor]] | None = None
    max_asks, asks, trained = 50 * trials, 0, 0
    with make_executor(workers) as ex:
        while trained < trials and asks < max_asks:
            pending: list[tuple[Any, StudentArch, dict[str, Any]]] = []
            want = min(ex.parallelism, trials - trained)
            while len(pending) < want and asks < max_asks:
                asks += 1
                trial = study.ask()
                shape = _suggest(trial, family)
                arch = _fill(shape, budget, batches[0]) or shape.at(1)
                rec: dict[str, Any] = {"number": trial.number, "arch": arch.describe(),
                                       "params": arch.params(), "latency_ms": None, "state": "rejected",
                                       "val_metric": None, "error": None, "seconds": 0.0}
                reason = _reject(arch, rec, budget, batches[0])
                if reason is None and arch in seen:
                    reason = "duplicate"
                    if seen[arch] is not None:  # tell the sampler the known score again
                        study.tell(trial, seen[arch])
                        continue
                if reason is not None:
                    rec["error"] = reason
                    study.tell(trial, state=optuna.trial.TrialState.PRUNED)
                    if reason != "duplicate":
                        history.append(rec)
                    continue
                seen[arch] = None
                pending.append((trial, arch, rec))
            jobs = [_Job(arch, teacher, fit, val, epochs, seed, threads) for _, arch, _ in pending]
            for (trial, arch, rec), out in zip(pending, ex.map(_evaluate, jobs), strict=True):
                trained += 1
                rec["seconds"] = round(out.seconds, 2)
                if out.ok:
                    score = out.value["val_metric"]
                    rec.update(state="trained", val_metric=round(score, 4))
                    seen[arch] = score
                    study.tell(trial, score)
                    if best is None or score > best[0]:
                        best = (score, arch, out.value["state_dict"])
                else:
                    rec.update(state="failed", error=(out.error or "").splitlines()[0][:300])
                    study.tell(trial, state=optuna.trial.TrialState.FAIL)
                history.append(rec)
    if best is None:
        failed = [h["error"] for h in history if h["state"] == "failed"]
        raise ConstraintError(
            "nas search", got=f"{len(failed)} failed candidate(s); first: {failed[:1]}",
            expected="at least one candidate trained within the budget",
            fix="check the teacher and data (see the errors), or raise the budget")
    score, arch, state = best
    if final_epochs is None:  # keep the candidate as trained in the search (on the fit part)
        student = arch.build(seed)
        student.load_state_dict(state)
    else:
        with _threads(threads):
            student = train_student(arch, teacher, batches, epochs=final_epochs, seed=seed)
    student.eval()
    return NasResult(student, arch, arch.params(), score, history, time.perf_counter() - t_start)


def _reject(arch: StudentArch, rec: dict[str, Any], budget: NasBudget, example: Batch) -> str | None:
    """Why ``arch`` is not trained (``None``: it is); fills ``rec['latency_ms']``."""
    if arch.head == "flatten" and any(s // 2 ** arch.n_down < 1 for s in arch.spatial):
        return "pooled away the whole input"
    if budget.max_params is not None:
        if rec["params"] > budget.max_params:
            return f"params {rec['params']} > {budget.max_params}"
    if budget.max_latency_ms is not None:
        rec["latency_ms"] = round(_latency_ms(arch, example), 4)
        if rec["latency_ms"] > budget.max_latency_ms:
            return f"latency {rec['latency_ms']} ms > {budget.max_latency_ms} ms"
    return None


class NasConfig(TechniqueConfig):
    """``distill: {method: nas, ...}``: replace the model by a searched, distilled student.

    Attributes:
        max_params: parameter budget (absolute).
        max_params_ratio: parameter budget as a fraction of the teacher's (e.g. 0.2 = 5x fewer).
        max_latency_ms: torch eager latency budget (batch 1, one thread).
        teacher: ``original`` (the run's uncompressed model) or ``input`` (the stage's input).
        trials, epochs, final_epochs, seed, val_fraction, workers: see :func:`search_student`.
    """

    method: Literal["nas"] = "nas"
    max_params: int | None = Field(default=None, ge=1)
    max_params_ratio: float | None = Field(default=None, gt=0, le=1)
    max_latency_ms: float | None = Field(default=None, gt=0)
    teacher: Literal["original", "input"] = "input"
    trials: int = Field(default=20, ge=1, le=10_000)
    epochs: int = Field(default=5, ge=1, le=1000)
    final_epochs: int | None = Field(default=15, ge=1, le=10_000)
    seed: int = 0
    val_fraction: float = Field(default=0.2, gt=0, lt=1)
    workers: str | None = None

    @model_validator(mode="after")
    def _one_budget(self) -> NasConfig:
        if self.max_params is None and self.max_params_ratio is None and self.max_latency_ms is None:
            raise ValueError("set a budget: max_params, max_params_ratio or max_latency_ms")
        if self.max_params is not None and self.max_params_ratio is not None:
            raise ValueError("set max_params or max_params_ratio, not both")
        return self


@register("distill", "nas", NasConfig, summary="student NAS: width/depth/kernel search of a CNN "
          "student under a params/latency budget, each candidate distilled from the teacher")
def nas_stage(model: nn.Module, config: TechniqueConfig, ctx: StageContext) -> nn.Module:
    """Registered handler: search a student of the stage's teacher and return it."""
    assert isinstance(config, NasConfig)
    advanced = ctx.advanced if isinstance(ctx.advanced, dict) else {}
    data = advanced.get("train") or ctx.data
    if not data:
        raise DataError("distill nas stage", got="no training data", expected="training batches",
                        fix="use a zoo data set with a train split, or pass data")
    teacher = ctx.original if config.teacher == "original" and ctx.original is not None else model
    max_params = config.max_params
    if config.max_params_ratio is not None:
        max_params = max(1, int(count_params(teacher) * config.max_params_ratio))
    budget = NasBudget(max_params=max_params, max_latency_ms=config.max_latency_ms)
    res = search_student(teacher, data, budget, trials=config.trials, epochs=config.epochs,
                         final_epochs=config.final_epochs, seed=config.seed,
                         val_fraction=config.val_fraction, workers=config.workers)
    ctx.report.update(nas_arch=res.arch.to_dict(), nas_params=res.params,
                      nas_val_metric=round(res.val_metric, 4), nas_trials=res.history)
    return res.best_student
