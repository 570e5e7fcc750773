"""Tamper evidence: flipped bytes, truncations, missing/added files and tensors, edited manifests
of a real artifact (all five files): ``ArtifactError`` on load, never a model.

Example:
    >>> from netpress.reliability.tamper import run_tamper  # doctest: +SKIP
    >>> run_tamper(full=False).failures  # doctest: +SKIP
    []
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from netpress.reliability.common import BASE_RECIPE, Section

ARTIFACT_FILES = ("model.safetensors", "manifest.json", "metrics.json", "report.html", "model.onnx")


def build_artifact(out: Path) -> Path:
    """A real artifact with all five files: the digits CNN architecture (random weights, no
    training), magnitude-pruned and int8-quantized, ONNX-exported, with metrics and a report."""
    import torch

    import netpress
    from netpress.core.data import Batch
    from netpress.export.artifact import save_artifact
    from netpress.export.onnx import export_onnx
    from netpress.report.html import write_html
    from netpress.report.metrics import Measurement, build_metrics, write_json
    from netpress.zoo import build_architecture

    torch.manual_seed(0)
    model = build_architecture("digits_cnn").eval()
    model = netpress.quantize(netpress.prune(model, {"method": "magnitude", "sparsity": 0.5}),
                              {"method": "int8_weight"})
    out.mkdir(parents=True, exist_ok=True)
    export_onnx(model, Batch((torch.zeros(1, 1, 8, 8),)), out / "model.onnx")
    m = Measurement(params=1, nonzero_params=1, macs=1, size_bytes=1, latency_ms=1.0, metric=1.0)
    metrics = build_metrics("zoo:digits_cnn", {}, "onnxruntime", 2, 1, "accuracy", m, m, 0.0)
    write_json(out / "metrics.json", metrics)
    write_html(out / "report.html", metrics, {})
    save_artifact(model, out, source={"kind": "zoo", "name": "digits_cnn"}, recipe=BASE_RECIPE,
                  metrics=metrics, extra_files=["model.onnx", "metrics.json", "report.html"])
    return out


@dataclass
class Tamper:
    """One way to damage an artifact directory in place."""

    name: str
    apply: Callable[[Path], None]


def _flip(name: str, pos: float, mask: int) -> Tamper:
    def go(d: Path) -> None:
        data = bytearray((d / name).read_bytes())
        i = min(int(pos * len(data)), len(data) - 1)
        data[i] ^= mask
        (d / name).write_bytes(bytes(data))
    return Tamper(f"{name}: flip byte at {pos:.0%} (xor {mask:#04x})", go)


def _truncate(name: str, keep: float) -> Tamper:
    def go(d: Path) -> None:
        data = (d / name).read_bytes()
        (d / name).write_bytes(data[: min(int(keep * len(data)), len(data) - 1)])
    return Tamper(f"{name}: truncate to {keep:.0%}", go)


def _resign(d: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    """Edit the manifest AND recompute every hash, as a deliberate attacker would."""
    from netpress.export.artifact import _canonical, _sha256

    manifest = json.loads((d / "manifest.json").read_text())
    edit(manifest)
    for name, info in manifest["files"].items():
        if (d / name).is_file():
            data = (d / name).read_bytes()
            info.update(sha256=_sha256(data), bytes=len(data))
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    manifest["manifest_sha256"] = _sha256(_canonical(body))
    (d / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def _add_tensor(d: Path, resign: bool) -> None:
    import safetensors.torch
    import torch

    tensors = safetensors.torch.load((d / "model.safetensors").read_bytes())
    tensors["evil.weight"] = torch.ones(3)
    (d / "model.safetensors").write_bytes(safetensors.torch.save(tensors))
    if resign:
        _resign(d, lambda m: None)


def _leaf_paths(obj: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _leaf_paths(v, (*path, k))
    elif isinstance(obj, list) and obj:
        for i, v in enumerate(obj):
            yield from _leaf_paths(v, (*path, i))
    else:
        yield path


def _edit_leaf(path: tuple[Any, ...]) -> Tamper:
    def go(d: Path) -> None:
        manifest = json.loads((d / "manifest.json").read_text())
        node = manifest
        for p in path[:-1]:
            node = node[p]
        v = node[path[-1]]
        node[path[-1]] = (not v if isinstance(v, bool) else v + 1 if isinstance(v, (int, float))
                          else v + "x" if isinstance(v, str) else 0)
        (d / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return Tamper(f"manifest.json: edit {'.'.join(map(str, path))}", go)


def tamper_cases(art: Path, every_manifest_byte: bool = False, positions: int = 7) -> list[Tamper]:
    """Damage cases for the artifact at ``art``: per file flips, truncations, appends, deletion;
    every manifest leaf edited; added tensors; resigned manifests with structural changes."""
    cases: list[Tamper] = []
    fracs = [i / max(positions - 1, 1) for i in range(positions)]
    for name in ARTIFACT_FILES:
        cases += [_flip(name, f, mask) for f in fracs for mask in (0x01, 0x80)]
        cases += [_truncate(name, k) for k in (0.0, 0.5, 0.999)]
        cases.append(Tamper(f"{name}: one byte appended", lambda d, n=name: (d / n).write_bytes(
            (d / n).read_bytes() + b"\0")))
        cases.append(Tamper(f"{name}: deleted", lambda d, n=name: (d / n).unlink()))
        cases.append(Tamper(f"{name}: replaced by a directory", lambda d, n=name: (
            (d / n).unlink(), (d / n).mkdir())))
    if every_manifest_byte:
        size = (art / "manifest.json").stat().st_size
        cases += [_flip("manifest.json", i / size, 0x01) for i in range(size)]
    manifest = json.loads((art / "manifest.json").read_text())
    cases += [_edit_leaf(p) for p in _leaf_paths(manifest) if p]
    cases += [
        Tamper("model.safetensors: tensor added", lambda d: _add_tensor(d, False)),
        Tamper("model.safetensors: tensor added, manifest re-signed", lambda d: _add_tensor(d, True)),
        Tamper("re-signed: a tensor entry removed", lambda d: _resign(
            d, lambda m: m["tensors"].pop(sorted(m["tensors"])[0]))),
        Tamper("re-signed: source -> os:system factory", lambda d: _resign(
            d, lambda m: m.update(source={"kind": "module", "factory": "os:system"}))),
        Tamper("re-signed: file list points outside the directory", lambda d: _resign(
            d, lambda m: m["files"].update({"../../etc/passwd": {"sha256": "0", "bytes": 1}}))),
        Tamper("re-signed: module spec of an unregistered class", lambda d: _resign(
            d, lambda m: m["modules"].update({"": {"class": "os.system", "kwargs": {}}}))),
    ]
    return cases


def check_tamper(art: Path, case: Tamper, workdir: Path) -> str | None:
    """Apply ``case`` to a copy of ``art``: ``netpress.load`` must raise ArtifactError."""
    import netpress
    from netpress.core.errors import ArtifactError

    d = workdir / "art"
    shutil.rmtree(d, ignore_errors=True)
    shutil.copytree(art, d)
    case.apply(d)
    try:
        netpress.load(d)
    except ArtifactError as exc:
        return None if "Fix:" in str(exc) else f"{case.name}: no fix in {exc}"
    except BaseException as exc:  # noqa: BLE001
        return f"{case.name}: {type(exc).__name__}: {str(exc)[:200]}"
    return f"{case.name}: loaded a model"


def run_tamper(full: bool) -> Section:
    section = Section("tamper evidence")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="netpress-tamper-") as tmp:
        art = build_artifact(Path(tmp) / "artifact")
        import netpress

        netpress.load(art)  # the untouched artifact loads
        cases = tamper_cases(art, every_manifest_byte=full, positions=25 if full else 7)
        for case in cases:
            section.check(check_tamper(art, case, Path(tmp)))
    section.seconds = time.perf_counter() - start
    section.notes.append("files: " + ", ".join(ARTIFACT_FILES) + "; every manifest leaf edited"
                         + ("; every manifest byte flipped" if full else ""))
    return section


