"""quantize/weight_search.py: output-aware per-channel weight scales (``observer: output_mse``)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from netpress.api import quantize
from netpress.core.config import parse_config
from netpress.core.data import Batch
from netpress.core.errors import DataError, ModelError, RecipeError
from netpress.nn.ptq import W8A8Conv2d
from netpress.quantize.weight_search import input_moments, output_aware_scales


def _out_err(w: torch.Tensor, scale: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    s = scale.double().reshape(-1, 1)
    w2 = w.double().reshape(w.shape[0], -1)
    e = torch.clamp(torch.round(w2 / s), -127, 127) * s - w2
    if h.dim() == 3:
        h = h.repeat_interleave(w.shape[0] // h.shape[0], dim=0)
        return torch.einsum("ok,okl,ol->o", e, h, e)
    return ((e @ h) * e).sum(1)


def test_moments_match_im2col_and_token_rows():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.Conv2d(4, 4, 3, groups=4),
                        nn.Flatten(2), nn.Linear(36, 5))
    x = torch.randn(3, 2, 8, 8)
    h = input_moments(net, ["0", "1", "3"], [(x,)], positions=10_000)
    cols = nn.functional.unfold(x, 3, padding=1).permute(0, 2, 1).reshape(-1, 18).double()
    torch.testing.assert_close(h["0"], cols.T @ cols / len(cols))
    assert tuple(h["1"].shape) == (4, 9, 9)  # depthwise: one 9x9 moment per channel
    with torch.no_grad():
        feats = net[2](net[1](net[0](x))).reshape(-1, 36).double()  # (3·4 tokens, 36)
    torch.testing.assert_close(h["3"], feats.T @ feats / len(feats))


def test_scales_never_worse_than_minmax_and_win_where_inputs_are_skewed():
    torch.manual_seed(1)
    w = torch.randn(16, 32)
    w[:, 0] *= 8  # an outlier column sets max|w|
    h = torch.diag(torch.cat([torch.full((1,), 1e-4), torch.ones(31)])).double()  # column 0 unused
    s = output_aware_scales(w, h)
    minmax = w.abs().amax(1) / 127
    err, err0 = _out_err(w, s, h), _out_err(w, minmax, h)
    assert (err <= err0 + 1e-12).all()
    assert float(err.sum()) < 0.5 * float(err0.sum())  # clipping the unused outlier pays
    assert (s <= minmax).all() and (s < minmax).sum() >= 8


def test_grouped_scales_use_each_channels_own_moment():
    torch.manual_seed(2)
    w = torch.randn(6, 1, 3, 3)
    h = torch.stack([torch.eye(9, dtype=torch.float64) * (i + 1) for i in range(6)])
    s = output_aware_scales(w, h)
    assert s.shape == (6,)
    assert (_out_err(w, s, h) <= _out_err(w, w.abs().flatten(1).amax(1) / 127, h) + 1e-12).all()
    with pytest.raises(ModelError, match="matching K"):
        output_aware_scales(torch.randn(6, 2, 3, 3), h)


def test_bad_layer_and_bad_data_are_clear_errors():
    net = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    with pytest.raises(ModelError, match="Conv2d or nn.Linear"):
        input_moments(net, ["1"], [(torch.randn(2, 4),)])
    with pytest.raises(DataError, match="NaN"):
        input_moments(net, ["0"], [(torch.full((2, 4), float("nan")),)])
    with pytest.raises(DataError, match="no calibration input"):
        input_moments(net, ["0"], [])
    with pytest.raises(RecipeError, match="per_channel"):
        parse_config("quantize", {"method": "ptq", "weights": {
            "observer": "output_mse", "granularity": "per_tensor"}})


def test_ptq_output_mse_lowers_output_error_on_held_out_inputs():
    """Input channel 0 is almost silent but holds the largest weights: min-max spends the codes
    on them, the output-aware scale clips them."""
    torch.manual_seed(3)
    net = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 8, 1)).eval()
    with torch.no_grad():
        net[0].weight[:, 0] *= 60
    quiet = torch.tensor([0.001, 1.0, 1.0]).reshape(1, 3, 1, 1)

    def data(n: int, seed: int) -> torch.Tensor:
        return torch.randn(n, 3, 10, 10, generator=torch.Generator().manual_seed(seed)) * quiet

    held = data(32, 99)
    with torch.no_grad():
        ref = net(held)
    errs = {}
    for obs in ("minmax", "output_mse"):
        q = quantize(net, {"method": "ptq", "weights": {"observer": obs}},
                     data=[Batch((data(64, 0),))])
        assert isinstance(q[0], W8A8Conv2d)
        with torch.no_grad():
            errs[obs] = float((q(held) - ref).pow(2).mean())
    assert errs["output_mse"] < 0.5 * errs["minmax"]
