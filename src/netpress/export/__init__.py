"""Export: the artifact (safetensors + JSON manifest, reloaded without pickle) and ONNX.

The ONNX helpers (``export_onnx``, ``OnnxRunner``, ``verify_onnx``) live in
:mod:`netpress.export.onnx` and are re-exported here lazily.
"""

from __future__ import annotations

from typing import Any

from netpress.export.artifact import (
    load,
    load_model_file,
    read_manifest,
    save_artifact,
    verify_artifact,
)

_ONNX_NAMES = ("export_onnx", "OnnxRunner", "verify_onnx")


def __getattr__(name: str) -> Any:
    if name in _ONNX_NAMES:
        from netpress.export import onnx

        return getattr(onnx, name)
    raise AttributeError(f"module 'netpress.export' has no attribute {name!r}")


__all__ = ["load", "load_model_file", "read_manifest", "save_artifact", "verify_artifact",
           *_ONNX_NAMES]
