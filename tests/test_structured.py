"""Structured pruning (P4): physical removal over several architectures, reload, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torchvision

from netpress.api import prune
from netpress.core.config import StageContext, parse_config
from netpress.core.data import Batch
from netpress.core.errors import DataError, RecipeError
from netpress.export.artifact import load, save_artifact
from netpress.measure.macs import count_macs
from netpress.prune.structured import StructuredPruneConfig, kept, prune_structured


def _resnet18() -> nn.Module:
    return torchvision.models.resnet18(num_classes=10)


def _mobilenet_v2() -> nn.Module:
    return torchvision.models.mobilenet_v2(num_classes=10)


def _googlenet() -> nn.Module:
    return torchvision.models.googlenet(num_classes=10, aux_logits=False, init_weights=False)


def _efficientnet_b0() -> nn.Module:
    return torchvision.models.efficientnet_b0(num_classes=10)


def _shufflenet_v2() -> nn.Module:
    return torchvision.models.shufflenet_v2_x0_5(num_classes=10)


ARCHS = {"resnet18": _resnet18, "mobilenet_v2": _mobilenet_v2, "googlenet": _googlenet,
         "efficientnet_b0": _efficientnet_b0, "shufflenet_v2": _shufflenet_v2}


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_structured_over_architectures_runs_shrinks_and_reloads(arch, tmp_path):
    torch.manual_seed(0)
    model = ARCHS[arch]().eval()
    x = torch.randn(2, 3, 32, 32)  # small input: fast, every architecture still runs
    ex = Batch((x[:1],))
    # resnet18: residual adds; mobilenet_v2: depthwise + adds; googlenet: concat; efficientnet:
    # depthwise + squeeze-excitation (channel-wise multiply); shufflenet: split + concat + channel
    # shuffle (5-D view that torch-pruning cannot map: those channels stay, the branches shrink)
    cfg = ({"method": "structured", "macs_reduction": 2.0} if arch == "resnet18"
           else {"method": "structured", "ratio": 0.5, "round_to": 8})
    pruned = prune(model, cfg, data=[(x,)])
    assert pruned(x).shape == (2, 10)
    before, after = count_macs(model, ex), count_macs(pruned, ex)
    assert after < before
    if arch == "resnet18":
        assert before / after >= 2.0  # measured 2.17x (rounding to 8 overshoots)
    elif arch == "shufflenet_v2":
        assert before / after > 1.5  # measured 1.78x (shuffled block outputs are kept)
    else:
        assert before / after > 2.5  # ratio 0.5 of in and out channels: measured ~3-4x
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())
    # kept conv widths are multiples of round_to (or untouched small groups)
    for m in pruned.modules():
        if isinstance(m, nn.Conv2d) and m.groups == 1 and m.out_channels != 10:
            orig = m.out_channels
            assert orig % 8 == 0 or orig <= 8 or orig in _widths(model), (arch, orig)
    src = {"kind": "module", "factory": f"{__name__}:_{arch}"}
    save_artifact(pruned, tmp_path / "art", recipe={}, source=src)
    reloaded = load(tmp_path / "art")
    with torch.no_grad():
        assert torch.equal(reloaded(x), pruned(x))


def _widths(model: nn.Module) -> set[int]:
    return {m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)}


class _Scale(nn.Module):
    """A custom layer holding its own per-channel parameter (not resizable by netpress)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.s = nn.Parameter(torch.ones(1, c, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.s


def _custom_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), _Scale(32),
        nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 5))


def test_unsupported_layer_names_it_and_ignore_fixes_it():
    torch.manual_seed(0)
    model = _custom_net().eval()
    data = [(torch.randn(2, 3, 16, 16),)]
    with pytest.raises(RecipeError) as err:
        prune(model, {"method": "structured", "ratio": 0.5}, data=data)
    assert "'3'" in str(err.value) and "ignore" in str(err.value)
    pruned = prune(model, {"method": "structured", "ratio": 0.5, "ignore": ["3"]}, data=data)
    assert pruned[0].out_channels == 32  # coupled to the ignored _Scale: kept
    assert pruned[4].out_channels == 16 and pruned[7].in_channels == 16
    assert pruned(data[0][0]).shape == (2, 5)


@pytest.mark.parametrize("importance", ["l1", "l2", "taylor", "bn_gamma"])
def test_importance_kinds_pick_channels(importance):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU(),
                        nn.Conv2d(16, 4, 1), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).eval()
    with torch.no_grad():  # channels 0..7 strong, 8..15 near zero in conv, BN and next conv
        net[0].weight[8:] *= 1e-3
        net[1].weight[8:] *= 1e-3
        net[3].weight[:, 8:] *= 1e-3
    ctx = StageContext(data=[Batch((torch.randn(4, 3, 8, 8),))])
    cfg = StructuredPruneConfig(ratio=0.5, importance=importance, round_to=8)
    out = prune_structured(net, cfg, ctx)
    assert out[0].out_channels == 8 and out[1].num_features == 8 and out[3].in_channels == 8
    assert ctx.report["structured"]["widths"]["0"] == 8
    # the strong channels survived: conv weights keep their large norm
    assert out[0].weight.abs().mean() > 1e-2


def test_kept_rounding_and_config_errors():
    assert kept(96, 0.5, 16, 0.9) == 48
    assert kept(100, 0.3, 8, 0.9) == 72
    assert kept(6, 0.5, 8, 0.9) == 6  # groups not larger than round_to stay
    assert StructuredPruneConfig(ratio=0.5).round_to == 16  # the default that fits the kernels
    with pytest.raises(RecipeError):
        parse_config("prune", {"method": "structured"})  # no budget
    with pytest.raises(RecipeError):
        parse_config("prune", {"method": "structured", "ratio": 0.5, "macs_reduction": 2})
    with pytest.raises(RecipeError):
        parse_config("prune", {"method": "structured", "macs_reduction": 0.5})
    with pytest.raises(DataError):
        prune(nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2)),
              {"method": "structured", "ratio": 0.5})


def test_bert_heads_and_neurons_reload(tmp_path):
    from transformers import BertConfig, BertModel

    from netpress.zoo.models import MiniLMEncoder

    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=128, vocab_size=100)
    cfg._attn_implementation = "eager"
    model = MiniLMEncoder(BertModel(cfg, add_pooling_layer=False)).eval()
    ids = torch.randint(0, 100, (2, 7))
    batch = Batch({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    pruned = prune(model, {"method": "structured", "ratio": 0.5, "round_to": 8}, data=[batch])
    att = pruned.bert.encoder.layer[0].attention.self
    assert att.num_attention_heads == 2 and att.all_head_size == 32
    assert pruned.bert.encoder.layer[1].intermediate.dense.out_features == 64
    ex = batch.slice(1)
    assert count_macs(model, ex) / count_macs(pruned, ex) > 1.9  # measured 2.0x
    out = batch.run(pruned)
    assert out.shape == (2, 7, 64)
    _FACTORY["model"] = (cfg,)
    save_artifact(pruned, tmp_path / "a", recipe={},
                  source={"kind": "module", "factory": f"{__name__}:_tiny_bert"})
    reloaded = load(tmp_path / "a")
    assert type(reloaded.bert.encoder.layer[0].attention.self).__name__ == \
        "PrunedBertSelfAttention"
    with torch.no_grad():
        assert torch.equal(batch.run(reloaded), out)


_FACTORY: dict[str, tuple] = {}


def _tiny_bert() -> nn.Module:
    from transformers import BertModel

    from netpress.zoo.models import MiniLMEncoder

    (cfg,) = _FACTORY["model"]
    return MiniLMEncoder(BertModel(cfg, add_pooling_layer=False))


# ------------------------------------------------------------- layouts the channel graph cannot cut
def _distilbert() -> nn.Module:
    from transformers import DistilBertConfig, DistilBertModel

    torch.manual_seed(0)
    cfg = DistilBertConfig(dim=64, n_layers=2, n_heads=4, hidden_dim=128, vocab_size=100)
    return DistilBertModel(cfg).eval()


def test_attention_outside_the_bert_layout_is_refused_and_ignoring_it_prunes_the_ffn_exactly():
    """DistilBERT's q/k/v would be cut channel by channel (n_heads fixed: wrong outputs); the
    error names the block class; ignoring it, the FFN loses its dead neurons with output kept."""
    model = _distilbert()
    ids = torch.randint(0, 100, (2, 9))
    data = [Batch({"input_ids": ids, "attention_mask": torch.ones_like(ids)})]
    with pytest.raises(RecipeError, match="transformer.layer.0.attention.*4 heads.*"
                       "add 'DistilBertSelfAttention' to `ignore`"):
        prune(model, {"method": "structured", "ratio": 0.5}, data=data)
    with torch.no_grad():  # half the FFN neurons dead: removing them changes nothing
        for layer in model.transformer.layer:
            layer.ffn.lin1.weight[64:] = 0.0
            layer.ffn.lin1.bias[64:] = 0.0
    pruned = prune(model, {"method": "structured", "ratio": 0.5, "round_to": 8,
                           "ignore": ["DistilBertSelfAttention"]}, data=data)
    for layer in pruned.transformer.layer:
        assert layer.ffn.lin1.out_features == 64 and layer.attention.q_lin.out_features == 64
    with torch.no_grad():
        diff = (pruned(input_ids=ids).last_hidden_state
                - model(input_ids=ids).last_hidden_state).abs().max()
    assert float(diff) < 1e-5  # measured 0.0 (BERT-layout check: 0.0 too)


class _Scaled(nn.Module):
    """A ConvNeXt-like block: conv -> MLP -> a per-channel ``layer_scale`` Parameter -> skip."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1, groups=c)
        self.mlp = nn.Sequential(nn.Conv2d(c, 4 * c, 1), nn.GELU(), nn.Conv2d(4 * c, c, 1))
        self.layer_scale = nn.Parameter(torch.full((c, 1, 1), 0.5))

    def forward(self, x):
        return x + self.layer_scale * self.mlp(self.conv(x))


def _scaled_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), _Scaled(16), _Scaled(16),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4)).eval()


def test_a_coupled_parameter_can_be_ignored_alone_so_its_block_still_shrinks(tmp_path):
    model, x = _scaled_net(), torch.randn(2, 3, 8, 8)
    with pytest.raises(RecipeError, match=r"add 're:\.\*\\\.layer_scale' to `ignore`"):
        prune(model, {"method": "structured", "ratio": 0.5}, data=[(x,)])
    pruned = prune(model, {"method": "structured", "ratio": 0.5, "round_to": 8,
                           "ignore": [r"re:.*\.layer_scale"]}, data=[(x,)])
    assert [b.mlp[0].out_channels for b in (pruned[1], pruned[2])] == [32, 32]  # MLPs: 64 -> 32
    assert pruned[1].conv.out_channels == 16  # the scaled residual stream keeps its width
    save_artifact(pruned, tmp_path / "a", recipe={}, source={
        "kind": "module", "factory": f"{__name__}:_scaled_net"})
    with torch.no_grad():
        assert torch.equal(load(tmp_path / "a")(x), pruned(x))


def _mnasnet() -> nn.Module:
    return torchvision.models.mnasnet0_5(num_classes=10)


@pytest.mark.real
def test_swin_and_mnasnet_prune_and_reload(tmp_path):
    """Swin-T: the window attention is refused by class, and with it ignored the MLPs shrink
    (the residual stream's group search, which grew past 23 GB of RSS, is cut off and kept);
    MNASNet: the artifact restores its module version metadata and reloads."""
    x = torch.randn(1, 3, 64, 64)
    swin = torchvision.models.swin_t(num_classes=10).eval()
    with pytest.raises(RecipeError, match="ShiftedWindowAttention"):
        prune(swin, {"method": "structured", "ratio": 0.5}, data=[(x,)])
    pruned = prune(swin, {"method": "structured", "ratio": 0.5,
                          "ignore": ["ShiftedWindowAttention"]}, data=[(x,)])
    ex = Batch((x,))
    assert count_macs(swin, ex) / count_macs(pruned, ex) > 1.1  # measured 1.17x: MLPs only
    mnas = _mnasnet().eval()
    small = prune(mnas, {"method": "structured", "ratio": 0.5, "round_to": 8}, data=[(x,)])
    save_artifact(small, tmp_path / "m", recipe={}, source={
        "kind": "module", "factory": f"{__name__}:_mnasnet"})
    with torch.no_grad():
        assert torch.equal(load(tmp_path / "m")(x), small(x))
