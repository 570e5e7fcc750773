"""lowrank/hidden_kd: SVD + hidden-state distillation from the original (tiny BERT)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from netpress.api import apply
from netpress.core.config import StageContext, get_technique, parse_config
from netpress.core.data import Batch
from netpress.core.errors import ModelError, RecipeError
from netpress.lowrank.hidden_kd import default_blocks

FFN = [r"re:.*\.intermediate\.dense", r"re:.*\.layer\.\d+\.output\.dense"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny_bert(seed: int = 0) -> nn.Module:
    from transformers import BertConfig, BertModel

    from netpress.zoo.models import MiniLMEncoder

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=128, max_position_embeddings=32)
    return MiniLMEncoder(BertModel(cfg, add_pooling_layer=False)).eval()


def _batches(n: int, seed: int) -> list[Batch]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(1, 64, (16, 12), generator=g)
        lengths = torch.randint(4, 13, (16,), generator=g)
        mask = (torch.arange(12)[None, :] < lengths[:, None]).long()  # (B, T)
        out.append(Batch({"input_ids": ids * mask, "attention_mask": mask}))
    return out


def _pooled_cosine(student: nn.Module, teacher: nn.Module, batches: list[Batch]) -> float:
    vals = []
    with torch.no_grad():
        for b in batches:
            m = b.mask.float()[..., None]
            s, t = ((b.run(x) * m).sum(1) / m.sum(1) for x in (student, teacher))
            vals.append(torch.nn.functional.cosine_similarity(s, t, dim=-1))
    return float(torch.cat(vals).mean())


def _svd(model: nn.Module, cfg: dict, train: list[Batch]) -> tuple[nn.Module, dict]:
    import copy

    tech = get_technique("lowrank", "svd")
    ctx = StageContext(data=train[:2], original=model, advanced={"train": train})
    out = tech.handler(copy.deepcopy(model), parse_config("lowrank", cfg), ctx).eval()
    return out, ctx.report


def test_hidden_distill_recovers_held_out_cosine():
    teacher = _tiny_bert()
    train, held_out = _batches(8, 0), _batches(4, 1)
    base = {"method": "svd", "ratio": 0.25, "targets": FFN}
    plain, _ = _svd(teacher, base, train)
    tuned, report = _svd(teacher, dict(base, distill={"epochs": 5, "lr": 5e-3, "warmup": 0.1}),
                         train)
    assert report["distill_blocks"] == ["bert.encoder.layer.0", "bert.encoder.layer.1"]
    losses = report["distill_losses"]
    assert len(losses) == 5 and losses[-1] < 0.7 * losses[0]
    before = _pooled_cosine(plain, teacher, held_out)
    after = _pooled_cosine(tuned, teacher, held_out)
    assert 1 - after < 0.7 * (1 - before), (before, after)
    # only the factors, LayerNorms and biases trained: attention weights are the teacher's
    for name in ("bert.encoder.layer.0.attention.self.query.weight",
                 "bert.embeddings.word_embeddings.weight"):
        assert torch.equal(dict(tuned.named_parameters())[name],
                           dict(teacher.named_parameters())[name])
    assert all(p.requires_grad for p in tuned.parameters())  # flags restored


def test_default_blocks_and_bad_block_name():
    model = _tiny_bert()
    names = ["bert.encoder.layer.1.intermediate.dense"]
    assert default_blocks(model, names) == ["bert.encoder.layer.1"]
    with pytest.raises(ModelError, match="blocks"):
        _svd(model, {"method": "svd", "ratio": 0.25, "targets": FFN,
                     "distill": {"epochs": 1, "blocks": ["bert.pooler_missing"]}}, _batches(2, 0))


def test_distill_config_is_strict():
    with pytest.raises(RecipeError):
        apply("lowrank", _tiny_bert(), {"method": "svd", "ratio": 0.5,
                                        "distill": {"epochs": 1, "learning_rate": 1e-3}})


def test_energy_allocation_shares_the_budget_and_one_pass_moments():
    model = _tiny_bert()
    data = _batches(3, 2)
    out, report = _svd(model, {"method": "svd", "ratio": 0.3, "targets": FFN, "allocation": "energy",
                               "activation_aware": True, "correct": False}, data)
    ranks = report["ranks"]
    assert len(ranks) == 4 and len(set(ranks.values())) > 1  # not uniform
    budget = 0.3 * 4 * 32 * 128
    assert sum(r * (32 + 128) for r in ranks.values()) <= budget
    with pytest.raises(RecipeError, match="ratio"):
        parse_config("lowrank", {"method": "svd", "energy": 0.9, "allocation": "energy"})


def test_bench_svd_minilm_rows_on_a_tiny_stand_in(monkeypatch):
    """The bench case end to end (zoo swapped for a tiny BERT; the real run is the bench's job)."""
    from types import SimpleNamespace

    from netpress import zoo
    from netpress.bench import ROW_KEYS, distill_svd

    bundle = SimpleNamespace(train=_batches(4, 0), calibration=_batches(2, 1),
                             evaluation=_batches(2, 2))
    monkeypatch.setattr(zoo, "load_model", lambda name: _tiny_bert())
    monkeypatch.setattr(zoo, "load_data", lambda name: bundle)
    # the artifact manifest rebuilds the real zoo MiniLM; the stand-in is sized by its parameters
    monkeypatch.setattr(distill_svd, "_artifact_bytes",
                        lambda model, scratch: 4 * sum(p.numel() for p in model.parameters()))
    rows = distill_svd.run(quick=True)
    assert [r["case"] for r in rows] == ["svd_minilm", "svd_minilm"]
    assert all(k in r for r in rows for k in ROW_KEYS)
    assert "FFN weights 16384 -> " in rows[0]["notes"] and rows[1]["compress_seconds"] > 0
    assert 0 < rows[0]["metric"] <= 1 and 0 < rows[1]["metric"] <= 1


def test_length_buckets_keep_every_example_and_its_output():
    from netpress.core.data import length_buckets

    model, batches = _tiny_bert(), _batches(4, 2)
    for b in batches:  # a target per row, to check it moves with its row
        b.target = b.inputs["input_ids"][:, 0] * 100 + b.mask.sum(1)
    buckets = length_buckets(batches)
    real = sum(int(b.mask.sum()) for b in batches)
    assert [b.size for b in buckets] == [16] * 4
    assert sum(int(b.mask.sum()) for b in buckets) == real
    padded = sum(b.mask.numel() for b in buckets)
    assert padded < sum(b.mask.numel() for b in batches)
    assert real / padded > 0.85  # 0.90 measured (0.71 before)
    lengths = [int(n) for b in buckets for n in b.mask.sum(1)]
    assert lengths == sorted(lengths)

    def pooled(bs):  # row key (its target) -> mean-pooled output
        out = {}
        with torch.no_grad():
            for b in bs:
                m = b.mask.float()[..., None]
                for key, e in zip(b.target.tolist(), (b.run(model) * m).sum(1) / m.sum(1),
                                  strict=True):
                    out.setdefault(key, []).append(e)
        return out

    before, after = pooled(batches), pooled(buckets)
    assert sorted(before) == sorted(after)
    for key in before:  # padding is masked out: every example's embedding is unchanged
        for x, y in zip(sorted(before[key], key=lambda t: t.sum().item()),
                        sorted(after[key], key=lambda t: t.sum().item()), strict=True):
            torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)
    # not right-padded token batches: returned as they are
    left = [Batch({"input_ids": b.inputs["input_ids"], "attention_mask": b.mask.flip(1)})
            for b in batches]
    assert length_buckets(left) is left
    plain = [Batch((torch.zeros(4, 3),), torch.zeros(4))]
    assert length_buckets(plain) is plain
