"""A small study on a local 2-worker Ray cluster (CPU) gives the same front as in-process."""

from __future__ import annotations

import pytest

from netpress.search.pareto import pareto_mask
from netpress.search.planner import plan

ray = pytest.importorskip("ray")

RECIPE = {"model": "zoo:digits_cnn", "data": "zoo:digits", "runtime": "torch", "eval_limit": 64,
          "plan": {"families": ["int8_weight", "magnitude_int8"],
                   "sensitivity": {"sparsity": [0.5], "bits": [], "ranks": [], "max_examples": 16}}}


def _shape(res):
    done = sorted((t for t in res.trials if t["state"] == "complete"), key=lambda t: t["number"])
    # latency differs between runs; metric and bytes are deterministic
    pts = [{"metric": t["metric"], "size_bytes": t["size_bytes"], "latency_ms": 0.0} for t in done]
    return [(t["params"], round(t["metric"], 6), t["size_bytes"]) for t in done], pareto_mask(pts)


def test_ray_front_matches_in_process(tmp_path, monkeypatch):
    from netpress.search.trial import LATENCY

    for k, v in {"warmup": 2, "runs": 5, "max_seconds": 2.0}.items():
        monkeypatch.setitem(LATENCY, k, v)
    local = plan(RECIPE, tmp_path / "local", trials=2)  # also trains/caches the zoo model
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        remote = plan(RECIPE, tmp_path / "ray", trials=2, workers="ray")
    finally:
        ray.shutdown()
    assert remote.new_trials == 2 and len(remote.trials) == 2
    assert all(t["state"] == "complete" for t in remote.trials), remote.trials
    assert _shape(remote) == _shape(local)
    assert local.met and remote.met
