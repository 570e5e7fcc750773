"""train/ loop and quantize/pack."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from netpress.core.data import as_batches
from netpress.core.errors import DataError
from netpress.quantize.pack import pack, packed_numel, unpack
from netpress.train import TrainConfig, fine_tune


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 8])
def test_pack_round_trip_and_size(bits):
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 1 << bits, (37, 5), generator=g, dtype=torch.int64)
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.numel() == packed_numel(codes.numel(), bits) == (185 * bits + 7) // 8
    assert torch.equal(unpack(packed, bits, codes.numel()).to(torch.int64), codes.reshape(-1))


def test_pack_rejects_out_of_range():
    with pytest.raises(ValueError):
        pack(torch.tensor([4]), 2)


def test_fine_tune_learns_and_calls_hooks():
    torch.manual_seed(0)
    X = torch.randn(128, 4)
    y = (X[:, 0] + X[:, 1] > 0).long()
    model = nn.Linear(4, 2)
    seen = []

    class Hook:
        def on_step_end(self, step, model, loss):
            seen.append(step)

    res = fine_tune(model, as_batches((X, y), batch_size=32), TrainConfig(epochs=10, lr=0.05),
                    callbacks=[Hook()])
    acc = (model(X).argmax(1) == y).float().mean().item()
    assert acc > 0.9  # measured 0.99
    assert res.steps == 40 and seen == list(range(1, 41))
    assert res.losses[-1] < res.losses[0]
    assert not model.training


def test_fine_tune_needs_labels():
    with pytest.raises(DataError, match="targets"):
        fine_tune(nn.Linear(2, 2), as_batches(torch.randn(4, 2)), TrainConfig())


def _problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(96, 1, 12, generator=g)
    y = (X[:, 0, :6].sum(1) > X[:, 0, 6:].sum(1)).long()
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv1d(1, 4, 3), nn.BatchNorm1d(4), nn.ReLU(), nn.Flatten(),
                          nn.Dropout(0.1), nn.Linear(40, 2))
    return model, as_batches((X, y), batch_size=16)


@pytest.mark.usefixtures("one_thread")
def test_device_cpu_is_the_plain_loop_bit_for_bit():
    """device: cpu trains exactly like a hand-written Adam + cosine loop (the loop before devices)."""
    import torch.nn.functional as F

    model, batches = _problem()
    params = list(model.parameters())
    ptrs = [p.data_ptr() for p in params]
    res = fine_tune(model, batches, TrainConfig(epochs=3, lr=0.01, seed=4, device="cpu"))
    assert [p.data_ptr() for p in model.parameters()] == ptrs  # never moved or copied
    ref, batches = _problem()
    opt = torch.optim.Adam(ref.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 3 * len(batches))
    gen = torch.Generator().manual_seed(4)
    ref.train()
    for _ in range(3):
        for i in torch.randperm(len(batches), generator=gen).tolist():
            loss = F.cross_entropy(ref(*batches[i].inputs), batches[i].target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    for (k, v), w in zip(model.state_dict().items(), ref.state_dict().values(), strict=True):
        assert torch.equal(v, w), k
    assert res.steps == 18 and not model.training


def test_cuda_without_cuda_is_a_clear_error(monkeypatch):
    from pydantic import ValidationError

    from netpress.core.errors import RecipeError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    model, batches = _problem()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for spec in ("cuda", "cuda:0"):
        with pytest.raises(RecipeError, match=r"finetune\.device.*is_available\(\) is False.*device: cpu"):
            fine_tune(model, batches, TrainConfig(epochs=1, device=spec))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # untouched
    res = fine_tune(model, batches, TrainConfig(epochs=1, device="auto"))  # auto: the CPU here
    assert res.steps == len(batches) and next(model.parameters()).device.type == "cpu"
    for bad in ("gpu", "cuda:x", "CUDA"):
        with pytest.raises(ValidationError):
            TrainConfig(device=bad)


def test_checkpoints_are_device_free(tmp_path):
    from collections import OrderedDict

    from netpress.train.checkpoint import to_cpu, write_checkpoint

    model, _ = _problem()
    sd = model.state_dict()
    out = to_cpu({"model": sd, "extra": [torch.ones(2)], "step": 3})
    assert isinstance(out["model"], OrderedDict) and out["model"]._metadata == sd._metadata
    assert all(out["model"][k] is v for k, v in sd.items())  # CPU tensors: no copies
    write_checkpoint(tmp_path, {"model": sd, "step": 3})
    raw = torch.load(tmp_path / "checkpoint.pt", weights_only=True)  # no map_location
    assert all(v.device.type == "cpu" for v in raw["model"].values())
    fresh, _ = _problem(seed=1)
    fresh.load_state_dict(raw["model"])
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in sd.items())


def test_mixed_devices_become_a_model_error():
    from netpress.core.errors import ModelError
    from netpress.train.loop import _mixed_devices

    exc = RuntimeError("Expected all tensors to be on the same device, but found at least two "
                       "devices, cuda:0 and cpu!")
    err = _mixed_devices(exc, torch.device("cuda", 0))
    assert isinstance(err, ModelError) and "companions" in str(err)
    assert _mixed_devices(exc, torch.device("cpu")) is None  # on the CPU it is not ours to explain
    assert _mixed_devices(RuntimeError("CUDA out of memory"), torch.device("cuda", 0)) is None

