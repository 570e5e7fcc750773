"""Output-aware activation ranges for static PTQ (``activations: {search: true}``).

A per-tensor observer picks an input range from the tensor's own values (percentile, MSE, ...);
what matters is the error it causes in the *consumer's* output. On MobileNetV2 the 99.99th
percentile clips the ReLU6 inputs of the linear projection convs to ~1.5 (max 6), and rare large
activations carry the signal there: the projection output error of that layer is 30x the
min-max range's.

For each layer input, this search tries the observer's own range and the observed range
``[lo, hi]`` shrunk by each factor of ``alphas``, and keeps the one with the smallest squared error
of the layer's float output ``‖W x - W q(x)‖²`` on a few calibration examples (float inputs; the
layer's float weights).

Example:
    >>> import torch, torch.nn as nn
    >>> torch.manual_seed(0) and None
    >>> conv = nn.Conv2d(4, 4, 1)
    >>> x = torch.rand(8, 4, 6, 6); x[0, 0, 0, 0] = 40.0   # one outlier
    >>> cands = {"0": [(1.0 / 255, 0), (40.0 / 255, 0)]}
    >>> best = search_input_ranges(nn.Sequential(conv), {"0": "t"}, cands, x, 8, False)
    >>> best["t"] == (40.0 / 255, 0)   # clipping the outlier costs more than coarser steps
    True
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from netpress.nn.ptq import _act_range, fake_quant
from netpress.quantize.bias_correction import forward_with_hooks

DEFAULT_ALPHAS = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3)


def _apply(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if isinstance(m, nn.Conv2d):
        return m._conv_forward(x, m.weight, None)
    return F.linear(x, m.weight)


@torch.no_grad()
def search_input_ranges(model: nn.Module, inputs: dict[str, str],
                        candidates: dict[str, list[tuple[float, int]]], x: torch.Tensor,
                        bits: int, signed: bool | dict[str, bool], chunk: int = 16,
                        ) -> dict[str, tuple[float, int]]:
    """Pick, per layer input, the candidate quantizer with the smallest layer-output error.

    Args:
        model: the float (BN-folded) model.
        inputs: layer name -> the tensor name of its input (the first reader decides).
        candidates: layer name -> ``[(scale, zero_point), ...]``.
        x: calibration examples (one tensor).
        bits: activation code width.
        signed: int8 (True) or uint8 codes, per layer name or for all.
        chunk: examples per forward.

    Returns:
        tensor name -> the chosen ``(scale, zero_point)``.
    """
    mods = dict(model.named_modules())
    errs = {n: torch.zeros(len(c), dtype=torch.float64) for n, c in candidates.items()}
    hooks = []
    for name in candidates:
        sg = signed[name] if isinstance(signed, dict) else signed
        lo, hi = _act_range(bits, sg)

        def hook(m: nn.Module, a: tuple, _y: torch.Tensor, name: str = name, lo: int = lo,
                 hi: int = hi) -> None:
            xin = a[0].float()
            y = _apply(m, xin)
            for i, (s, z) in enumerate(candidates[name]):
                xq = fake_quant(xin, torch.tensor(float(s)), torch.tensor(int(z)), lo, hi)
                errs[name][i] += float(((_apply(m, xq) - y) ** 2).sum())
        hooks.append(mods[name].register_forward_hook(hook))
    forward_with_hooks(model, x, chunk, hooks)
    best: dict[str, tuple[float, int]] = {}
    for name, c in candidates.items():
        t = inputs[name]
        if t not in best:
            best[t] = c[int(errs[name].argmin())]
    return best


__all__ = ["DEFAULT_ALPHAS", "search_input_ranges"]
