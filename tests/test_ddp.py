"""train/: DDP (2 CPU processes via torchrun, gloo) matches one process; kill + resume; rendezvous errors."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import pytest
import torch

from netpress.core.errors import RecipeError
from netpress.train import TrainConfig, fine_tune, read_checkpoint
from netpress.train.distributed import setup
from torchrun_util import clean_env, free_port, load_worker
from torchrun_util import torchrun as torchrun_path

WORKER = textwrap.dedent('''
    import os, signal, sys
    import torch, torch.nn as nn
    torch.set_num_threads(1)
    from netpress.core.data import as_batches
    from netpress.train import TrainConfig, fine_tune

    def problem():
        g = torch.Generator().manual_seed(0)
        X = torch.randn(187, 6, generator=g)  # batches of 31 (uneven halves) and a last of 1
        y = (X[:, 0] - X[:, 1] > 0).long()
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 2))
        return model, as_batches((X, y), batch_size=31)

    class Kill:
        def __init__(self, at):
            self.at = at
        def on_step_end(self, step, model, loss):
            if step == self.at:
                os.kill(os.getpid(), signal.SIGKILL)

    if __name__ == "__main__":
        out, kill_at, ckpt = sys.argv[1], int(sys.argv[2]), sys.argv[3]
        model, batches = problem()
        cfg = TrainConfig(epochs=3, lr=0.05, optimizer="sgd", checkpoint_dir=ckpt or None,
                          checkpoint_every=4)
        result = fine_tune(model, batches, cfg, callbacks=[Kill(kill_at)] if kill_at else [])
        if int(os.environ.get("RANK", "0")) == 0:
            import torch.distributed as dist
            torch.save({"state": model.state_dict(), "world": result.world_size,
                        "backend": dist.get_backend() if dist.is_initialized() else None}, out)
''')


pytestmark = pytest.mark.usefixtures("one_thread")


def test_two_process_ddp_matches_one_process(tmp_path):
    path, mod = load_worker(tmp_path, "worker", WORKER)
    model, batches = mod.problem()
    fine_tune(model, batches, TrainConfig(epochs=3, lr=0.05, optimizer="sgd"))
    torchrun = torchrun_path()
    cmd = [torchrun, "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", str(path), str(tmp_path / "ddp.pt"), "0", ""]
    proc = subprocess.run(cmd, env=clean_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = torch.load(tmp_path / "ddp.pt", weights_only=True)
    assert got["world"] == 2
    for k, v in model.state_dict().items():
        # each rank computes its part of every batch (15 + 16 of 31, all of the last 1) with its
        # loss weighted by its share; DDP averages: same gradient up to rounding
        assert torch.allclose(got["state"][k], v, atol=1e-5), k  # max diff measured ~1e-7


def test_torchrun_one_process_joins_a_gloo_group(tmp_path):
    """torchrun --nproc_per_node=1 trains through DDP (gloo on CPU) and equals the plain run."""
    path, mod = load_worker(tmp_path, "worker", WORKER)
    model, batches = mod.problem()
    fine_tune(model, batches, TrainConfig(epochs=3, lr=0.05, optimizer="sgd"))
    torchrun = torchrun_path()
    cmd = [torchrun, "--nproc_per_node=1", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", str(path), str(tmp_path / "one.pt"), "0", ""]
    proc = subprocess.run(cmd, env=clean_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = torch.load(tmp_path / "one.pt", weights_only=True)
    assert got["world"] == 1 and got["backend"] == "gloo"
    for k, v in model.state_dict().items():
        assert torch.allclose(got["state"][k], v, atol=1e-6), k


def test_killed_run_resumes_where_it_stopped(tmp_path):
    path, mod = load_worker(tmp_path, "worker", WORKER)
    ckpt = tmp_path / "ckpt"
    proc = subprocess.run([sys.executable, str(path), str(tmp_path / "x.pt"), "10", str(ckpt)],
                          env=clean_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9  # SIGKILLed at step 10
    assert not (tmp_path / "x.pt").exists()
    assert read_checkpoint(ckpt)["step"] == 8  # checkpoint_every=4: steps 10 - 8 are lost
    model, batches = mod.problem()  # fresh weights: everything comes from the checkpoint
    cfg = TrainConfig(epochs=3, lr=0.05, optimizer="sgd", checkpoint_dir=str(ckpt), checkpoint_every=4)
    result = fine_tune(model, batches, cfg)
    assert result.resumed_from == 8 and result.steps == 21 and len(result.losses) == 3
    ref, batches = mod.problem()
    ref_result = fine_tune(ref, batches, TrainConfig(epochs=3, lr=0.05, optimizer="sgd"))
    for k, v in ref.state_dict().items():
        assert torch.allclose(model.state_dict()[k], v, atol=1e-6), k  # measured: bit-identical
    assert result.losses == pytest.approx(ref_result.losses, rel=1e-5)
    assert [p.name for p in ckpt.iterdir()] == ["checkpoint.pt"]  # no temporary files left


def test_missing_rendezvous_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    with pytest.raises(RecipeError, match="MASTER_ADDR"):
        setup()
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    t0 = time.monotonic()
    with pytest.raises(RecipeError, match="join"):
        setup(timeout_s=2.0)  # the second rank never comes: an error, not a hang
    assert time.monotonic() - t0 < 30
