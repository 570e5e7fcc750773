"""The artifact: safetensors + manifest, sparse storage, exact reload, tamper detection, no pickle."""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import netpress.zoo
from netpress.api import prune as apply_prune
from netpress.api import quantize as apply_quantize
from netpress.core.errors import ArtifactError, ModelError
from netpress.export.artifact import (
    encode_tensors,
    load,
    load_model_file,
    read_manifest,
    save_artifact,
)
from netpress.export.modelfile import _no_pickle
from netpress.nn import QuantConv2d, QuantLinear


# ------------------------------------------------------------------------- factories (importable)
class DigitsNet(nn.Module):
    """Digits-sized CNN + MLP: (B, 1, 8, 8) -> (B, 10), ~25 k parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16),
                                      nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2, padding=1),
                                      nn.ReLU())
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(32 * 16, 40), nn.ReLU(),
                                        nn.Linear(40, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def digits_net() -> nn.Module:
    return DigitsNet()


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.out = nn.Linear(8, 20, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.out(self.emb(ids))


class Custom(nn.Module):
    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.w


def factory(fn: object) -> dict[str, str]:
    return {"kind": "module", "factory": f"{fn.__module__}:{fn.__qualname__}"}  # type: ignore


SOURCE = factory(digits_net)
RECIPE = {"model": "test", "stages": [{"prune": {"method": "magnitude", "sparsity": 0.9}}]}


@pytest.fixture
def model() -> nn.Module:
    torch.manual_seed(0)
    m = DigitsNet()
    with torch.no_grad():  # non-trivial BN statistics so they must round-trip too
        m.features[1].running_mean.uniform_(-1, 1)
        m.features[1].running_var.uniform_(0.5, 2)
    return m.eval()


@pytest.fixture
def x() -> torch.Tensor:
    return torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(5))


def file_bytes(d: Path, name: str = "model.safetensors") -> int:
    return (d / name).stat().st_size


# --------------------------------------------------------------------------------- round trips
def test_plain_model_reloads_exactly(model: nn.Module, x: torch.Tensor, tmp_path: Path) -> None:
    manifest = save_artifact(model, tmp_path / "a", source=SOURCE, recipe=RECIPE,
                             metrics={"accuracy": 0.97, "nan": float("nan")})
    loaded = load(tmp_path / "a")
    assert type(loaded) is DigitsNet and not loaded.training
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert manifest["modules"] == {} and manifest["metrics"] == {"accuracy": 0.97, "nan": None}
    encodings = {k: e["encoding"] for k, e in manifest["tensors"].items()}
    assert encodings.pop("features.1.bias") == "bitmask"  # BN bias: all zeros, stored as 2 bytes
    assert set(encodings.values()) == {"dense"}
    on_disk = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert on_disk == manifest == read_manifest(tmp_path / "a")
    assert on_disk["format"] == "netpress-artifact" and on_disk["recipe"] == RECIPE
    assert set(on_disk["versions"]) == {"python", "torch", "torchvision", "onnx", "onnxruntime",
                                        "safetensors", "numpy"}
    assert set(on_disk["files"]) == {"model.safetensors"}
    assert on_disk["files"]["model.safetensors"]["bytes"] == file_bytes(tmp_path / "a")


def test_pruned_model_is_stored_sparse_and_reloads_exactly(model: nn.Module, x: torch.Tensor,
                                                           tmp_path: Path) -> None:
    save_artifact(model, tmp_path / "dense", source=SOURCE, recipe={})
    sizes = {}
    for p in (0.5, 0.8, 0.9, 0.95):
        pruned = apply_prune(model, {"method": "magnitude", "sparsity": p, "scope": "global"})
        manifest = save_artifact(pruned, tmp_path / str(p), source=SOURCE, recipe={})
        sizes[p] = file_bytes(tmp_path / str(p))
        entry = manifest["tensors"]["classifier.1.weight"]
        assert entry["encoding"] == "bitmask" and entry["shape"] == [40, 512]
        loaded = load(tmp_path / str(p))
        for key, t in pruned.state_dict().items():
            assert torch.equal(loaded.state_dict()[key], t), key
        with torch.no_grad():
            assert torch.equal(loaded(x), pruned(x))
    dense = file_bytes(tmp_path / "dense")
    # measured: dense 104,266 B; 50 % 56,504; 80 % 25,768; 90 % 15,526 (0.149); 95 % 10,382
    assert sizes[0.5] < 0.62 * dense and sizes[0.8] < sizes[0.5] and sizes[0.95] < sizes[0.9]
    assert sizes[0.9] <= 0.20 * dense


def test_sparse_break_even() -> None:
    dense = torch.arange(1.0, 101.0)  # no zeros
    few = dense.clone()
    few[:12] = 0  # 12 % zeros: bitmask would save < 10 %
    many = dense.clone()
    many[:14] = 0  # 14 % zeros: saves > 10 %
    _, entries = encode_tensors({"a": dense, "b": few, "c": many,
                                 "i": torch.zeros(64, dtype=torch.int8), "s": torch.tensor(0.0)})
    assert [entries[k]["encoding"] for k in "abcis"] == ["dense", "dense", "bitmask", "bitmask",
                                                         "dense"]
    assert entries["i"]["nnz"] == 0


def test_int8_model_reloads_exactly(model: nn.Module, x: torch.Tensor, tmp_path: Path) -> None:
    q = apply_quantize(apply_prune(model, {"method": "magnitude", "sparsity": 0.5}),
                       {"method": "int8_weight", "symmetric": False})
    manifest = save_artifact(q, tmp_path / "q", source=SOURCE, recipe={})
    assert manifest["modules"]["classifier.1"] == {
        "class": "netpress.nn.QuantLinear",
        "kwargs": {"in_features": 512, "out_features": 40, "bias": True, "bits": 8,
                   "symmetric": False, "granularity": "per_channel"}}
    # features.1 is the BatchNorm int8_weight folded into features.0 (now an Identity)
    assert set(manifest["modules"]) == {"features.0", "features.1", "features.3", "classifier.1",
                                        "classifier.3"}
    loaded = load(tmp_path / "q")
    assert isinstance(loaded.features[3], QuantConv2d) and isinstance(loaded.classifier[3],
                                                                       QuantLinear)
    assert loaded.classifier[1].qweight.dtype == torch.int8
    with torch.no_grad():
        assert torch.equal(loaded(x), q(x))


def test_changed_architecture_is_rebuilt_from_specs(model: nn.Module, x: torch.Tensor,
                                                    tmp_path: Path) -> None:
    with torch.no_grad():  # structured-pruning-like shape change + low-rank-like replacement
        model.classifier[1] = nn.Linear(512, 24)
        model.classifier[3] = nn.Linear(24, 10)
        model.features[3] = nn.Sequential(nn.Conv2d(16, 4, 1, bias=False),
                                          nn.Conv2d(4, 32, 3, stride=2, padding=1))
    manifest = save_artifact(model, tmp_path / "s", source=SOURCE, recipe={})
    assert set(manifest["modules"]) == {"classifier.1", "classifier.3", "features.3"}
    assert manifest["modules"]["features.3"]["class"] == "torch.nn.Sequential"
    with torch.no_grad():
        assert torch.equal(load(tmp_path / "s")(x), model(x))


def test_half_precision_model_keeps_its_dtype(model: nn.Module, x: torch.Tensor,
                                               tmp_path: Path) -> None:
    half = model.half()
    manifest = save_artifact(half, tmp_path / "h", source=SOURCE, recipe={})
    assert manifest["tensors"]["classifier.1.weight"]["dtype"] == "float16"
    loaded = load(tmp_path / "h")
    assert loaded.classifier[1].weight.dtype == torch.float16
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in half.state_dict().items())


def test_unserializable_change_is_refused(model: nn.Module, tmp_path: Path) -> None:
    model.classifier[3] = Custom()
    with pytest.raises(ModelError, match=r"classifier\.3.*Custom.*serializable"):
        save_artifact(model, tmp_path / "c", source=SOURCE, recipe={})


def test_tied_weights_are_stored_once_and_stay_tied(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Tied().eval()
    manifest = save_artifact(model, tmp_path / "t", source=factory(Tied), recipe={})
    assert manifest["tensors"]["out.weight"] == {"dtype": "float32", "shape": [20, 8],
                                                 "encoding": "alias", "of": "emb.weight"}
    loaded = load(tmp_path / "t")
    ids = torch.tensor([[1, 2, 3]])
    assert torch.equal(loaded(ids), model(ids))
    assert loaded.out.weight.data_ptr() == loaded.emb.weight.data_ptr()


def test_zoo_source_uses_build_architecture(model: nn.Module, x: torch.Tensor, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(netpress.zoo, "build_architecture",
                        lambda name: {"digits_net": DigitsNet}[name](), raising=False)
    q = apply_quantize(model, {"method": "int8_weight", "ignore": ["re:features.*"]})
    save_artifact(q, tmp_path / "z", source={"kind": "zoo", "name": "digits_net"}, recipe={})
    with torch.no_grad():
        assert torch.equal(load(tmp_path / "z")(x), q(x))


def test_export_source_round_trips(model: nn.Module, x: torch.Tensor, tmp_path: Path) -> None:
    pruned = apply_prune(model, {"method": "magnitude", "sparsity": 0.7})
    manifest = save_artifact(pruned, tmp_path / "e", source={"kind": "export"}, recipe={},
                             example=(x[:1],))
    assert manifest["source"] == {"kind": "export", "file": "program.pt2"}
    assert set(manifest["files"]) == {"model.safetensors", "program.pt2"}
    loaded = load(tmp_path / "e")
    with torch.no_grad():
        assert torch.equal(loaded(x), pruned(x))
    with pytest.raises(ArtifactError, match="example"):
        save_artifact(pruned, tmp_path / "e2", source={"kind": "export"}, recipe={})


def test_extra_files_are_hashed(model: nn.Module, tmp_path: Path) -> None:
    out = tmp_path / "x"
    out.mkdir()
    (out / "metrics.json").write_text('{"a": 1}')
    outside = tmp_path / "report.html"
    outside.write_text("<html></html>")
    manifest = save_artifact(model, out, source=SOURCE, recipe={},
                             extra_files=["metrics.json", outside])
    assert set(manifest["files"]) == {"metrics.json", "model.safetensors", "report.html"}
    assert (out / "report.html").read_text() == "<html></html>"
    (out / "metrics.json").write_text('{"a": 2}')
    with pytest.raises(ArtifactError, match="metrics.json"):
        load(out)


# ----------------------------------------------------------------------------------- tampering
@pytest.fixture
def saved(model: nn.Module, tmp_path: Path) -> Path:
    save_artifact(apply_prune(model, {"method": "magnitude", "sparsity": 0.5}), tmp_path / "art",
                  source=SOURCE, recipe=RECIPE, metrics={"accuracy": 0.9})
    return tmp_path / "art"


def test_flipped_byte_is_detected(saved: Path) -> None:
    path = saved / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"model\.safetensors.*SHA-256"):
        load(saved)


def test_truncated_file_is_detected(saved: Path) -> None:
    path = saved / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ArtifactError, match=r"model\.safetensors.*truncated"):
        load(saved)


def test_missing_file_is_detected(saved: Path) -> None:
    (saved / "model.safetensors").unlink()
    with pytest.raises(ArtifactError, match=r"model\.safetensors.*no such file"):
        load(saved)
    (saved / "manifest.json").unlink()
    with pytest.raises(ArtifactError, match=r"manifest\.json"):
        load(saved)


@pytest.mark.parametrize("edit", [
    lambda m: m["metrics"].update(accuracy=0.99),
    lambda m: m["tensors"]["classifier.1.weight"].update(encoding="dense"),
    lambda m: m["source"].update(factory="os:getcwd"),
])
def test_edited_manifest_is_detected(saved: Path, edit) -> None:
    path = saved / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest, indent=2, sort_keys=True))
    with pytest.raises(ArtifactError, match=r"manifest\.json.*edited"):
        load(saved)
    path.write_text("{not json")
    with pytest.raises(ArtifactError, match="invalid JSON"):
        load(saved)


def test_refused_factories(model: nn.Module, tmp_path: Path) -> None:
    for bad in ("os:getcwd", "builtins:print", "nomodule_xyz:f", "no-colon", "torch:tensor"):
        with pytest.raises(ArtifactError, match="source"):
            save_artifact(model, tmp_path / "f", source={"kind": "module", "factory": bad},
                          recipe={})
    for bad in ({"kind": "hf"}, {"kind": "zoo"}, {"kind": "zoo", "name": "a", "x": 1},
                {"kind": "export", "file": "../evil.pt2"}):
        with pytest.raises(ArtifactError, match="source"):
            save_artifact(model, tmp_path / "g", source=bad, recipe={})


# ------------------------------------------------------------------------------- no pickle, ever
def test_pickled_model_is_refused(model: nn.Module, tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    torch.save(model, path)  # a whole pickled nn.Module
    with pytest.raises(ModelError, match=r"model\.pt.*pickle"):
        load_model_file(path)
    with pytest.raises(ModelError, match="pkl"):
        load_model_file(tmp_path / "model.pkl")


def test_state_dicts_and_pt2_are_accepted(model: nn.Module, x: torch.Tensor,
                                          tmp_path: Path) -> None:
    torch.save(model.state_dict(), tmp_path / "sd.pth")
    state = load_model_file(tmp_path / "sd.pth")
    assert isinstance(state, dict) and torch.equal(state["classifier.3.bias"],
                                                   model.classifier[3].bias)
    program = torch.export.export(model, (x[:2],),
                                  dynamic_shapes=({0: torch.export.Dim.AUTO},))
    torch.export.save(program, tmp_path / "m.pt2")
    loaded = load_model_file(tmp_path / "m.pt2")
    assert isinstance(loaded, nn.Module)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_pt2_loading_refuses_every_unpickling_path(model: nn.Module) -> None:
    buf = io.BytesIO()
    torch.save(model, buf)  # a pickled module, as a malicious .pt2 weight entry would be
    real_load = torch.load
    with _no_pickle():
        with pytest.raises(pickle.UnpicklingError):
            torch.load(io.BytesIO(buf.getvalue()), weights_only=False)
        with pytest.raises(pickle.UnpicklingError):
            torch._C._pickle_load_obj(b"")
    assert torch.load is real_load  # restored


def test_pt2_model_pruned_by_name_round_trips(model: nn.Module, x: torch.Tensor,
                                              tmp_path: Path) -> None:
    torch.export.save(torch.export.export(model, (x,), dynamic_shapes=(
        {0: torch.export.Dim.AUTO},)), tmp_path / "m.pt2")
    program = load_model_file(tmp_path / "m.pt2")  # a GraphModule
    pruned = apply_prune(program, {"method": "magnitude", "sparsity": 0.8,
                                   "targets": ["classifier.1", "features.3"]})
    assert int((pruned.get_submodule("classifier.1").weight == 0).sum()) == 16384
    manifest = save_artifact(pruned, tmp_path / "a", source={"kind": "export"}, recipe={})
    assert manifest["tensors"]["classifier.1.weight"]["encoding"] == "bitmask"
    with torch.no_grad():
        assert torch.equal(load(tmp_path / "a")(x), pruned(x))


def test_pt2_layers_are_lifted_so_quantizers_find_them(model: nn.Module, x: torch.Tensor,
                                                       tmp_path: Path) -> None:
    """A .pt2 program calls aten.conv2d / aten.linear: they come back as Conv2d / Linear."""
    torch.export.save(torch.export.export(model, (x,), dynamic_shapes=(
        {0: torch.export.Dim.AUTO},)), tmp_path / "m.pt2")
    program = load_model_file(tmp_path / "m.pt2")
    kinds = {n: type(m).__name__ for n, m in program.named_modules() if n and n != "_guards_fn"}
    assert {kinds[n] for n in ("features.0", "features.3")} == {"Conv2d"}
    assert kinds["features.1"] == "BatchNorm2d"  # eval-mode batch_norm calls too
    assert {kinds[n] for n in ("classifier.1", "classifier.3")} == {"Linear"}
    program.eval()  # torch's program modules refuse eval(); the loaded one only sets the flag
    with torch.no_grad():
        assert torch.equal(program(x), model(x))
    import copy

    from netpress.quantize.fold import fold_batchnorm

    folded = copy.deepcopy(program)
    assert fold_batchnorm(folded) == ["features.0"]  # conv -> BN in the graph
    assert type(folded.get_submodule("features.1")).__name__ == "Identity"
    with torch.no_grad():
        assert torch.allclose(folded(x), model(x), atol=1e-5)
    report: dict = {}
    q = apply_quantize(program, {"method": "ptq"}, data=(x,), report=report)
    assert report["ptq"]["quantized"] == ["classifier.1", "classifier.3", "features.0",
                                          "features.3"]
    assert report["ptq"]["folded_bn"] == ["features.0"]  # conv -> BN folded in the graph
    assert report["float_layers"] == {}
    save_artifact(q, tmp_path / "q", source={"kind": "export"}, recipe={})
    with torch.no_grad():
        assert torch.allclose(load(tmp_path / "q")(x), q(x), atol=1e-5)


def test_pt2_with_a_fixed_batch_is_refused_with_the_fix(model: nn.Module, x: torch.Tensor,
                                                        tmp_path: Path) -> None:
    torch.export.save(torch.export.export(model, (x,)), tmp_path / "fixed.pt2")
    with pytest.raises(ModelError, match=r"fixed batch size \(x\[\d+\]\).*Dim.AUTO"):
        load_model_file(tmp_path / "fixed.pt2")


# ------------------------------------------------------------------------------- determinism
def test_saves_are_byte_identical(model: nn.Module, tmp_path: Path) -> None:
    q = apply_quantize(apply_prune(model, {"method": "magnitude", "sparsity": 0.6}),
                       {"method": "int8_weight"})
    save_artifact(q, tmp_path / "a", source=SOURCE, recipe=RECIPE, metrics={"m": 1.0})
    save_artifact(q, tmp_path / "b", source=SOURCE, recipe=RECIPE, metrics={"m": 1.0})
    for name in ("model.safetensors", "manifest.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    before = (tmp_path / "a" / "manifest.json").read_bytes()
    save_artifact(q, tmp_path / "a", source=SOURCE, recipe=RECIPE, metrics={"m": 1.0})
    assert (tmp_path / "a" / "manifest.json").read_bytes() == before
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["manifest.json",
                                                                 "model.safetensors"]
