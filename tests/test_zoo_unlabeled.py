"""Tests of :func:`netpress.zoo.sources.mnist1d_unlabeled`, the unlabelled MNIST-1D transfer set."""

from __future__ import annotations

import random

import numpy as np
import pytest

from netpress.core.errors import DataError
from netpress.zoo import sources


def test_unlabeled_shape_dtype_readonly_and_deterministic():
    x = sources.mnist1d_unlabeled(30, seed=3)
    assert x.shape == (30, 1, 40) and x.dtype == np.float32
    assert not x.flags.writeable
    again = sources.mnist1d_unlabeled.__wrapped__(30, seed=3)  # uncached: regenerated
    np.testing.assert_array_equal(x, again)
    other = sources.mnist1d_unlabeled.__wrapped__(30, seed=4)
    assert not np.allclose(x, other)
    # standardised like the zoo split
    assert abs(float(x.mean())) < 1e-5 and abs(float(x.std()) - 1.0) < 1e-4


def test_unlabeled_returns_inputs_only_and_leaves_global_rng():
    np.random.seed(123)
    random.seed(123)
    expect_np, expect_py = np.random.rand(), random.random()
    np.random.seed(123)
    random.seed(123)
    out = sources.mnist1d_unlabeled.__wrapped__(20, seed=5)
    assert isinstance(out, np.ndarray)  # no labels come back
    assert np.random.rand() == expect_np and random.random() == expect_py


def test_unlabeled_never_equals_a_zoo_example():
    x = sources.mnist1d_unlabeled(200, seed=1).reshape(200, -1)
    x_tr, _, x_te, _ = sources.mnist1d_arrays()
    for split in (x_te.reshape(len(x_te), -1), x_tr.reshape(len(x_tr), -1)):
        d2 = (x ** 2).sum(1)[:, None] + (split ** 2).sum(1)[None, :] - 2 * x @ split.T
        assert float(d2.min()) > 1e-3  # no duplicate (or near duplicate) of a zoo example


@pytest.mark.parametrize(("n", "seed"), [(0, 1), (15, 1), (-10, 1), (20, 42)])
def test_unlabeled_bad_arguments(n, seed):
    with pytest.raises(DataError) as err:
        sources.mnist1d_unlabeled.__wrapped__(n, seed=seed)
    assert err.value.fix and "mnist1d_unlabeled" in err.value.where
