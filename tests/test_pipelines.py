"""A4 pipelines: prune -> distill -> quantize, Deep Compression (weight sharing + entropy coding),
distill + quantize; the example recipes validate; artifacts reload."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn as nn

from netpress.api import apply
from netpress.core.errors import RecipeError
from netpress.core.recipe import Recipe
from netpress.export.artifact import load, save_artifact
from netpress.nn.shared import SharedConv, SharedLinear, decode_indices, encode_indices

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.yaml"))


pytestmark = pytest.mark.usefixtures("one_thread")


def mlp():
    return nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 3))


def cnn():
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Flatten(), nn.Linear(8 * 6 * 6, 3))


def _source(fn):
    return {"kind": "module", "factory": f"{fn.__module__}:{fn.__qualname__}"}


def _data(n=256):
    g = torch.Generator().manual_seed(0)
    X = torch.randn(n, 16, generator=g)
    return X, (X[:, 0] > 0).long() + (X[:, 1] > 0.5).long()


def _trained():
    X, y = _data()
    torch.manual_seed(0)
    m = mlp()
    from netpress.core.data import as_batches
    from netpress.train import TrainConfig, fine_tune

    fine_tune(m, as_batches((X, y), 32), TrainConfig(epochs=15, lr=0.01))
    return m, X, y


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_recipes_validate(path):
    recipe = Recipe.load(path)
    assert recipe.stages or recipe.plan is not None  # a plan: recipe lets the planner pick the stages


def test_entropy_coding_round_trip_and_gain():
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(1, 32, (5000,), generator=g).to(torch.uint8)
    codes[torch.rand(5000, generator=g) < 0.9] = 0  # 90 % pruned
    data, codec = encode_indices(codes.numpy())
    assert (decode_indices(data, codec, 5000) == codes.numpy()).all()
    assert len(data) < 5000 * 5 / 8 / 2  # < half of 5-bit packing; measured ~1000 B vs 3125 B


def test_arithmetic_coder_round_trip_near_entropy():
    import numpy as np

    from netpress.nn.shared import arith_decode, arith_encode

    rng = np.random.default_rng(0)
    for n in (0, 1, 3000):
        codes = rng.integers(1, 32, n).astype(np.uint8)
        codes[rng.random(n) < 0.9] = 0
        data = arith_encode(codes, 32)
        assert (arith_decode(data, 32, n) == codes).all()
    # order-0 entropy of this stream: H(0.9 zeros) + 0.1 * log2(31) = 0.96 bits -> 360 bytes
    assert len(data) < 420  # measured 371 bytes


def test_entropy_code_after_weight_only_qat_is_exact(tmp_path):
    pytest.importorskip("netpress.nn.qat")
    from netpress.core.config import get_technique

    try:
        get_technique("quantize", "qat")
    except RecipeError:
        pytest.skip("quantize: {method: qat} is not registered in this checkout")
    model, X, y = _trained()
    p = apply("prune", model, {"method": "magnitude", "sparsity": 0.8})
    q = apply("quantize", p, {"method": "qat", "weights": {"bits": 4}, "activations": None,
                              "finetune": {"epochs": 1}}, data=(X, y))
    e = apply("quantize", q, {"method": "entropy_code"})
    assert isinstance(e[0], SharedLinear) and e[0].channel_scale
    assert torch.equal(e(X), q(X))  # same integer codes and scales: bit-identical outputs
    save_artifact(q, tmp_path / "q", source=_source(mlp), recipe={})
    save_artifact(e, tmp_path / "e", source=_source(mlp), recipe={})
    qb = (tmp_path / "q" / "model.safetensors").stat().st_size
    eb = (tmp_path / "e" / "model.safetensors").stat().st_size
    assert eb < 0.75 * qb  # measured ~0.6 (packed int4 vs coded int4 codes)
    assert torch.equal(load(tmp_path / "e")(X), e(X))
    qa = apply("quantize", p, {"method": "qat", "weights": {"bits": 4}, "finetune": {"epochs": 1}},
               data=(X, y))
    with pytest.raises(RecipeError, match="activations: null"):
        apply("quantize", qa, {"method": "entropy_code"})


def test_deep_compression_pipeline_reloads_and_shrinks(tmp_path):
    model, X, y = _trained()
    pruned = apply("prune", model, {"method": "magnitude", "sparsity": 0.9, "scope": "global"})
    rec = apply("distill", pruned, {"method": "kd", "epochs": 3, "lr": 0.005, "teacher": "input"},
                data=(X, y))
    q = apply("quantize", rec, {"method": "weight_sharing", "bits": 5})
    assert all(isinstance(q[i], SharedLinear) for i in (0, 2, 4))
    assert all(len(q[i].weight.unique()) <= 32 for i in (0, 2, 4))
    # sparsity survives sharing: index 0 is the exact zero
    assert float((q[2].weight == 0).float().mean()) >= 0.85
    save_artifact(model, tmp_path / "fp32", source=_source(mlp), recipe={})
    save_artifact(q, tmp_path / "dc", source=_source(mlp), recipe={})
    fp32 = (tmp_path / "fp32" / "model.safetensors").stat().st_size
    dc = (tmp_path / "dc" / "model.safetensors").stat().st_size
    assert fp32 / dc > 8  # measured 10.1x on this 3.3k-weight MLP (the JSON header dominates)
    back = load(tmp_path / "dc")
    assert torch.equal(back(X), q(X))
    agree = float((q(X).argmax(1) == model(X).argmax(1)).float().mean())
    assert agree > 0.75  # measured 0.82 (90 % sparse, 3 KD epochs, 5-bit codebook)


def test_weight_sharing_folds_bn_and_reloads_conv(tmp_path):
    torch.manual_seed(0)
    m = cnn().eval()
    with torch.no_grad():
        m[1].running_mean.uniform_(-0.5, 0.5)
        m[1].running_var.uniform_(0.5, 2.0)
    x = torch.randn(4, 1, 6, 6)
    q = apply("quantize", m, {"method": "weight_sharing", "bits": 6})
    assert isinstance(q[0], SharedConv) and isinstance(q[1], nn.Identity)
    rel = float((q(x) - m(x)).norm() / m(x).norm())
    assert rel < 0.05  # measured ~0.01 (6-bit codebook on folded weights)
    save_artifact(q, tmp_path / "a", source=_source(cnn), recipe={})
    assert torch.equal(load(tmp_path / "a")(x), q(x))


def test_prune_distill_quantize_pipeline(tmp_path):
    model, X, y = _trained()
    pruned = apply("prune", model, {"method": "magnitude", "sparsity": 0.7})
    rec = apply("distill", pruned, {"method": "kd", "epochs": 3, "lr": 0.005, "teacher": "input"},
                data=(X, y))
    q = apply("quantize", rec, {"method": "int8_weight", "bits": 8})
    agree = float((q(X).argmax(1) == model(X).argmax(1)).float().mean())
    assert agree > 0.85  # measured 0.95
    save_artifact(q, tmp_path / "q", source=_source(mlp), recipe={})
    assert torch.allclose(load(tmp_path / "q")(X), q(X))


def test_distill_then_quantize_derived_student(tmp_path):
    model, X, y = _trained()
    student = apply("distill", model, {"method": "kd", "teacher": "input", "epochs": 5, "lr": 0.01,
                                       "student": {"derive": {"width": 0.5}}}, data=(X, y))
    q = apply("quantize", student, {"method": "weight_sharing", "bits": 5})
    assert q[0].out_features == 32
    agree = float((q(X).argmax(1) == model(X).argmax(1)).float().mean())
    assert agree > 0.6  # measured 0.69 (5 epochs from scratch, half width)


@pytest.mark.real
def test_deep_compression_recipe_on_digits_cnn(tmp_path):
    import netpress

    recipe = Recipe.load(EXAMPLES[[p.stem for p in EXAMPLES].index("deep_compression")]).to_dict()
    recipe["stages"][1]["distill"]["epochs"] = 2
    recipe["export"] = ["artifact"]
    result = netpress.compress(recipe, out=tmp_path / "out")
    m = result.metrics
    assert m["ratios"]["size"] > 20  # measured ~40x with 15 epochs; 2 epochs here
    assert m["original"]["metric"] - m["compressed"]["metric"] < 0.03
    back = netpress.load(tmp_path / "out")
    assert isinstance(back[0], SharedConv)


@pytest.mark.real
@pytest.mark.parametrize("stage, op", [
    ({"method": "rtn", "weights": {"bits": 4, "group_size": 32}}, "com.microsoft:MatMulNBits"),
    ({"method": "dynamic"}, "com.microsoft:DynamicQuantizeMatMul"),
])
def test_recipe_onnx_of_dynamic_and_weight_only_runs_integer_kernels(stage, op, tmp_path):
    """The run measures and exports the integer / low-bit graph, not a float imitation."""
    import onnx

    import netpress

    recipe = {"model": "zoo:digits_cnn", "data": "zoo:digits", "metric": "accuracy",
              "runtime": "onnxruntime", "stages": [{"quantize": stage}],
              "export": ["artifact", "onnx"]}
    result = netpress.compress(recipe, out=tmp_path / "out")
    graph = onnx.load(str(tmp_path / "out" / "model.onnx")).graph
    ops = [f"{n.domain}:{n.op_type}" for n in graph.node]
    assert ops.count(op) == 1 and ":Gemm" not in ops and ":MatMul" not in ops  # the one Linear
    m = result.metrics
    assert m["original"]["metric"] - m["compressed"]["metric"] < 0.02  # measured +0.00 / -0.19 pt
    assert result.notes["onnx_max_abs_diff"] < 0.25


@pytest.mark.real
def test_recipe_distills_into_a_student_the_user_gives(tmp_path):
    """D3 from a recipe: ``student: {model: student.pt2}``; the artifact rebuilds the student."""
    import netpress
    from netpress.core.config import parse_config
    from netpress.core.errors import RecipeError

    student = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                            nn.Flatten(), nn.Linear(8 * 4 * 4, 10)).eval()
    torch.export.save(torch.export.export(student, (torch.zeros(2, 1, 8, 8),), dynamic_shapes=(
        {0: torch.export.Dim.AUTO},)), tmp_path / "student.pt2")
    stage = {"method": "kd", "teacher": "original", "epochs": 4, "lr": 0.01,
             "student": {"model": str(tmp_path / "student.pt2")}}
    recipe = {"model": "zoo:digits_cnn", "data": "zoo:digits", "metric": "accuracy",
              "stages": [{"distill": stage}], "export": ["artifact"]}
    result = netpress.compress(recipe, out=tmp_path / "out")
    m = result.metrics
    assert m["compressed"]["params"] == 1370 and m["original"]["params"] == 26090
    assert m["compressed"]["metric"] > 0.9  # measured 0.95 after 4 epochs (0.96 after 8)
    back = netpress.load(tmp_path / "out")
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(back(x), result.model(x))
    with pytest.raises(RecipeError, match="Fix: give either derive or model"):
        parse_config("distill", {"method": "kd", "student": {"model": "s.pt2", "derive": {}}})
    with pytest.raises(RecipeError, match="Fix: no file 'nope.pt2': give a .pt2 program or zoo:NAME"):
        parse_config("distill", {"method": "kd", "student": {"model": "nope.pt2"}})


def test_bench_distill_helpers():
    from netpress.bench.distill import _rebatch, _recovered
    from netpress.core.data import as_batches

    X, y = torch.randn(70, 4), torch.arange(70) % 3
    big = _rebatch(as_batches((X, y), batch_size=32), 64)
    assert [b.size for b in big] == [64, 6]
    assert torch.equal(torch.cat([b.inputs[0] for b in big]), X)
    assert torch.equal(torch.cat([b.target for b in big]), y)
    assert _recovered(0.97, 0.95, 0.975) == "80%"
    assert _recovered(0.97, 0.98, 0.975).startswith("n/a")
