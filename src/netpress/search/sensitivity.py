"""Per-layer sensitivity analysis (SPEC A1): metric vs sparsity, bits and rank, one layer at a time.

For every targeted layer (default: every ``Conv2d``, ``Conv1d`` and ``Linear``), alone, the weight is
perturbed and the model is run on the **calibration** split (never the evaluation split):

* ``sparsity P``: the fraction P of the layer's smallest-magnitude weights set to zero;
* ``int B``: weights rounded to B bits (symmetric, per output channel), activations float;
* ``w8a8``: int8 per-channel weights *and* the layer's input fake-quantized to 8 bits per tensor
  (range: the 0.01 / 99.99 percentiles seen on the calibration split): what static PTQ does to it;
* ``rank R``: the weight, reshaped to (out, in·k·k), replaced by its best rank ``ceil(R·min(out, in·k·k))``
  approximation (truncated SVD).

**Screening** (``screen: K``, what the planner uses on big models): every layer is first measured as
above on only the first ``screen_examples`` examples (a coarse pass); then only the K layers with the
largest coarse score per setting are measured on all ``max_examples``. The others keep their coarse
values in ``extra["coarse"]``, have no full value (``None``) and rank after the measured ones, by
coarse score. On MobileNetV2 (53 layers, 16 examples, K = 8, 2 screening examples) that is 3.6x fewer
image forwards. (A one-pass *local* proxy, the relative error of each layer's own output, was tried
and rejected: on MobileNetV2 it ranks late layers first, while end to end the early depthwise /
projection layers of blocks 1-2 are the sensitive ones.)

Recorded per layer and setting: the metric drop in points (accuracy when the batches carry labels,
else top-1 agreement with the unperturbed model) and the loss increase (cross-entropy, or KL to the
unperturbed outputs). ``score = drop + 100 * loss_increase`` orders layers (the loss term breaks ties
on a small calibration set). Results are cached as JSON under ``<netpress cache>/sensitivity/`` keyed
by a hash of the model's tensors and structure, the calibration inputs and the config.

Example:
    >>> import torch, torch.nn as nn
    >>> from netpress.core.data import Batch
    >>> from netpress.search.sensitivity import SensitivityConfig, analyze
    >>> m = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    >>> data = [Batch((torch.randn(32, 8),))]
    >>> table = analyze(m, data, SensitivityConfig(sparsity=[0.5], bits=[2], ranks=[]), cache=False)
    >>> table.layers, table.columns
    (['0', '2'], ['sparsity 0.5', 'int2', 'w8a8'])
    >>> len(table.ranking("w8a8"))
    2
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from pydantic import BaseModel, ConfigDict, Field

from netpress.core.data import Batch, take_examples
from netpress.core.errors import DataError, RecipeError
from netpress.quantize.mixed import score_classifier

VERSION = 2


class SensitivityConfig(BaseModel):
    """What the analysis measures (the ``plan.sensitivity`` block of a recipe).

    Attributes:
        sparsity: fractions of each layer's weights zeroed (magnitude), each in (0, 1).
        bits: weight-only widths (2..8).
        w8a8: also measure int8 weights + 8-bit input activations (static PTQ's effect).
        ranks: kept fraction of the full rank, each in (0, 1).
        max_examples: calibration examples used (the first ones).
        screen: measure on all ``max_examples`` only the K layers of largest coarse score per
            setting (see the module doc); None measures every layer on all of them.
        screen_examples: examples of the coarse screening pass.
        targets, ignore: module patterns (see :mod:`netpress.core.targeting`).
    """

    model_config = ConfigDict(extra="forbid")

    sparsity: list[float] = Field(default_factory=lambda: [0.5, 0.8])
    bits: list[int] = Field(default_factory=lambda: [4])
    w8a8: bool = True
    ranks: list[float] = Field(default_factory=lambda: [0.25])
    max_examples: int = Field(default=64, ge=1, le=100_000)
    screen: int | None = Field(default=None, ge=1, le=100_000)
    screen_examples: int = Field(default=2, ge=1, le=100_000)
    targets: list[str] | None = None
    ignore: list[str] = Field(default_factory=list)

    def columns(self) -> list[str]:
        cols = [f"sparsity {p:g}" for p in self.sparsity] + [f"int{b}" for b in self.bits]
        cols += ["w8a8"] if self.w8a8 else []
        return cols + [f"rank {r:g}" for r in self.ranks]


@dataclass
class SensitivityTable:
    """The analysis result: per layer and setting, ``drop`` (points) and ``loss`` increase."""

    layers: list[str]
    columns: list[str]
    params: dict[str, int]
    drop: dict[str, dict[str, float]]
    loss: dict[str, dict[str, float]]
    base_metric: float
    data: str
    key: str = ""
    cached: bool = False
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def measured(self, layer: str) -> bool:
        """Whether ``layer`` was measured on all examples (always, unless screened out)."""
        return all(self.drop[layer].get(c) is not None for c in self.columns)

    def score(self, layer: str, column: str) -> float:
        """``drop + 100 * loss_increase`` (bigger = more sensitive); NaN if screened out."""
        d, lo = self.drop[layer].get(column), self.loss[layer].get(column)
        if d is None or lo is None:
            return float("nan")
        return d + 100.0 * lo

    def ranking(self, column: str | None = None) -> list[str]:
        """Layers, most sensitive first, for one column (default: the sum over all columns).

        Layers screened out (measured on the screening examples only) come last, by that score.

        Raises:
            RecipeError: unknown column.
        """
        if column is not None and column not in self.columns:
            raise RecipeError("sensitivity column", got=column,
                              expected=f"one of {', '.join(self.columns)}",
                              fix="measure it (plan.sensitivity) or pick a measured column")
        cols = [column] if column else self.columns
        coarse = self.extra.get("coarse", {})

        def key(n: str) -> tuple:
            if self.measured(n):
                return (0, -sum(self.score(n, c) for c in cols), n)
            return (1, -sum(coarse.get(n, {}).get(c, 0.0) for c in cols), n)
        return sorted(self.layers, key=key)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SensitivityTable:
        return cls(**data)


# ------------------------------------------------------------------------------------ scoring
def _sparsify(w: torch.Tensor, p: float) -> torch.Tensor:
    k = int(round(p * w.numel()))
    if k <= 0:
        return w
    thresh = w.abs().flatten().kthvalue(k).values
    return torch.where(w.abs() <= thresh, torch.zeros_like(w), w)


def _round_bits(w: torch.Tensor, bits: int) -> torch.Tensor:
    qmax = 2 ** (bits - 1) - 1
    flat = w.reshape(w.shape[0], -1)  # (out, in·k·k)
    scale = flat.abs().amax(1, keepdim=True).clamp_min(1e-12) / qmax
    return (torch.clamp(torch.round(flat / scale), -qmax, qmax) * scale).reshape(w.shape)


def _low_rank(w: torch.Tensor, frac: float) -> torch.Tensor:
    flat = w.reshape(w.shape[0], -1)  # (out, in·k·k)
    k = max(1, math.ceil(frac * min(flat.shape)))
    u, s, vh = torch.linalg.svd(flat, full_matrices=False)
    return ((u[:, :k] * s[:k]) @ vh[:k]).reshape(w.shape)


def _act_ranges(model: nn.Module, layers: list[tuple[str, nn.Module]],
                batches: list[Batch]) -> dict[str, tuple[float, float]]:
    """0.01 / 99.99 percentile of each layer's input over the batches (a 200k-value sample each)."""
    lo: dict[str, float] = {}
    hi: dict[str, float] = {}
    gen = torch.Generator().manual_seed(0)

    def hook(name: str):
        def fn(_m: nn.Module, args: tuple) -> None:
            x = args[0].detach().float().flatten()
            if x.numel() > 200_000:
                x = x[torch.randint(0, x.numel(), (200_000,), generator=gen)]
            a, b = torch.quantile(x, torch.tensor([1e-4, 1 - 1e-4])).tolist()
            lo[name], hi[name] = min(lo.get(name, a), a), max(hi.get(name, b), b)
        return fn

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in layers]
    try:
        with torch.inference_mode():
            for b in batches:
                b.run(model)
    finally:
        for h in handles:
            h.remove()
    return {n: (lo[n], hi[n]) for n, _ in layers if n in lo}


def _fake_quant_input(lo: float, hi: float):
    """A pre-hook quantizing the input to 8 bits per tensor (uint8 if non-negative, else int8)."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = max(hi - lo, 1e-8) / 255.0
    zero = round(-lo / scale)

    def fn(_m: nn.Module, args: tuple) -> tuple:
        x = args[0]
        q = torch.clamp(torch.round(x / scale) + zero, 0, 255)
        return ((q - zero) * scale, *args[1:])
    return fn


# --------------------------------------------------------------------------------------- cache
def _hash_model(model: nn.Module, h: Any) -> None:
    h.update(repr(model).encode())
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())


def cache_key(model: nn.Module, batches: list[Batch], config: SensitivityConfig) -> str:
    """SHA-256 over the model's structure and tensors, the calibration inputs and the config.

    Example:
        >>> import torch.nn as nn
        >>> len(cache_key(nn.Linear(2, 2), [], SensitivityConfig()))
        64
    """
    h = hashlib.sha256(f"v{VERSION}".encode())
    _hash_model(model, h)
    for b in batches:
        tensors = b.inputs.values() if isinstance(b.inputs, dict) else b.inputs
        for t in tensors:
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
        if b.target is not None:
            h.update(b.target.detach().cpu().contiguous().numpy().tobytes())
    h.update(json.dumps(config.model_dump(), sort_keys=True).encode())
    return h.hexdigest()


def cache_file(key: str) -> Path:
    """``<netpress cache dir>/sensitivity/<key>.json`` (``$NETPRESS_CACHE`` overrides the root)."""
    from netpress.zoo.trained import cache_dir

    return cache_dir() / "sensitivity" / f"{key[:32]}.json"


# ------------------------------------------------------------------------------------ analysis
def analyze(model: nn.Module, batches: list[Batch], config: SensitivityConfig | None = None,
            cache: bool = True) -> SensitivityTable:
    """Measure each layer's sensitivity on ``batches`` (the calibration split).

    Args:
        model: the float model (left unchanged: every perturbation is undone).
        batches: calibration batches; the first ``config.max_examples`` examples are used.
        config: what to measure (default :class:`SensitivityConfig`).
        cache: read / write the JSON cache.

    Returns:
        A :class:`SensitivityTable`.

    Raises:
        DataError: no calibration batches. RecipeError: no layer to analyse.

    Example:
        >>> import torch, torch.nn as nn
        >>> m = nn.Sequential(nn.Linear(4, 4)).eval()
        >>> t = analyze(m, [Batch((torch.randn(8, 4),))], SensitivityConfig(bits=[], sparsity=[0.9],
        ...             w8a8=False, ranks=[]), cache=False)
        >>> t.drop["0"]["sparsity 0.9"] >= 0
        True
    """
    import time

    from netpress.core.targeting import select

    config = config or SensitivityConfig()
    if not batches:
        raise DataError("sensitivity analysis data", got="no batches",
                        expected="calibration batches (the evaluation split is never used)",
                        fix="give the recipe `data:` (e.g. zoo:photos)")
    batches = take_examples(list(batches), config.max_examples)
    layers = [(n, m) for n, m in select(model, config.targets, config.ignore,
                                        where="plan.sensitivity.targets")
              if isinstance(getattr(m, "weight", None), torch.Tensor)]
    if not layers:
        raise RecipeError("plan.sensitivity.targets", got=config.targets,
                          expected="patterns matching at least one Conv/Linear layer",
                          fix="drop `targets` to analyse every Conv2d/Conv1d/Linear layer")
    key = cache_key(model, batches, config)
    path = cache_file(key)
    if cache and path.is_file():
        try:
            table = SensitivityTable.from_dict(json.loads(path.read_text()))
            table.cached = True
            return table
        except (ValueError, TypeError, OSError):
            pass  # unreadable cache: measure again and overwrite it
    start = time.perf_counter()
    was = model.training
    model.eval()
    ranges = _act_ranges(model, layers, batches) if config.w8a8 else {}
    from netpress.core.progress import track

    def settings_of(name: str, module: nn.Module) -> list[tuple[str, torch.Tensor, Any]]:
        original = module.weight.detach()
        out: list[tuple[str, torch.Tensor, Any]] = []
        out += [(f"sparsity {p:g}", _sparsify(original, p), None) for p in config.sparsity]
        out += [(f"int{b}", _round_bits(original, b), None) for b in config.bits]
        if config.w8a8 and name in ranges:
            out.append(("w8a8", _round_bits(original, 8), _fake_quant_input(*ranges[name])))
        out += [(f"rank {r:g}", _low_rank(original, r), None) for r in config.ranks]
        return out

    def measure(subset: list[tuple[str, nn.Module]], data: list[Batch], what: str
                ) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]], float]:
        with torch.inference_mode():
            ref_out = [b.run(model).float() for b in data]
        base_m, base_l = score_classifier(model, data, ref_out)
        drops: dict[str, dict[str, float]] = {}
        losses: dict[str, dict[str, float]] = {}
        for name, module in track(subset, what):
            original = module.weight.detach().clone()
            drops[name], losses[name] = {}, {}
            for col, weight, pre_hook in settings_of(name, module):
                handle = module.register_forward_pre_hook(pre_hook) if pre_hook else None
                try:
                    with torch.no_grad():
                        module.weight.copy_(weight)
                    metric, value = score_classifier(model, data, ref_out)
                finally:
                    if handle is not None:
                        handle.remove()
                    with torch.no_grad():
                        module.weight.copy_(original)
                drops[name][col] = round(base_m - metric, 4)
                losses[name][col] = round(value - base_l, 6)
        return drops, losses, base_m

    extra: dict[str, Any] = {}
    chosen = {n for n, _ in layers}
    n_all = sum(b.size for b in batches)
    if config.screen is not None and config.screen < len(layers) \
            and config.screen_examples < n_all:
        few = take_examples(batches, config.screen_examples)
        c_drop, c_loss, _ = measure(layers, few, "sensitivity screening")
        cols = config.columns()
        chosen = {n for n, _ in layers if len(c_drop[n]) < len(cols)}  # a setting not measured
        for col in cols:
            order = sorted((n for n, _ in layers if col in c_drop[n]),
                           key=lambda n: -(c_drop[n][col] + 100.0 * c_loss[n][col]))
            chosen.update(order[:config.screen])
        extra = {"coarse": {n: {c: round(c_drop[n][c] + 100.0 * c_loss[n][c], 6)
                                for c in c_drop[n]} for n in c_drop},
                 "screened": sorted(chosen), "screen": config.screen,
                 "screen_examples": sum(b.size for b in few)}
    drop, loss, base_metric = measure([(n, m) for n, m in layers if n in chosen], batches,
                                      "per-layer sensitivity")
    model.train(was)
    for name, _ in layers:  # screened out: no end-to-end value
        if name not in drop:
            drop[name] = dict.fromkeys(config.columns())
            loss[name] = dict.fromkeys(config.columns())
    n_examples = sum(b.size for b in batches)
    screened = (f"; {len(chosen)} of {len(layers)} layers measured on all of them (screen "
                f"{config.screen}: largest score per setting on the first "
                f"{extra['screen_examples']} examples)" if extra else "")
    table = SensitivityTable(
        layers=[n for n, _ in layers], columns=config.columns(),
        params={n: int(m.weight.numel()) for n, m in layers}, drop=drop, loss=loss,
        base_metric=round(base_metric, 4),
        data=f"calibration split, {n_examples} examples{screened}", key=key,
        seconds=round(time.perf_counter() - start, 2), extra=extra)
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(table.to_dict()))
        tmp.replace(path)
    return table


def heatmap_png(table: SensitivityTable) -> bytes:
    """Heat map (layers × settings) of ``log10(1 + score)``, PNG bytes.

    Example:
        >>> t = SensitivityTable(["a"], ["w8a8"], {"a": 4}, {"a": {"w8a8": 1.0}},
        ...                      {"a": {"w8a8": 0.01}}, 90.0, "calibration")
        >>> heatmap_png(t)[:4] == b"\\x89PNG"
        True
    """
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    values = np.array([[math.log10(1 + max(table.score(n, c), 0.0))
                        if table.measured(n) else np.nan for c in table.columns]
                       for n in table.layers])  # (layers, settings); NaN (blank): screened out
    height = max(2.5, 0.18 * len(table.layers) + 1.5)
    fig, ax = plt.subplots(figsize=(1.2 * len(table.columns) + 3.5, height))
    im = ax.imshow(values, aspect="auto", cmap="magma_r")
    ax.set_xticks(range(len(table.columns)), table.columns, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(table.layers)), table.layers, fontsize=6)
    ax.set_title(f"per-layer sensitivity ({table.data})", fontsize=9)
    fig.colorbar(im, ax=ax, label="log10(1 + drop pts + 100·loss increase)")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


__all__ = ["SensitivityConfig", "SensitivityTable", "analyze", "cache_key", "cache_file",
           "heatmap_png"]
