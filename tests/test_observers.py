"""Observers (Q2): ranges, qparams, histogram rebinning, errors."""

from __future__ import annotations

import pytest
import torch

from netpress.core.errors import DataError, RecipeError
from netpress.quantize.observers import OBSERVERS, make_observer, range_to_qparams


def _qerr(x: torch.Tensor, obs) -> float:
    s, z = obs.qparams()
    qmin, qmax = obs.qrange()
    xq = (torch.clamp(torch.round(x / s) + z, qmin, qmax) - z) * s
    return float(((xq - x) ** 2).mean())


def test_minmax_exact_and_zero_exact():
    obs = make_observer("minmax")
    obs.update(torch.tensor([-1.0, 0.5]))
    obs.update(torch.tensor([3.0]))
    lo, hi = obs.range()
    assert (float(lo), float(hi)) == (-1.0, 3.0)
    s, z = obs.qparams()
    assert abs(float(s) - 4.0 / 255) < 1e-7 and int(z) == -64  # round(-128 + 1 / (4/255)) = -64
    # zero is exactly representable: s * (z - z) == 0
    assert obs.is_signed() and obs.qrange() == (-128, 127)


def test_non_negative_data_gets_unsigned_codes():
    obs = make_observer("minmax")
    obs.update(torch.rand(1000) * 6)
    assert not obs.is_signed() and obs.qrange() == (0, 255)
    assert int(obs.qparams()[1]) == 0


def test_moving_average_is_between_batches():
    obs = make_observer("moving_average", momentum=0.5)
    obs.update(torch.tensor([-1.0, 1.0]))
    obs.update(torch.tensor([-3.0, 3.0]))
    assert float(obs.range()[1]) == pytest.approx(2.0)  # 1 + 0.5 * (3 - 1)


@pytest.mark.parametrize("name", ["percentile", "entropy", "mse"])
def test_clipping_observers_clip_heavy_tails(name):
    torch.manual_seed(0)
    x = torch.distributions.Laplace(0.0, 1.0).sample((200_000,))
    mm, obs = make_observer("minmax"), make_observer(name)
    for chunk in x.split(50_000):
        mm.update(chunk)
        obs.update(chunk)
    # measured hi: minmax 11.18, percentile 8.51, entropy 11.03, mse 9.79
    assert float(obs.range()[1]) < float(mm.range()[1])
    # measured int8 MSE: minmax 6.42e-4, percentile 6.67e-4, entropy 6.25e-4, mse 5.47e-4
    if name == "mse":
        assert _qerr(x, obs) < 0.9 * _qerr(x, mm)
    else:
        assert _qerr(x, obs) < 1.1 * _qerr(x, mm)


def test_histogram_rebins_when_range_grows():
    obs = make_observer("percentile", percentile=100.0)
    obs.update(torch.linspace(0, 1, 1000))
    obs.update(torch.linspace(0, 10, 1000))
    assert float(obs.range()[1]) == pytest.approx(10.0, rel=1e-3)
    assert float(obs.hist.sum()) == 2000


def test_per_channel_mse_weights():
    torch.manual_seed(0)
    w = torch.randn(16, 64)
    w[0, 0] = 20.0  # an outlier in channel 0 only
    obs = make_observer("mse", symmetric=True, signed=True, axis=0)
    obs.update(w)
    s, z = obs.qparams()
    assert s.shape == (16,) and bool((z == 0).all())
    amax = w.abs().amax(1)
    assert bool((s * 127 <= amax + 1e-6).all())  # never wider than min-max


def test_errors_name_the_layer():
    obs = make_observer("minmax", where="features.3 input")
    with pytest.raises(DataError, match="features.3 input.*NaN/Inf"):
        obs.update(torch.tensor([1.0, float("nan")]))
    with pytest.raises(DataError, match="no calibration batches"):
        make_observer("percentile", where="x").qparams()
    with pytest.raises(RecipeError, match="bits"):
        make_observer("minmax", bits=1)
    with pytest.raises(RecipeError, match="one of"):
        make_observer("nope")
    with pytest.raises(RecipeError, match="per-channel"):
        make_observer("entropy", axis=0)
    assert set(OBSERVERS) == {"minmax", "moving_average", "percentile", "entropy", "mse"}


def test_range_to_qparams_symmetric():
    s, z = range_to_qparams(torch.tensor(-2.0), torch.tensor(1.0), 8, True, True)
    assert float(s) == pytest.approx(2.0 / 127) and int(z) == 0
