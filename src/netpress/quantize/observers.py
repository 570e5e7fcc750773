"""Range calibration observers (SPEC Q2): min-max, moving-average min-max, percentile, entropy (KL)
and MSE-optimal.

An observer watches the values of one tensor (an activation over calibration batches, or a
weight once) and turns them into a clipping range ``[lo, hi]`` and then into the uniform affine
parameters of :mod:`netpress.quantize.qscheme`::

    scale = (hi - lo) / (qmax - qmin),   zero_point = round(qmin - lo / scale)   # asymmetric
    scale = max(|lo|, |hi|) / qmax,      zero_point = 0                          # symmetric

Histograms see an evenly strided sample of at most 2^18 values per batch (the extremes are
exact), which keeps calibration of a CNN on 256 images within seconds. The range always
contains 0 so that zero (padding, ReLU outputs) is exact.

* ``minmax``: the extremes seen over all batches;
* ``moving_average``: ``lo ← lo + c·(min(x) - lo)`` per batch (c = 0.01 in torch.ao, default
  here 0.1 because calibration sets are small);
* ``percentile``: the p-th / (100 - p)-th percentiles of a running histogram (default p = 99.99);
* ``entropy``: the TensorRT-style KL calibration: the clip threshold whose 2^bits-level
  re-quantization of the histogram minimises ``KL(P ‖ Q)``;
* ``mse``: the range (shrunk from min/max by a factor searched on a grid) that minimises the
  expected squared quantization error (clipping + rounding) over the histogram.

Per-channel ranges (weights, axis 0) are supported by ``minmax`` and ``mse``; the histogram
observers are per tensor (activations).

Example:
    >>> import torch
    >>> from netpress.quantize.observers import make_observer
    >>> obs = make_observer("minmax", bits=8, symmetric=False)
    >>> obs.update(torch.tensor([-1.0, 0.0, 3.0]))
    >>> scale, zp = obs.qparams()
    >>> round(float(scale), 5), int(zp)
    (0.01569, -64)
"""

from __future__ import annotations

import math

import torch

from netpress.core.errors import DataError, RecipeError

OBSERVERS = ("minmax", "moving_average", "percentile", "entropy", "mse")
_BINS = 2048
_SAMPLE = 1 << 18  # values per batch that enter a histogram


class Observer:
    """Base observer: collects a range, gives ``(scale, zero_point)``.

    Args:
        bits: code width 2..16.
        symmetric: ``zero_point = 0`` and a range symmetric around 0.
        signed: signed codes (``[-2^(b-1), 2^(b-1)-1]``) or unsigned (``[0, 2^b - 1]``). ``None``
            (default) picks unsigned when the observed range is non-negative (ReLU outputs), else
            signed.
        where: the layer / tensor name used in errors.
        axis: ``None`` per tensor, else per channel along ``axis`` (minmax / mse only).

    Raises:
        RecipeError: bits out of range.
    """

    name = "base"

    def __init__(self, bits: int = 8, symmetric: bool = False, signed: bool | None = None,
                 where: str = "tensor", axis: int | None = None) -> None:
        if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 16:
            raise RecipeError(f"{where} observer bits", got=bits, expected="an integer in 2..16",
                              fix="use bits: 8")
        self.bits, self.symmetric, self.signed, self.where, self.axis = (
            bits, symmetric, signed, where, axis)
        self.lo: torch.Tensor | None = None
        self.hi: torch.Tensor | None = None
        self.count = 0
        self._seen = (0.0, 0.0)

    # ----------------------------------------------------------------------------- collection
    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        x = x.detach().to(torch.float32)
        if self.axis is None:
            return x.reshape(1, -1)  # (1, N)
        return x.movedim(self.axis, 0).reshape(x.shape[self.axis], -1)  # (C, K)

    def update(self, x: torch.Tensor) -> None:
        """Observe one batch of values.

        Raises:
            DataError: ``x`` holds NaN/Inf or is empty.
        """
        if x.numel() == 0:
            raise DataError(self.where, got="an empty tensor", expected="values to observe",
                            fix="check the calibration batches (non-empty inputs)")
        lo, hi = torch.aminmax(x.detach().float())  # NaN propagates; one pass, no mask
        if not (math.isfinite(float(lo)) and math.isfinite(float(hi))):
            bad = int((~torch.isfinite(x)).sum())
            raise DataError(self.where, got=f"{bad} NaN/Inf values in calibration activations "
                            f"of shape {tuple(x.shape)}", expected="finite activations",
                            fix="clean the calibration data (normalise inputs, drop corrupt "
                            "examples) or add this layer to `ignore`")
        rows = self._rows(x)
        self._seen = (float(lo), float(hi))  # the extremes of this batch (one pass over x)
        self._observe(rows)
        self.count += 1

    def _observe(self, rows: torch.Tensor) -> None:
        if rows.shape[0] == 1:
            lo, hi = (torch.tensor([v]) for v in self._seen)
        else:
            lo, hi = rows.amin(dim=1), rows.amax(dim=1)  # (R,)
        if self.lo is None or self.hi is None:
            self.lo, self.hi = lo, hi
        else:
            self.lo, self.hi = torch.minimum(self.lo, lo), torch.maximum(self.hi, hi)

    # ------------------------------------------------------------------------------- results
    def _check_seen(self) -> None:
        if self.count == 0:
            raise DataError(self.where, got="no calibration batches", expected="at least one",
                            fix="pass calibration data (e.g. data: zoo:photos) to the ptq stage")

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The clipping range ``(lo, hi)``; per tensor ``()``, per channel ``(C,)``."""
        self._check_seen()
        assert self.lo is not None and self.hi is not None
        return self.lo.squeeze(0) if self.axis is None else self.lo, (
            self.hi.squeeze(0) if self.axis is None else self.hi)

    def is_signed(self) -> bool:
        """Whether codes are signed (explicit, or because the data went below 0)."""
        if self.signed is not None:
            return self.signed
        lo, _ = self.range()
        return self.symmetric or bool((lo < 0).any())

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scale, zero_point)`` (float32, int32) from :meth:`range`."""
        lo, hi = self.range()
        return range_to_qparams(lo, hi, self.bits, self.symmetric, self.is_signed())

    def qrange(self) -> tuple[int, int]:
        """``(qmin, qmax)`` of the codes."""
        return code_range(self.bits, self.symmetric, self.is_signed())


def code_range(bits: int, symmetric: bool, signed: bool) -> tuple[int, int]:
    """``(qmin, qmax)``: signed symmetric uses the restricted range ``±(2^(b-1) - 1)``."""
    if not signed:
        return 0, (1 << bits) - 1
    half = 1 << (bits - 1)
    return (-(half - 1) if symmetric else -half), half - 1


def range_to_qparams(lo: torch.Tensor, hi: torch.Tensor, bits: int, symmetric: bool,
                     signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point for the range ``[lo, hi]`` (widened to contain 0).

    Example:
        >>> s, z = range_to_qparams(torch.tensor(0.0), torch.tensor(6.0), 8, False, False)
        >>> round(float(s), 6), int(z)
        (0.023529, 0)
    """
    qmin, qmax = code_range(bits, symmetric, signed)
    lo, hi = torch.clamp(lo.float(), max=0.0), torch.clamp(hi.float(), min=0.0)
    if symmetric:
        if signed:
            scale = torch.maximum(-lo, hi) / qmax
        else:
            scale = hi / qmax
        zp = torch.zeros_like(scale, dtype=torch.int32)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        return scale, zp
    scale = (hi - lo) / (qmax - qmin)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zp = torch.round(qmin - lo / scale).clamp(qmin, qmax).to(torch.int32)
    return scale, zp


class MinMaxObserver(Observer):
    """The extremes over every batch (per tensor or per channel)."""

    name = "minmax"


class MovingAverageMinMaxObserver(Observer):
    """Exponential moving average of each batch's min and max (``momentum`` = weight of a batch)."""

    name = "moving_average"

    def __init__(self, *args, momentum: float = 0.1, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self.momentum = momentum

    def _observe(self, rows: torch.Tensor) -> None:
        lo, hi = rows.amin(dim=1), rows.amax(dim=1)
        if self.lo is None or self.hi is None:
            self.lo, self.hi = lo, hi
        else:
            c = self.momentum
            self.lo, self.hi = self.lo + c * (lo - self.lo), self.hi + c * (hi - self.hi)


class _HistogramObserver(Observer):
    """A running histogram of the values (per tensor), re-binned when the range grows."""

    def __init__(self, *args, bins: int = _BINS, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        if self.axis is not None:
            raise RecipeError(f"{self.where} observer {self.name}", got="a per-channel axis",
                              expected="a per-tensor observer",
                              fix="use minmax or mse for per-channel ranges")
        self.bins = bins
        self.hist: torch.Tensor | None = None  # (bins,) float64 counts over [lo, hi]

    def _observe(self, rows: torch.Tensor) -> None:
        x = rows.reshape(-1)
        lo, hi = self._seen  # from update(): no second pass over the values
        if x.numel() > _SAMPLE:  # the histogram of an evenly strided sample (extremes are exact)
            x = x[:: x.numel() // _SAMPLE]
        if self.hist is None or self.lo is None or self.hi is None:
            lo, hi = min(lo, 0.0), max(hi, 0.0)
            if hi == lo:
                hi = lo + 1e-8
            self.lo, self.hi = torch.tensor([lo]), torch.tensor([hi])
            self.hist = torch.histc(x, self.bins, lo, hi).double()
            return
        old_lo, old_hi = float(self.lo), float(self.hi)
        new_lo, new_hi = min(lo, old_lo), max(hi, old_hi)
        if new_lo < old_lo or new_hi > old_hi:
            # move the old counts onto the wider grid by their bin centres
            width = (old_hi - old_lo) / self.bins
            centres = old_lo + (torch.arange(self.bins, dtype=torch.float64) + 0.5) * width
            idx = ((centres - new_lo) / (new_hi - new_lo) * self.bins).long().clamp(0, self.bins - 1)
            hist = torch.zeros(self.bins, dtype=torch.float64)
            hist.index_add_(0, idx, self.hist)
            self.hist = hist
            self.lo, self.hi = torch.tensor([new_lo]), torch.tensor([new_hi])
        self.hist += torch.histc(x, self.bins, float(self.lo), float(self.hi)).double()

    def _grid(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Bin centres ``(bins,)`` and counts ``(bins,)``."""
        assert self.hist is not None and self.lo is not None and self.hi is not None
        lo, hi = float(self.lo), float(self.hi)
        width = (hi - lo) / self.bins
        centres = lo + (torch.arange(self.bins, dtype=torch.float64) + 0.5) * width
        return centres, self.hist

    def _clip(self) -> tuple[float, float]:
        raise NotImplementedError

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        self._check_seen()
        lo, hi = self._clip()
        return torch.tensor(min(lo, 0.0)), torch.tensor(max(hi, 0.0))

    def is_signed(self) -> bool:
        if self.signed is not None:
            return self.signed
        return self.symmetric or float(self.lo) < 0  # type: ignore[arg-type]


class PercentileObserver(_HistogramObserver):
    """The ``(100 - p)``-th and ``p``-th percentiles of the running histogram."""

    name = "percentile"

    def __init__(self, *args, percentile: float = 99.99, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        if not 50.0 < percentile <= 100.0:
            raise RecipeError(f"{self.where} percentile", got=percentile,
                              expected="a number in (50, 100]", fix="use e.g. 99.99")
        self.percentile = percentile

    def _clip(self) -> tuple[float, float]:
        centres, counts = self._grid()
        cdf = torch.cumsum(counts, 0) / counts.sum()  # (bins,)
        q = self.percentile / 100.0
        hi_i = int(torch.searchsorted(cdf, torch.tensor([q], dtype=torch.float64)).clamp(
            max=self.bins - 1))
        lo_i = int(torch.searchsorted(cdf, torch.tensor([1.0 - q], dtype=torch.float64)).clamp(
            max=self.bins - 1))
        width = float(centres[1] - centres[0]) if self.bins > 1 else 0.0
        lo = float(self.lo) if float(self.lo) >= 0 else float(centres[lo_i]) - width / 2  # type: ignore[arg-type]
        return lo, float(centres[hi_i]) + width / 2


class MSEObserver(_HistogramObserver):
    """The range ``α·[lo, hi]`` (α on a grid in [0.3, 1]) minimising the expected squared error.

    Per channel (``axis`` set), the search runs on the values themselves (weights).
    """

    name = "mse"

    def __init__(self, *args, grid: int = 80, **kwargs) -> None:  # type: ignore[no-untyped-def]
        axis = kwargs.get("axis")
        if axis is not None:  # per channel: keep the raw rows, no histogram
            Observer.__init__(self, *args, **kwargs)
            self.bins, self.hist = _BINS, None
            self._rows_seen: list[torch.Tensor] = []
        else:
            super().__init__(*args, **kwargs)
        self.grid = grid

    def _observe(self, rows: torch.Tensor) -> None:
        if self.axis is not None:
            Observer._observe(self, rows)
            self._rows_seen.append(rows)
        else:
            super()._observe(rows)

    def _alphas(self) -> torch.Tensor:
        return torch.linspace(0.3, 1.0, self.grid, dtype=torch.float64)  # (A,)

    def _errors(self, values: torch.Tensor, weights: torch.Tensor, lo: torch.Tensor,
                hi: torch.Tensor) -> torch.Tensor:
        """Weighted squared error per (candidate, row): values (R, K), lo/hi (A, R)."""
        signed = self.is_signed()
        qmin, qmax = code_range(self.bits, self.symmetric, signed)
        scale, zp = range_to_qparams(lo, hi, self.bits, self.symmetric, signed)  # (A, R)
        s, z = scale.double().unsqueeze(-1), zp.double().unsqueeze(-1)  # (A, R, 1)
        v = values.unsqueeze(0)  # (1, R, K)
        q = torch.clamp(torch.round(v / s) + z, qmin, qmax)
        err = ((q - z) * s - v) ** 2  # (A, R, K)
        return (err * weights.unsqueeze(0)).sum(-1)  # (A, R)

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        self._check_seen()
        alphas = self._alphas()
        if self.axis is not None:
            rows = torch.cat(self._rows_seen, dim=1).double()  # (C, K)
            lo0, hi0 = rows.amin(1).clamp(max=0), rows.amax(1).clamp(min=0)  # (C,)
            lo, hi = alphas[:, None] * lo0, alphas[:, None] * hi0  # (A, C)
            err = self._errors(rows, torch.ones_like(rows), lo, hi)  # (A, C)
            best = err.argmin(0)  # (C,)
            idx = torch.arange(rows.shape[0])
            return lo[best, idx].float(), hi[best, idx].float()
        centres, counts = self._grid()
        lo0, hi0 = min(float(self.lo), 0.0), max(float(self.hi), 0.0)  # type: ignore[arg-type]
        lo = (alphas * lo0).unsqueeze(1)  # (A, 1)
        hi = (alphas * hi0).unsqueeze(1)
        err = self._errors(centres.unsqueeze(0), counts.unsqueeze(0), lo, hi)[:, 0]  # (A,)
        best = int(err.argmin())
        return lo[best, 0].float(), hi[best, 0].float()

    def is_signed(self) -> bool:
        if self.signed is not None:
            return self.signed
        if self.axis is not None:
            return self.symmetric or bool((self.lo < 0).any())  # type: ignore[operator]
        return super().is_signed()


class EntropyObserver(_HistogramObserver):
    """TensorRT-style KL calibration on the histogram of ``|x|`` (the threshold is symmetric
    for signed data, ``[0, t]`` for non-negative data)."""

    name = "entropy"

    def _clip(self) -> tuple[float, float]:
        centres, counts = self._grid()
        signed = self.is_signed()
        # histogram of |x| on [0, max|x|] with `bins` bins
        amax = max(abs(float(self.lo)), abs(float(self.hi)))  # type: ignore[arg-type]
        idx = (centres.abs() / amax * self.bins).long().clamp(0, self.bins - 1)
        hist = torch.zeros(self.bins, dtype=torch.float64)
        hist.index_add_(0, idx, counts)
        levels = (1 << (self.bits - 1)) if signed else (1 << self.bits)
        levels = min(levels, self.bins)
        best_kl, best_i = math.inf, self.bins
        step = max(1, (self.bins - levels) // 64)
        for i in range(levels, self.bins + 1, step):
            p = hist[:i].clone()
            p[-1] += hist[i:].sum()  # outliers clipped onto the last bin
            # merge the i bins into `levels` groups, spread each group's mass over its non-empty bins
            group = torch.div(torch.arange(i) * levels, i, rounding_mode="floor")  # (i,)
            nz = (hist[:i] > 0).double()
            mass = torch.zeros(levels, dtype=torch.float64).index_add_(0, group, hist[:i])
            nnz = torch.zeros(levels, dtype=torch.float64).index_add_(0, group, nz)
            q = torch.where(nz > 0, mass[group] / nnz[group].clamp(min=1), torch.zeros_like(p))
            ps, qs = p.sum(), q.sum()
            if ps <= 0 or qs <= 0:
                continue
            pn, qn = p / ps, q / qs
            mask = pn > 0
            kl = float((pn[mask] * torch.log(pn[mask] / qn[mask].clamp(min=1e-12))).sum())
            if kl < best_kl:
                best_kl, best_i = kl, i
        t = (best_i / self.bins) * amax
        return (-t if signed else 0.0), t


_CLASSES: dict[str, type[Observer]] = {
    "minmax": MinMaxObserver,
    "moving_average": MovingAverageMinMaxObserver,
    "percentile": PercentileObserver,
    "entropy": EntropyObserver,
    "mse": MSEObserver,
}


def make_observer(name: str, bits: int = 8, symmetric: bool = False, signed: bool | None = None,
                  where: str = "tensor", axis: int | None = None, **options: float) -> Observer:
    """Build an observer by name (one of :data:`OBSERVERS`).

    Args:
        name: ``minmax``, ``moving_average``, ``percentile``, ``entropy`` or ``mse``.
        bits, symmetric, signed, where, axis: see :class:`Observer`.
        **options: ``percentile=`` (percentile), ``momentum=`` (moving_average).

    Returns:
        A fresh :class:`Observer`.

    Raises:
        RecipeError: unknown name.

    Example:
        >>> obs = make_observer("percentile", percentile=99.0)
        >>> obs.update(torch.arange(1000.0))
        >>> 985 < float(obs.range()[1]) < 995
        True
    """
    if name not in _CLASSES:
        raise RecipeError(f"{where} observer", got=name, expected=f"one of {', '.join(OBSERVERS)}",
                          fix="use e.g. observer: percentile")
    return _CLASSES[name](bits=bits, symmetric=symmetric, signed=signed, where=where, axis=axis,
                         **options)  # type: ignore[arg-type]


__all__ = ["OBSERVERS", "EntropyObserver", "MSEObserver", "MinMaxObserver",
           "MovingAverageMinMaxObserver", "Observer", "PercentileObserver", "code_range",
           "make_observer", "range_to_qparams"]
