"""lowrank/sequential: block-by-block statistics, ``statistics: train``, distillation device."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from netpress.core.config import StageContext, get_technique, parse_config
from netpress.core.data import Batch
from netpress.core.errors import ModelError
from netpress.lowrank.common import set_module
from netpress.lowrank.hidden_kd import HiddenDistillConfig, hidden_distill
from netpress.lowrank.sequential import SequentialMoments
from netpress.lowrank.svd import factorize_linear
from netpress.lowrank.whiten import layer_moments

FFN = [r"re:.*\.intermediate\.dense", r"re:.*\.layer\.\d+\.output\.dense"]
NAMES = [f"bert.encoder.layer.{i}.{x}" for i in range(3)
         for x in ("intermediate.dense", "output.dense")]

pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny_bert(layers: int = 3, seed: int = 0) -> nn.Module:
    from transformers import BertConfig, BertModel

    from netpress.zoo.models import MiniLMEncoder

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=layers,
                     num_attention_heads=2, intermediate_size=128, max_position_embeddings=32,
                     attn_implementation="eager")
    return MiniLMEncoder(BertModel(cfg, add_pooling_layer=False)).eval()


def _batches(n: int, seed: int) -> list[Batch]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(1, 64, (8, 12), generator=g)
        lengths = torch.randint(4, 13, (8,), generator=g)
        mask = (torch.arange(12)[None, :] < lengths[:, None]).long()  # (B, T)
        out.append(Batch({"input_ids": ids * mask, "attention_mask": mask}))
    return out


def test_blockwise_moments_match_whole_model_passes():
    original = _tiny_bert()
    model = copy.deepcopy(original)
    data = _batches(3, 0)
    seq = SequentialMoments(model, original, NAMES, data)
    assert seq.caches is not None
    assert [c.prefix for c in seq.caches] == ["bert.encoder.layer"] * 2
    for k, name in enumerate(NAMES):
        got = seq.moments(name)
        want = layer_moments(model, original, name, data)
        assert got[2] == want[2]
        for a, b in zip(got[:2], want[:2], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * float(b.abs().max()))
        if k > 0:  # the compressed stream must differ from the original one after compressing
            assert not torch.allclose(got[0], layer_moments(original, original, name, data)[0])
        set_module(model, name, factorize_linear(model.get_submodule(name), 4))


def test_blockwise_out_of_order_falls_back():
    original = _tiny_bert()
    model = copy.deepcopy(original)
    data = _batches(2, 1)
    seq = SequentialMoments(model, original, NAMES, data)
    seq.moments(NAMES[4])  # block 2: streams carried past blocks 0 and 1
    set_module(model, NAMES[0], factorize_linear(model.get_submodule(NAMES[0]), 4))
    got = seq.moments(NAMES[1])  # earlier block: whole-model passes
    want = layer_moments(model, original, NAMES[1], data)
    torch.testing.assert_close(got[0], want[0])


def _svd(stats: list[Batch], train: list[Batch] | None, extra: dict) -> nn.Module:
    model = _tiny_bert()
    cfg = parse_config("lowrank", {"method": "svd", "ratio": 0.25, "targets": FFN,
                                   "activation_aware": True, **extra})
    ctx = StageContext(data=stats, original=model,
                       advanced={"train": train} if train is not None else None)
    return get_technique("lowrank", "svd").handler(copy.deepcopy(model), cfg, ctx).eval()


def test_statistics_train_uses_the_train_split():
    cal, train = _batches(1, 2), _batches(4, 3)
    via_train = _svd(cal, train, {"statistics": "train"})
    direct = _svd(train, None, {})
    calib = _svd(cal, train, {})
    w = "bert.encoder.layer.1.output.dense.0.weight"
    a, b, c = (dict(m.named_parameters())[w] for m in (via_train, direct, calib))
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)


def test_more_statistics_generalise_better():
    """Moments from 1 batch over-fit (128-dim FFN input, ~60 tokens); 12 batches do not."""
    teacher = _tiny_bert()
    held_out = _batches(4, 9)
    few = _svd(_batches(1, 4), None, {})
    many = _svd(_batches(1, 4), _batches(12, 5), {"statistics": "train"})

    def err(m: nn.Module) -> float:
        with torch.no_grad():
            return sum(float((b.run(m) - b.run(teacher)).pow(2).mean()) for b in held_out)

    assert err(many) < err(few)


def test_distill_device_choice():
    teacher = _tiny_bert(layers=1)
    student = copy.deepcopy(teacher)
    name = "bert.encoder.layer.0.intermediate.dense"
    set_module(student, name, factorize_linear(student.get_submodule(name), 4))
    data = _batches(2, 6)
    res = hidden_distill(student, teacher, data, HiddenDistillConfig(epochs=1, device="auto"),
                         [name], eval_fn=lambda m: float(next(m.parameters()).device.type == "cpu"
                                                         or torch.cuda.is_available()))
    assert res.steps == 2 and res.evals == [1.0]
    assert next(student.parameters()).device.type == "cpu"  # back where it was
    assert next(teacher.parameters()).device.type == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(ModelError, match="cuda"):
            hidden_distill(student, teacher, data, HiddenDistillConfig(epochs=1, device="cuda"),
                           [name])


def test_one_block_is_cached_and_unchained_blocks_fall_back():
    original = _tiny_bert()
    model = copy.deepcopy(original)
    data = _batches(2, 7)
    name = "bert.encoder.layer.1.output.dense"
    seq = SequentialMoments(model, original, [name], data)  # one block: cached all the same
    assert seq.caches is not None and seq.caches[0].index == -1
    got = seq.moments(name)
    assert seq.caches[0].index == 1 and seq.caches[1].index == 1
    want = layer_moments(model, original, name, data)[0]  # float64 products there: round-off
    torch.testing.assert_close(got[0], want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))

    class Unchained(nn.Module):  # block i gets its own scale: the cache's flow check refuses
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList(nn.Linear(4, 4) for _ in range(2))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for i, blk in enumerate(self.layers):
                x = blk(x * (i + 1))
            return x

    net = Unchained()
    plain = [Batch((torch.randn(5, 4),))]
    seq = SequentialMoments(net, net, ["layers.0", "layers.1"], plain)
    assert seq.caches is None
    torch.testing.assert_close(seq.moments("layers.1")[0],
                               layer_moments(net, net, "layers.1", plain)[0])
