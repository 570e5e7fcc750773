"""The CLI's error policy and the compress contract (DIR files, refusal, atomicity, reload)."""

from __future__ import annotations

import json
import pickle
import sys

import pytest
import torch

import netpress
from netpress import cli

DIGITS = {
    "model": "zoo:digits_cnn",
    "data": "zoo:digits",
    "metric": "accuracy",
    "stages": [
        {"prune": {"method": "magnitude", "sparsity": 0.5, "scope": "global"}},
        {"quantize": {"method": "int8_weight", "bits": 8, "granularity": "per_channel"}},
    ],
    "export": ["artifact", "onnx"],
    "runtime": "onnxruntime",
}


def run_cli(monkeypatch, capsys, *args):
    monkeypatch.setattr(sys, "argv", ["netpress", *args])
    code = 0
    try:
        cli.main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out = capsys.readouterr()
    return code, out.out, out.err


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return p


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("model: zoo:digits_cnn\nstages: [\n", "malformed YAML"),
        ("model: zoo:digits_cnn\nstages:\n  - prune: {method: shrink}\n", "magnitude"),
        ("model: zoo:digits_cnn\nbogus: 1\n", "bogus"),
        ("model: zoo:digits_cnn\nthreads: many\n", "threads"),
        ("model: /no/such/model.pt2\ndata: zoo:digits\n", "no such file"),
    ],
)
def test_bad_recipes_exit_2_without_traceback(tmp_path, monkeypatch, capsys, text, needle):
    recipe = write(tmp_path, "r.yaml", text)
    out = tmp_path / "out"
    code, _, err = run_cli(monkeypatch, capsys, "compress", str(recipe), "--out", str(out))
    assert code == 2
    assert needle in err and "Fix:" in err
    assert "Traceback" not in err
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml"]


def test_pickle_model_is_refused(tmp_path, monkeypatch, capsys):
    evil = tmp_path / "model.pt"
    evil.write_bytes(pickle.dumps({"not": "weights"}))
    recipe = write(tmp_path, "r.yaml", f"model: {evil}\ndata: zoo:digits\n")
    code, _, err = run_cli(monkeypatch, capsys, "compress", str(recipe), "--out",
                           str(tmp_path / "out"))
    assert code == 2
    assert "pickle" in err.lower() and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_techniques_lists_methods(monkeypatch, capsys):
    code, out, _ = run_cli(monkeypatch, capsys, "techniques")
    assert code == 0
    assert "magnitude" in out and "int8_weight" in out


def test_unknown_bench_suite(monkeypatch, capsys, tmp_path):
    code, _, err = run_cli(monkeypatch, capsys, "bench", "nope", "--out", str(tmp_path / "b.json"))
    assert code == 2 and "magnitude" in err


def test_bench_without_its_peer_toolkit_says_how_to_install_it(monkeypatch, capsys, tmp_path):
    from netpress import bench

    def needs_peer(quick: bool) -> list:
        import netpress_absent_peer  # noqa: F401  (stands in for nncf)
        return []

    monkeypatch.setattr(sys.modules[__name__], "needs_peer", needs_peer, raising=False)
    monkeypatch.setitem(bench.SUITES, "peer_probe", [f"{__name__}:needs_peer"])
    out = tmp_path / "b.json"
    code, _, err = run_cli(monkeypatch, capsys, "bench", "peer_probe", "--out", str(out))
    assert code == 2 and "internal error" not in err
    assert "netpress_absent_peer" in err and "scripts/install --bench" in err
    assert not out.exists() and not list(tmp_path.iterdir())  # nothing half-written


@pytest.mark.real
def test_compress_writes_dir_and_reloads_exactly(tmp_path, monkeypatch, capsys):
    recipe = write(tmp_path, "r.json", json.dumps(DIGITS))
    out = tmp_path / "out"
    code, stdout, err = run_cli(monkeypatch, capsys, "compress", str(recipe), "--out", str(out))
    assert code == 0, err
    assert {"manifest.json", "model.safetensors", "metrics.json", "report.html",
            "model.onnx"} <= {p.name for p in out.iterdir()}
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"model", "recipe", "runtime", "threads", "batch", "metric_name",
                            "original", "compressed", "ratios", "compress_seconds"}
    assert set(metrics["compressed"]) == {"params", "nonzero_params", "macs", "size_bytes",
                                          "latency_ms", "metric"}
    # 50% sparse + int8 codes: the artifact is several times smaller than fp32 (measured ~5.9x)
    assert metrics["ratios"]["size"] > 3.0
    assert metrics["compressed"]["nonzero_params"] < 0.6 * metrics["original"]["nonzero_params"]
    # accuracy within 2 points of the dense model (measured: 0.0 drop)
    assert metrics["original"]["metric"] - metrics["compressed"]["metric"] < 0.02
    assert "data:image/png;base64," in (out / "report.html").read_text()

    # reload reproduces the compressed model's outputs exactly
    from netpress import zoo

    bundle = zoo.load_data("digits")
    x = bundle.evaluation[0].inputs[0]
    reloaded = netpress.load(out)
    direct = netpress.compress(DIGITS).model
    with torch.inference_mode():
        assert torch.equal(reloaded(x), direct(x))

    # an existing DIR is refused and left untouched
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    code, _, err = run_cli(monkeypatch, capsys, "compress", str(recipe), "--out", str(out))
    assert code == 2 and "--force" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before

    # evaluate and inspect work on the artifact
    code, stdout, err = run_cli(monkeypatch, capsys, "evaluate", str(out))
    assert code == 0, err
    assert abs(json.loads(stdout)["metric"] - metrics["compressed"]["metric"]) < 1e-9
    code, stdout, _ = run_cli(monkeypatch, capsys, "inspect", str(out))
    assert code == 0 and "model.safetensors" in stdout


@pytest.mark.real
def test_failure_mid_run_leaves_no_dir(tmp_path, monkeypatch):
    from netpress import pipeline

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "write_json", boom)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        netpress.compress(DIGITS, out)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.real
def test_max_drop_fails_and_keeps_nothing(tmp_path):
    recipe = {**DIGITS, "stages": [{"prune": {"method": "magnitude", "sparsity": 0.99,
                                              "scope": "global"}}]}
    with pytest.raises(netpress.ConstraintError, match="dropped"):
        netpress.compress(recipe, tmp_path / "out", max_drop=0.01)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.real
def test_readme_recipe_runs(tmp_path):
    """The README's recipe block is a working recipe (its ``ignore`` once named no module of the
    model, which passed silently before unmatched patterns became errors)."""
    import re
    from pathlib import Path

    import yaml

    text = (Path(__file__).parents[1] / "README.md").read_text()
    block = re.search(r"```yaml\n# recipe.yaml\n(.*?)```", text, re.S)
    assert block, "the README lost its recipe block"
    recipe = {**yaml.safe_load(block.group(1)), "eval_limit": 64, "export": ["artifact"]}
    netpress.compress(recipe, tmp_path / "out")
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["ratios"]["size"] > 2.0  # pruned + int8, the classifier kept dense
