"""train/ on CUDA: fine_tune on the GPU matches the CPU, torchrun + nccl, kill-and-resume across devices.

Skipped without CUDA (CI has no GPU); run on a GPU machine with ``pytest -q tests/test_gpu.py``.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from netpress.core.data import as_batches
from netpress.core.errors import ModelError
from netpress.train import KeepSparsity, TrainConfig, fine_tune, read_checkpoint
from torchrun_util import clean_env, free_port, load_worker
from torchrun_util import torchrun as torchrun_path

pytestmark = [pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
              pytest.mark.usefixtures("one_thread")]

WORKER = textwrap.dedent('''
    import os, signal, sys
    import torch, torch.nn as nn
    import torch.distributed as dist
    torch.set_num_threads(1)
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    from netpress.core.data import as_batches
    from netpress.train import TrainConfig, fine_tune

    def problem():
        g = torch.Generator().manual_seed(0)
        X = torch.randn(192, 6, generator=g)
        y = (X[:, 0] - X[:, 1] > 0).long()
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 2))
        return model, as_batches((X, y), batch_size=32)

    def config(ckpt, device):
        return TrainConfig(epochs=3, lr=0.05, optimizer="adam", checkpoint_dir=ckpt or None,
                           checkpoint_every=4, device=device)

    class Kill:
        def __init__(self, at):
            self.at = at
        def on_step_end(self, step, model, loss):
            if step == self.at:
                os.kill(os.getpid(), signal.SIGKILL)

    if __name__ == "__main__":
        out, kill_at, ckpt, device = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
        model, batches = problem()
        result = fine_tune(model, batches, config(ckpt, device),
                           callbacks=[Kill(kill_at)] if kill_at else [])
        if int(os.environ.get("RANK", "0")) == 0:
            torch.save({"state": model.state_dict(), "world": result.world_size,
                        "backend": dist.get_backend() if dist.is_initialized() else None,
                        "device": str(next(model.parameters()).device)}, out)
''')


@pytest.fixture(autouse=True)
def no_tf32():
    """Exact fp32 on the GPU (TF32 convs/matmuls would differ from the CPU by ~1e-3)."""
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


def _cnn(seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(256, 1, 40, generator=g)
    y = (X[:, 0, :20].mean(1) > X[:, 0, 20:].mean(1)).long() + 2 * (X[:, 0, ::2].sum(1) > 0).long()
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv1d(1, 8, 5, padding=2), nn.BatchNorm1d(8), nn.ReLU(),
                          nn.Conv1d(8, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(320, 4))
    return model, as_batches((X, y), batch_size=32), X, y


def test_fine_tune_on_cuda_matches_cpu():
    # SGD: Adam's normalised step turns float-rounding noise in near-zero gradients into
    # lr-sized differences (measured 3.9e-3 after 32 steps at lr 3e-3), which says nothing
    cfg = {"epochs": 4, "lr": 0.05, "optimizer": "sgd"}
    cpu, batches, X, y = _cnn()
    res_cpu = fine_tune(cpu, batches, TrainConfig(**cfg, device="cpu"))
    gpu, batches, _, _ = _cnn()
    params = list(gpu.parameters())
    res_gpu = fine_tune(gpu, batches, TrainConfig(**cfg, device="cuda"))
    assert list(gpu.parameters()) == params  # same Parameter objects: callers' references hold
    assert all(t.device.type == "cpu" for t in gpu.state_dict().values())  # handed back on CPU
    assert not gpu.training and res_gpu.steps == res_cpu.steps == 32
    worst = max((cpu.state_dict()[k].float() - v.float()).abs().max().item()
                for k, v in gpu.state_dict().items())
    assert worst < 5e-4, worst  # fp32 on both; only summation order differs
    assert res_gpu.losses == pytest.approx(res_cpu.losses, rel=1e-3)
    with torch.no_grad():
        assert (cpu(X).argmax(1) != gpu(X).argmax(1)).float().mean() < 0.02
    assert (gpu(X).argmax(1) == y).float().mean() > 0.5  # it learned (chance: 0.25)


def test_teacher_companion_and_mixed_device_error():
    student, batches, X, _ = _cnn()
    teacher, _, _, _ = _cnn(seed=1)
    teacher.eval()

    def kd(model, batch):
        with torch.no_grad():
            t = batch.run(teacher)
        return F.kl_div(F.log_softmax(batch.run(model), 1), F.softmax(t, 1), reduction="batchmean")

    with pytest.raises(ModelError, match="companions"):  # the teacher left on the CPU
        fine_tune(student, batches, TrainConfig(epochs=1, device="cuda"), loss_fn=kd)
    assert next(student.parameters()).device.type == "cpu"  # handed back even after the error
    res = fine_tune(student, batches, TrainConfig(epochs=3, lr=3e-3, device="cuda"), loss_fn=kd,
                    companions=[teacher])
    assert res.losses[-1] < res.losses[0]
    assert next(teacher.parameters()).device.type == "cpu"


def test_keep_sparsity_and_extra_params_on_cuda():
    model, batches, _, _ = _cnn()
    lin = model[-1]
    with torch.no_grad():
        lin.weight[:, ::2] = 0
    keep = KeepSparsity(model)
    adapter = nn.Linear(4, 4)
    before = adapter.weight.detach().clone()

    def loss(net, batch):
        return F.cross_entropy(adapter(batch.run(net)), batch.target)

    fine_tune(model, batches, TrainConfig(epochs=2, lr=3e-3, device="cuda"), loss_fn=loss,
              callbacks=[keep], params=[*model.parameters(), *adapter.parameters()])
    assert int((lin.weight[:, ::2] != 0).sum()) == 0 and lin.weight.device.type == "cpu"
    assert adapter.weight.device.type == "cpu" and not torch.equal(adapter.weight, before)


def test_torchrun_one_process_nccl_matches_plain_cuda(tmp_path):
    path, mod = load_worker(tmp_path, "gpu_worker", WORKER)
    model, batches = mod.problem()
    fine_tune(model, batches, mod.config("", "cuda"))
    torchrun = torchrun_path()
    cmd = [torchrun, "--nproc_per_node=1", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", str(path), str(tmp_path / "ddp.pt"), "0", "", "cuda"]
    proc = subprocess.run(cmd, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.load(tmp_path / "ddp.pt", weights_only=True)
    assert got["backend"] == "nccl" and got["world"] == 1 and got["device"] == "cpu"
    for k, v in model.state_dict().items():
        assert torch.allclose(got["state"][k], v, atol=1e-5), k  # DDP (nccl all-reduce) vs plain


def test_killed_gpu_run_resumes_on_gpu_and_on_cpu(tmp_path):
    path, mod = load_worker(tmp_path, "gpu_worker", WORKER)
    ckpt = tmp_path / "ckpt"
    proc = subprocess.run([sys.executable, str(path), str(tmp_path / "x.pt"), "10", str(ckpt), "cuda"],
                          env=clean_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    raw = torch.load(ckpt / "checkpoint.pt", weights_only=True)  # no map_location: as written
    assert raw["step"] == 8 and "cuda_rng" in raw
    tensors = [*raw["model"].values(), *[t for s in raw["optimizer"]["state"].values()
                                         for t in s.values() if isinstance(t, torch.Tensor)]]
    assert tensors and all(t.device.type == "cpu" for t in tensors)  # device-free on disk
    cpu_copy = tmp_path / "ckpt_cpu"
    shutil.copytree(ckpt, cpu_copy)

    model, batches = mod.problem()  # resume on the GPU: as if never killed
    res = fine_tune(model, batches, mod.config(str(ckpt), "cuda"))
    ref, batches = mod.problem()
    ref_res = fine_tune(ref, batches, mod.config("", "cuda"))
    assert res.resumed_from == 8 and res.steps == 18
    for k, v in ref.state_dict().items():
        assert torch.allclose(model.state_dict()[k], v, atol=1e-6), k
    assert res.losses == pytest.approx(ref_res.losses, rel=1e-5)

    model, batches = mod.problem()  # the GPU checkpoint resumes on the CPU
    res = fine_tune(model, batches, mod.config(str(cpu_copy), "cpu"))
    assert res.resumed_from == 8 and res.steps == 18
    for k, v in ref.state_dict().items():
        assert torch.allclose(model.state_dict()[k], v, atol=1e-4), k
    assert read_checkpoint(cpu_copy)["step"] == 18


def test_cpu_checkpoint_resumes_on_gpu(tmp_path):
    path, mod = load_worker(tmp_path, "gpu_worker", WORKER)
    ckpt = tmp_path / "ckpt"
    proc = subprocess.run([sys.executable, str(path), str(tmp_path / "x.pt"), "10", str(ckpt), "cpu"],
                          env=clean_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    model, batches = mod.problem()
    res = fine_tune(model, batches, mod.config(str(ckpt), "cuda"))
    ref, batches = mod.problem()
    fine_tune(ref, batches, mod.config("", "cpu"))
    assert res.resumed_from == 8 and next(model.parameters()).device.type == "cpu"
    for k, v in ref.state_dict().items():
        assert torch.allclose(model.state_dict()[k], v, atol=1e-4), k


# --------------------------------------------------------------- stages that fine-tune (stop 11)
def _zero_fraction(model: nn.Module) -> float:
    ws = [m.weight for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    return sum(int((w == 0).sum()) for w in ws) / sum(w.numel() for w in ws)


def _accuracy(model: nn.Module, batches: list) -> float:
    with torch.no_grad():
        right = sum(int((b.run(model).argmax(1) == b.target).sum()) for b in batches)
    return right / sum(len(b.target) for b in batches)


#: stage, recipe (``device`` filled in), whether the fine-tuning batches keep their labels
#: (without: KL to the original, which must then follow the model as a companion)
STAGES = {
    "gradual": ("prune", {"method": "magnitude", "sparsity": 0.6, "schedule": "cubic",
                          "prune_steps": 4, "finetune": {"epochs": 3, "lr": 3e-3}}, True),
    "gradual_kl": ("prune", {"method": "magnitude", "sparsity": 0.6, "schedule": "cubic",
                             "prune_steps": 4, "finetune": {"epochs": 3, "lr": 3e-3}}, False),
    "lottery": ("prune", {"method": "lottery", "sparsity": 0.8, "rounds": 2, "rewind_steps": 2,
                          "finetune": {"epochs": 1, "lr": 1e-3}}, True),
    "regularize_l1": ("prune", {"method": "l1", "sparsity": 0.5, "penalty": 1e-3,
                                "finetune": {"epochs": 2, "lr": 1e-3}}, True),
    "distill_augment": ("distill", {"method": "kd", "epochs": 2, "lr": 1e-3,
                                    "augment": {"noise": 0.05, "mixup": 0.2}}, True),
}


def _run_stage(key: str, device: str) -> tuple[nn.Module, float, float]:
    """``(result, zero fraction of its Conv/Linear weights, held-out accuracy)`` of one stage on
    the digits CNN (distillation: from a 50% magnitude-pruned copy, its zeros kept)."""
    import copy

    import netpress
    from netpress import zoo
    from netpress.api import apply
    from netpress.core.data import Batch

    stage, recipe, labelled = STAGES[key]
    recipe = copy.deepcopy(recipe)
    (recipe["finetune"] if "finetune" in recipe else recipe)["device"] = device
    data = zoo.load_data("digits")
    train = data.train[:8] if labelled else [Batch(b.inputs) for b in data.train[:8]]
    model = zoo.load_model("digits_cnn").eval()
    if stage == "distill":
        model = netpress.prune(model, {"method": "magnitude", "sparsity": 0.5})
    torch.manual_seed(0)
    out = apply(stage, model, recipe, data=train, advanced={"train": train})
    assert all(t.device.type == "cpu" for t in out.state_dict().values())  # artifacts are CPU
    assert all(t.device.type == "cpu" for t in model.state_dict().values())  # the original too
    return out, _zero_fraction(out), _accuracy(out, data.evaluation)


@pytest.mark.parametrize("key", list(STAGES))
def test_finetuning_stages_on_cuda_match_cpu(key):
    """Gradual / lottery / regularisation pruning (MaskKeeper on the weight's device, the original
    as a companion) and KD with noise + mixup (teacher companion, augmentation tensors on the
    batch's device) run with ``device: cuda`` and agree with the same stage on the CPU."""
    _, zeros_cpu, acc_cpu = _run_stage(key, "cpu")
    _, zeros_gpu, acc_gpu = _run_stage(key, "cuda")
    if STAGES[key][0] == "prune":  # the target sparsity, exactly as on the CPU (counts, not masks)
        assert zeros_gpu == pytest.approx(zeros_cpu, abs=2e-3)
    else:  # distillation kept the zeros it started from
        assert zeros_gpu == pytest.approx(zeros_cpu, abs=2e-3) and zeros_gpu >= 0.49
    assert abs(acc_gpu - acc_cpu) <= 0.05, (acc_cpu, acc_gpu)  # 17 batches, 540 examples
