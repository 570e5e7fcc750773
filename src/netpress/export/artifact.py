"""The artifact: ``model.safetensors`` + ``manifest.json``, reloaded without pickle.

``save_artifact`` writes the compressed model's tensors to ``model.safetensors`` and a JSON manifest
with the recipe, metrics, package versions, how to rebuild the architecture (``source``), the spec
of every module compression changed, how each tensor is encoded, and the SHA-256 and size of every
file. ``load`` checks every hash first, rebuilds the base architecture, swaps in the changed
modules from their specs, decodes the tensors and loads them strictly. Nothing is unpickled.

Sources (how the base architecture is rebuilt):
  * ``{"kind": "zoo", "name": "mobilenet_v2"}``: ``netpress.zoo.build_architecture(name)``;
  * ``{"kind": "module", "factory": "pkg.mod:callable"}``: an importable no-argument function or
    class of *your* package that returns the uncompressed architecture (its code runs at load, so
    name only code you trust; standard-library callables are refused);
  * ``{"kind": "export", "file": "program.pt2"}``: the compressed model itself is ``torch.export``-ed
    into the artifact (needs ``example`` inputs); reload uses the program's module with the tensors
    of ``model.safetensors``. ``torch.export.load`` runs with every unpickling path refused.

Sparse storage (SPEC P8): a tensor whose zeros make ``bitmask + non-zero values`` at least 10 %
smaller than dense (fp32: >= 13.1 % zeros; fp16: >= 16.3 %; int8: >= 22.5 %) is stored as
``KEY::mask`` (uint8, ``np.packbits`` of ``tensor != 0``, 8 per byte) and ``KEY::values`` (the
non-zeros in flat order); the manifest records ``{"encoding": "bitmask", "nnz": ...}``. Tensors
sharing storage (tied weights) are stored once (``{"encoding": "alias", "of": KEY}``).

Saving is deterministic: the same model gives byte-identical files (sorted keys, no timestamps).

Example:
    >>> import tempfile, torch, torchvision
    >>> from netpress.api import quantize
    >>> from netpress.export.artifact import load, save_artifact
    >>> model = quantize(torchvision.models.mobilenet_v2().eval(), {"method": "int8_weight"})
    >>> with tempfile.TemporaryDirectory() as d:
    ...     manifest = save_artifact(model, d, recipe={}, source={
    ...         "kind": "module", "factory": "torchvision.models:mobilenet_v2"})
    ...     x = torch.randn(1, 3, 64, 64)
    ...     same = torch.equal(load(d)(x), model(x))
    >>> same, manifest["files"]["model.safetensors"]["bytes"] < 4_000_000  # fp32: 14 MB
    (True, True)
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import inspect
import json
import math
import os
import platform
import shutil
import sys
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
import torch.nn as nn

import netpress.nn  # noqa: F401  (registers the serializable modules)
from netpress.core.data import Batch
from netpress.core.errors import ArtifactError, ModelError
from netpress.export.encoding import decode_tensors, encode_tensors
from netpress.export.modelfile import eval_mode, export_program, load_model_file, load_program
from netpress.nn.registry import build_module, module_spec

FORMAT = "netpress-artifact"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
WEIGHTS = "model.safetensors"
PROGRAM = "program.pt2"
PACKAGES = ("torch", "torchvision", "onnx", "onnxruntime", "safetensors", "numpy")


# ------------------------------------------------------------------------------------- sources
def _check_source(source: Any) -> dict[str, Any]:
    kinds = {"zoo": {"name"}, "module": {"factory"}, "export": {"file"}}
    if not isinstance(source, dict) or source.get("kind") not in kinds:
        raise ArtifactError("source", got=source, expected='{"kind": "zoo"|"module"|"export", ...}',
                            fix='e.g. {"kind": "zoo", "name": "mobilenet_v2"}')
    kind = source["kind"]
    if kind == "export":
        source = {"kind": "export", "file": source.get("file", PROGRAM), **source}
    extra = set(source) - kinds[kind] - {"kind"}
    missing = [k for k in kinds[kind] if not isinstance(source.get(k), str) or not source[k]]
    if extra or missing:
        raise ArtifactError("source", got=source,
                            expected=f"kind {kind!r} with exactly the string key(s) "
                            f"{sorted(kinds[kind])}", fix="fix the source mapping")
    if kind == "export" and (Path(source["file"]).name != source["file"]
                             or not source["file"].endswith(".pt2")):
        raise ArtifactError("source.file", got=source["file"], expected="a plain file name *.pt2",
                            fix=f'use "{PROGRAM}"')
    return dict(source)


def build_base(source: dict[str, Any]) -> nn.Module:
    """The uncompressed architecture a zoo or module source names (fresh weights).

    Raises:
        ArtifactError: unknown zoo model, or a factory that cannot be imported, is refused, or
            does not return an ``nn.Module``.
    """
    if source["kind"] == "zoo":
        try:
            from netpress.zoo import build_architecture
        except ImportError:
            raise ArtifactError("source.name", got=source["name"],
                                expected="netpress.zoo.build_architecture to be available",
                                fix="install netpress with its zoo") from None
        model = build_architecture(source["name"])
    else:
        model = _call_factory(source["factory"])
    if not isinstance(model, nn.Module):
        raise ArtifactError("source", got=type(model).__name__, expected="an nn.Module",
                            fix="the factory must return the model architecture")
    return model


def _call_factory(spec: str) -> Any:
    where = "source.factory"
    mod_name, _, attr = spec.partition(":")
    if not mod_name or not attr:
        raise ArtifactError(where, got=spec, expected="'package.module:callable'",
                            fix="e.g. 'mypkg.models:build_net'")
    top = mod_name.split(".")[0]
    if top in sys.stdlib_module_names or top == "builtins":
        raise ArtifactError(where, got=spec, expected="a callable of your own package",
                            fix="standard-library callables are refused; name your factory")
    try:
        obj: Any = importlib.import_module(mod_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise ArtifactError(where, got=spec, expected=f"an importable callable ({exc})",
                            fix="install the package that defines it, or fix the name") from None
    if not (inspect.isfunction(obj) or inspect.isclass(obj)) or not str(
        getattr(obj, "__module__", "")
    ).startswith(top):
        raise ArtifactError(where, got=spec, expected=f"a function or class defined in {top!r}",
                            fix="name the factory where it is defined")
    try:
        return obj()
    except TypeError as exc:
        raise ArtifactError(where, got=spec, expected=f"a factory callable without arguments "
                            f"({exc})", fix="wrap it: def build(): return Net(...)") from None


def diff_modules(model: nn.Module, base: nn.Module) -> dict[str, dict[str, Any]]:
    """Specs of the modules of ``model`` that differ from ``base`` (class, own tensor shapes,
    children or constructor arguments); a differing module's spec covers its whole subtree.

    Raises:
        ModelError: a changed module cannot be rebuilt without pickle.
    """
    base_modules = dict(base.named_modules(remove_duplicate=False))
    out: dict[str, dict[str, Any]] = {}

    def visit(name: str, module: nn.Module) -> None:
        other = base_modules.get(name)
        if other is None or _signature(module) != _signature(other):
            out[name] = module_spec(module, where=name or "the model")
            return
        for child_name, child in module.named_children():
            visit(f"{name}.{child_name}" if name else child_name, child)

    visit("", model)
    return out


def _signature(m: nn.Module) -> tuple[Any, ...]:
    tensors = sorted((n, tuple(t.shape)) for n, t in
                     [*m.named_parameters(recurse=False), *m.named_buffers(recurse=False)])
    try:
        kwargs = module_spec(m)["kwargs"] if not list(m.children()) else None
    except ModelError:
        kwargs = None
    return type(m), tuple(tensors), tuple(n for n, _ in m.named_children()), json.dumps(kwargs)


def _apply_specs(model: nn.Module, specs: Any) -> nn.Module:
    if not isinstance(specs, dict):
        raise ArtifactError(f"{MANIFEST}: modules", got=specs, expected="a mapping",
                            fix="re-save the artifact")
    for name in sorted(specs, key=lambda n: (n.count(".") + bool(n), n)):
        module = build_module(specs[name], where=f"{MANIFEST}: modules[{name!r}]")
        if not name:
            model = module
            continue
        parent_name, _, child = name.rpartition(".")
        try:
            parent = model.get_submodule(parent_name) if parent_name else model
        except AttributeError:
            raise ArtifactError(f"{MANIFEST}: modules[{name!r}]", got="no parent module",
                                expected="a module path of the base architecture",
                                fix="the source architecture changed; rebuild the artifact"
                                ) from None
        setattr(parent, child, module)
    return model


# -------------------------------------------------------------------------- files and hashing
def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _canonical(body: dict[str, Any]) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False).encode()


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise ArtifactError(str(path), got=f"{type(exc).__name__}: {exc}",
                            expected="a writable directory", fix="check the path and free space"
                            ) from None


def _jsonable(value: Any, where: str) -> Any:
    """JSON-safe copy: tuples -> lists, numpy/torch scalars -> Python, NaN/Inf -> None."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, (np.generic, torch.Tensor)) and getattr(value, "ndim", 0) == 0:
        value = value.item()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (bool, int, str)):
        return value
    raise ArtifactError(where, got=type(value).__name__, expected="JSON data (numbers, strings, "
                        "lists, mappings)", fix="convert it before saving")


def _versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def _netpress_version() -> str:
    try:
        return importlib.metadata.version("netpress")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


# ----------------------------------------------------------------------------------- save
def save_artifact(
    model: nn.Module,
    out_dir: str | Path,
    *,
    source: dict[str, Any],
    recipe: dict[str, Any] | Any,
    metrics: dict[str, Any] | None = None,
    extra_files: Sequence[str | Path] = (),
    example: Batch | tuple[Any, ...] | None = None,
) -> dict[str, Any]:
    """Write ``model.safetensors`` and ``manifest.json`` (plus ``program.pt2`` for export sources).

    Args:
        model: the (compressed) model.
        out_dir: the artifact directory (created; these files are replaced).
        source: how the base architecture is rebuilt (see the module doc).
        recipe: the recipe dict (or an object with ``to_dict()``).
        metrics: metrics to record (NaN/Inf become null).
        extra_files: more files to hash into the manifest (e.g. ``metrics.json``, ``model.onnx``);
            relative paths are inside ``out_dir``, files elsewhere are copied in.
        example: example inputs (a :class:`Batch` or a tuple of tensors) to ``torch.export`` an
            ``export`` source; defaults to the inputs the ``.pt2`` model was loaded with.

    Returns:
        The manifest (as written).

    Raises:
        ArtifactError: bad source/extra files, unwritable directory, export failure.
        ModelError: compression changed a module netpress cannot rebuild without pickle.

    Example:
        >>> import tempfile, torch.nn as nn
        >>> with tempfile.TemporaryDirectory() as d:
        ...     m = save_artifact(nn.Identity(), d, recipe={},
        ...                       source={"kind": "module", "factory": "torch.nn:Identity"})
        >>> sorted(m["files"]), m["source"]["kind"], len(m["manifest_sha256"])
        (['model.safetensors'], 'module', 64)
    """
    source = _check_source(source)
    recipe = _jsonable(recipe.to_dict() if hasattr(recipe, "to_dict") else recipe, "recipe")
    metrics = _jsonable(metrics, "metrics")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    if source["kind"] == "export":
        modules: dict[str, Any] = {}
    else:
        modules = diff_modules(model, build_base(source))
    file_tensors, entries = encode_tensors(state)
    _write_atomic(out / WEIGHTS, safetensors.torch.save(file_tensors))
    names = [WEIGHTS]
    if source["kind"] == "export":
        _write_atomic(out / source["file"], export_program(model, example))
        names.append(source["file"])
    names += _collect_extra(out, extra_files, names)
    files = {}
    for name in sorted(names):
        data = (out / name).read_bytes()
        files[name] = {"sha256": _sha256(data), "bytes": len(data)}
    body = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "netpress_version": _netpress_version(), "versions": _versions(),
        "source": source, "recipe": recipe, "metrics": metrics, "modules": modules,
        "weights": WEIGHTS, "tensors": entries, "files": files,
    }
    manifest = {**body, "manifest_sha256": _sha256(_canonical(body))}
    text = json.dumps(manifest, indent=2, sort_keys=True, allow_nan=False) + "\n"
    _write_atomic(out / MANIFEST, text.encode())
    return manifest


def _collect_extra(out: Path, extra: Sequence[str | Path], taken: list[str]) -> list[str]:
    names = []
    for item in extra:
        path = Path(item)
        path = path if path.is_absolute() else out / path
        if not path.is_file():
            raise ArtifactError(str(item), got="no such file", expected="a file to add",
                                fix="write it before saving the artifact")
        try:
            name = path.resolve().relative_to(out.resolve()).as_posix()
        except ValueError:
            name = path.name
            if (out / name).exists() and not (out / name).samefile(path):
                raise ArtifactError(str(item), got=f"a second file named {name!r}",
                                    expected="unique file names", fix="rename one") from None
            shutil.copyfile(path, out / name)
        if name in taken or name == MANIFEST or name in names:
            raise ArtifactError(str(item), got=name, expected="a file name not used by the "
                                "artifact itself", fix="rename the extra file")
        names.append(name)
    return names


# ----------------------------------------------------------------------------------- load
def read_manifest(path: str | Path) -> dict[str, Any]:
    """Parse ``DIR/manifest.json`` and check its own hash (not the other files; see :func:`load`).

    Raises:
        ArtifactError: missing, not JSON, another format, newer version, or edited.
    """
    mpath = Path(path) / MANIFEST
    if not mpath.is_file():
        raise ArtifactError(str(mpath), got="no such file", expected="an artifact directory",
                            fix="pass the directory `netpress compress` wrote")
    try:
        manifest = json.loads(mpath.read_bytes())
    except (ValueError, UnicodeDecodeError) as exc:
        raise ArtifactError(str(mpath), got=f"invalid JSON ({exc})", expected="the manifest",
                            fix="restore the file or re-run the compression") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(str(mpath), got="another format", expected=f"a {FORMAT} manifest",
                            fix="pass a netpress artifact directory")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ArtifactError(str(mpath), got=f"format_version {version}",
                            expected=f"<= {FORMAT_VERSION}", fix="upgrade netpress")
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    if manifest.get("manifest_sha256") != _sha256(_canonical(body)):
        raise ArtifactError(str(mpath), got="content that does not match its manifest_sha256",
                            expected="an unedited manifest",
                            fix="the manifest was edited or corrupted; restore it or re-run")
    return manifest


def verify_artifact(path: str | Path) -> tuple[dict[str, Any], dict[str, bytes]]:
    """Check the manifest and every file it lists (size, then SHA-256).

    Returns:
        ``(manifest, {file name: bytes})``: the verified bytes, so nothing is read twice.

    Raises:
        ArtifactError: naming the first missing, truncated or modified file.
    """
    root = Path(path)
    manifest = read_manifest(root)
    files = manifest.get("files")
    if not isinstance(files, dict) or manifest.get("weights") not in files:
        raise ArtifactError(str(root / MANIFEST), got="no file list", expected="files + weights",
                            fix="re-run the compression")
    data: dict[str, bytes] = {}
    for name, info in sorted(files.items()):
        fpath = root / name
        if Path(name).is_absolute() or ".." in Path(name).parts or not fpath.is_file():
            raise ArtifactError(str(fpath), got="no such file", expected="every file the manifest "
                                "lists", fix="restore the file or re-run the compression")
        blob = fpath.read_bytes()
        if len(blob) != info.get("bytes"):
            raise ArtifactError(str(fpath), got=f"{len(blob)} bytes",
                                expected=f"{info.get('bytes')} bytes (truncated or modified)",
                                fix="restore the file or re-run the compression")
        if _sha256(blob) != info.get("sha256"):
            raise ArtifactError(str(fpath), got="a different SHA-256",
                                expected=f"sha256 {info.get('sha256')} (the file was modified)",
                                fix="restore the file or re-run the compression")
        data[name] = blob
    return manifest, data


def load(path: str | Path) -> nn.Module:
    """Rebuild the model of an artifact directory (``netpress.load``), in eval mode.

    Args:
        path: the directory ``save_artifact`` / ``netpress compress`` wrote.

    Returns:
        The model, with exactly the saved tensors.

    Raises:
        ArtifactError: missing or tampered files, or tensors that do not fit the architecture.

    Example:
        >>> import netpress  # doctest: +SKIP
        >>> model = netpress.load("digits-out")  # doctest: +SKIP
    """
    manifest, data = verify_artifact(path)
    source = _check_source(manifest.get("source"))
    if source["kind"] == "export":
        model = load_program(data[source["file"]], where=str(Path(path) / source["file"]))
    else:
        model = _apply_specs(build_base(source), manifest.get("modules", {}))
    try:
        file_tensors = safetensors.torch.load(data[manifest["weights"]])
    except Exception as exc:  # safetensors raises its own error type
        raise ArtifactError(str(Path(path) / WEIGHTS), got=f"unreadable ({exc})",
                            expected="a safetensors file", fix="re-run the compression") from None
    entries = manifest.get("tensors")
    if not isinstance(entries, dict):
        raise ArtifactError(f"{MANIFEST}: tensors", got=entries, expected="a mapping",
                            fix="re-run the compression")
    state = decode_tensors(file_tensors, entries)
    current = model.state_dict()
    assign = any(k in current and current[k].dtype != t.dtype for k, t in state.items())
    if hasattr(current, "_metadata"):  # module versions of the rebuilt model (MNASNet checks its)
        state = OrderedDict(state)
        state._metadata = current._metadata  # type: ignore[attr-defined]
    try:
        model.load_state_dict(state, strict=True, assign=assign)
    except RuntimeError as exc:
        raise ArtifactError(str(Path(path) / WEIGHTS), got=str(exc).splitlines()[0][:300],
                            expected="tensors matching the rebuilt architecture",
                            fix="the source architecture changed since the artifact was written; "
                            "rebuild it with the same netpress and zoo versions") from None
    return eval_mode(model)


__all__ = [
    "FORMAT", "FORMAT_VERSION", "MANIFEST", "WEIGHTS", "build_base", "decode_tensors",
    "diff_modules", "encode_tensors", "load", "load_model_file", "read_manifest", "save_artifact",
    "verify_artifact",
]
