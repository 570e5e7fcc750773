"""Trial executors: order kept, crashes become ok=False, bad specs are typed errors, Ray locally."""

from __future__ import annotations

import os
import socket
import threading

import pytest

from netpress.core.errors import ConstraintError, RecipeError
from netpress.search.workers import InProcessExecutor, TrialOutcome, make_executor


def _square(x: int) -> int:
    return x * x


def _boom_on_three(x: int) -> int:
    if x == 3:
        raise ValueError(f"trial {x} failed on purpose")
    return x + 100


def _die_on_two(x: int) -> int:
    if x == 2:
        os._exit(17)  # the worker process dies without a Python exception
    return -x


def _threads(_: int) -> tuple[int, int]:
    import torch

    return torch.get_num_threads(), os.getpid()


def test_inprocess_keeps_order_and_values():
    with make_executor(None) as ex:
        assert isinstance(ex, InProcessExecutor)
        outs = ex.map(_square, [3, 1, 2, 0])
    assert [o.value for o in outs] == [9, 1, 4, 0]
    assert all(o.ok and o.error is None and o.seconds >= 0 for o in outs)


def test_inprocess_crash_is_recorded_and_others_complete():
    outs = make_executor("inprocess").map(_boom_on_three, [1, 3, 5])
    assert [o.ok for o in outs] == [True, False, True]
    assert outs[0].value == 101 and outs[2].value == 105
    assert outs[1].value is None
    assert "ValueError: trial 3 failed on purpose" in outs[1].error


@pytest.mark.parametrize("spec", ["ray:/x", "local", "host:99999", "ray://nohost", 5])
def test_bad_spec_is_recipe_error(spec):
    with pytest.raises(RecipeError) as err:
        make_executor(spec)
    assert "workers" in str(err.value) and "Fix:" in str(err.value)


def test_unreachable_cluster_is_constraint_error():
    pytest.importorskip("ray")
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ConstraintError) as err:
        make_executor(f"127.0.0.1:{port}")
    assert "cannot connect" in str(err.value) and "Fix:" in str(err.value)


def test_ray_missing_is_recipe_error(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "ray":
            raise ImportError("No module named 'ray'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(RecipeError) as err:
        make_executor("ray")
    assert "netpress[ray]" in str(err.value)


@pytest.fixture(scope="module")
def ray_executor():
    """One local 2-CPU Ray cluster shared by the Ray tests (start-up takes seconds)."""
    ray = pytest.importorskip("ray")
    ex = make_executor("ray", num_cpus=2)
    yield ex
    ex.close()
    assert not ray.is_initialized()  # we started it, so close() shut it down


def test_ray_keeps_order(ray_executor):
    assert ray_executor.parallelism == 2
    outs = ray_executor.map(_square, list(range(6)))
    assert [o.value for o in outs] == [0, 1, 4, 9, 16, 25]
    assert all(isinstance(o, TrialOutcome) and o.ok for o in outs)


def test_ray_exception_and_worker_death_are_recorded(ray_executor):
    outs = ray_executor.map(_boom_on_three, [1, 3, 5])
    assert [o.ok for o in outs] == [True, False, True]
    assert "trial 3 failed on purpose" in outs[1].error
    outs = ray_executor.map(_die_on_two, [1, 2, 3])
    assert [o.ok for o in outs] == [True, False, True]
    assert [outs[0].value, outs[2].value] == [-1, -3]
    assert outs[1].error  # e.g. "WorkerCrashedError: The worker died unexpectedly..."
    # the cluster is still usable after a worker died
    assert [o.value for o in ray_executor.map(_square, [7])] == [49]


def test_ray_tasks_use_one_torch_thread_in_other_processes(ray_executor):
    outs = ray_executor.map(_threads, [0, 1])
    assert all(o.ok for o in outs)
    assert {o.value[0] for o in outs} == {1}
    assert all(o.value[1] != os.getpid() for o in outs)


def test_ray_unpicklable_item_is_recorded(ray_executor):
    outs = ray_executor.map(_square, [2, threading.Lock(), 3])  # locks do not pickle
    assert outs[0].value == 4 and outs[2].value == 9
    assert not outs[1].ok and "pickle" in outs[1].error.lower()
