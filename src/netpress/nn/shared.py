"""Weight-shared layers with entropy-coded indices (Deep Compression, SPEC A4).

``SharedLinear`` / ``SharedConv`` store a layer's weight as a small codebook plus one index per
weight, and the index stream is entropy-coded (the smallest of zlib, bz2 and raw LZMA, all from the
standard library). The state dict (what the artifact stores) holds only

  * ``payload``: uint8 ``(nbytes,)``, the coded index stream (index 0 is the exact zero of pruned
    weights when ``zero_code`` is set);
  * ``aux``: float16 ``(2^bits + out_features,)``, the codebook followed by the bias (zeros when
    the layer has none).

At load (a state-dict post-hook) and at build time the stream is decoded once into the
non-persistent buffer ``weight``, so forward is a plain ``F.linear`` / ``F.conv*d`` and ONNX export
sees a constant weight.

Example:
    >>> import torch, torch.nn as nn
    >>> from netpress.nn.shared import SharedLinear
    >>> _ = torch.manual_seed(0)
    >>> lin = nn.Linear(64, 32)
    >>> q = SharedLinear.from_float(lin, bits=5)
    >>> q.payload.dtype, len(q.weight.unique()) <= 32
    (torch.uint8, True)
    >>> bool((q.weight - lin.weight).abs().max() < 0.02)
    True
"""

from __future__ import annotations

import bz2
import lzma
import zlib
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from netpress.core.errors import ArtifactError
from netpress.nn.registry import serializable

_LZMA_FILTERS = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}]
CODECS = ("zlib", "bz2", "lzma")


def encode_indices(codes: np.ndarray) -> tuple[bytes, str]:
    """Entropy-code a uint8 index stream with the codec that makes it smallest.

    Returns:
        ``(bytes, codec name)``.

    Example:
        >>> import numpy as np
        >>> data, codec = encode_indices(np.zeros(10_000, dtype=np.uint8))
        >>> len(data) < 100, codec in CODECS
        (True, True)
    """
    raw = np.ascontiguousarray(codes, dtype=np.uint8).tobytes()
    options = {
        "zlib": zlib.compress(raw, 9),
        "bz2": bz2.compress(raw, 9),
        "lzma": lzma.compress(raw, format=lzma.FORMAT_RAW, filters=_LZMA_FILTERS),
    }
    codec = min(options, key=lambda k: len(options[k]))
    return options[codec], codec


def decode_indices(data: bytes, codec: str, n: int) -> np.ndarray:
    """Inverse of :func:`encode_indices`: ``n`` uint8 indices.

    Raises:
        ArtifactError: unknown codec or a stream that does not decode to ``n`` indices.
    """
    try:
        if codec == "zlib":
            raw = zlib.decompress(data)
        elif codec == "bz2":
            raw = bz2.decompress(data)
        elif codec == "lzma":
            raw = lzma.decompress(data, format=lzma.FORMAT_RAW, filters=_LZMA_FILTERS)
        else:
            raise ValueError(f"unknown codec {codec!r}")
    except (ValueError, OSError, zlib.error, lzma.LZMAError) as exc:
        raise ArtifactError("shared weight payload", got=f"an undecodable {codec} stream ({exc})",
                            expected=f"one of {CODECS}", fix="re-save the artifact") from None
    out = np.frombuffer(raw, dtype=np.uint8)
    if out.size != n:
        raise ArtifactError("shared weight payload", got=f"{out.size} indices", expected=f"{n}",
                            fix="re-save the artifact")
    return out


def kmeans_codebook(w: torch.Tensor, bits: int, zero_code: bool,
                    iters: int = 30) -> tuple[torch.Tensor, torch.Tensor]:
    """1-D k-means (linear initialisation, Han et al.) of the weights.

    Args:
        w: any-shape float weights.
        bits: codebook of ``2^bits`` entries.
        zero_code: reserve index 0 for the exact zero (pruned weights) and cluster the non-zeros.
        iters: Lloyd iterations.

    Returns:
        ``(codebook (2^bits,) float32, indices like w, int64)``.
    """
    k = 1 << bits
    flat = w.detach().reshape(-1).double()  # (n,)
    live = flat != 0 if zero_code else torch.ones_like(flat, dtype=torch.bool)
    vals = flat[live]
    n_c = k - 1 if zero_code else k
    codebook = torch.zeros(k, dtype=torch.float64)
    if vals.numel():
        c = torch.linspace(float(vals.min()), float(vals.max()), n_c, dtype=torch.float64)
        for _ in range(iters):
            assign = (vals[:, None] - c[None, :]).abs().argmin(1)  # (m,)
            sums = torch.zeros(n_c, dtype=torch.float64).index_add_(0, assign, vals)
            counts = torch.zeros(n_c, dtype=torch.float64).index_add_(0, assign, torch.ones_like(vals))
            c = torch.where(counts > 0, sums / counts.clamp(min=1), c)
        codebook[k - n_c:] = c
    idx = torch.zeros_like(flat, dtype=torch.int64)
    if vals.numel():
        idx[live] = (vals[:, None] - codebook[None, k - n_c:]).abs().argmin(1) + (k - n_c)
    # fp16 storage of the codebook: assignment uses the values the artifact will hold
    return codebook.to(torch.float16).float(), idx.reshape(w.shape)


def _decode_hook(module: nn.Module, _incompatible: Any) -> None:
    module.decode()  # type: ignore[operator]


class _Shared(nn.Module):
    """Common storage and decoding of the shared layers."""

    payload: torch.Tensor
    aux: torch.Tensor
    weight: torch.Tensor

    def _init_storage(self, shape: tuple[int, ...], bits: int, nbytes: int, codec: str,
                      zero_code: bool, bias: bool) -> None:
        if not 1 <= int(bits) <= 8:
            raise ValueError(f"bits must be in 1..8, not {bits}")
        if codec not in CODECS:
            raise ValueError(f"codec must be one of {CODECS}")
        self.shape, self.bits, self.nbytes = tuple(shape), int(bits), int(nbytes)
        self.codec, self.zero_code, self.has_bias = codec, bool(zero_code), bool(bias)
        self.register_buffer("payload", torch.zeros(self.nbytes, dtype=torch.uint8))
        self.register_buffer("aux", torch.zeros((1 << self.bits) + shape[0], dtype=torch.float16))
        self.register_buffer("weight", torch.zeros(shape), persistent=False)
        self.register_load_state_dict_post_hook(_decode_hook)

    def _set(self, codebook: torch.Tensor, idx: torch.Tensor, bias: torch.Tensor | None) -> None:
        data, codec = encode_indices(idx.reshape(-1).to(torch.uint8).numpy())
        self.nbytes, self.codec = len(data), codec
        self.payload = torch.frombuffer(bytearray(data), dtype=torch.uint8).clone()
        b = torch.zeros(self.shape[0]) if bias is None else bias.detach().float()
        self.aux = torch.cat([codebook.float(), b]).to(torch.float16)
        self.decode()

    @property
    def codebook(self) -> torch.Tensor:
        return self.aux[: 1 << self.bits].float()

    @property
    def bias(self) -> torch.Tensor | None:
        return self.aux[1 << self.bits:].float() if self.has_bias else None

    def decode(self) -> None:
        """Decode ``payload`` into the float ``weight`` buffer."""
        n = int(np.prod(self.shape))
        idx = decode_indices(self.payload.numpy().tobytes(), self.codec, n)
        w = self.codebook[torch.from_numpy(idx.astype(np.int64))].reshape(self.shape)
        self.weight = w.to(self.aux.device)

    def netpress_weight_counts(self) -> tuple[int, int]:
        nb = self.shape[0] if self.has_bias else 0
        nzb = int(torch.count_nonzero(self.bias)) if self.has_bias else 0
        return self.weight.numel() + nb, int(torch.count_nonzero(self.weight)) + nzb

    def _storage_spec(self) -> dict[str, Any]:
        return {"bits": self.bits, "nbytes": self.nbytes, "codec": self.codec,
                "zero_code": self.zero_code, "bias": self.has_bias}


@serializable
class SharedLinear(_Shared):
    """``nn.Linear`` with a k-means codebook and entropy-coded indices (see the module doc)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, bits: int = 5,
                 nbytes: int = 0, codec: str = "zlib", zero_code: bool = True) -> None:
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        self._init_storage((self.out_features, self.in_features), bits, nbytes, codec, zero_code, bias)

    @classmethod
    def from_float(cls, lin: nn.Linear, bits: int = 5, zero_code: bool | None = None) -> SharedLinear:
        """Cluster ``lin.weight`` (index 0 = zero when the layer has pruned weights)."""
        zc = bool((lin.weight == 0).any()) if zero_code is None else zero_code
        m = cls(lin.in_features, lin.out_features, lin.bias is not None, bits, 0, "zlib", zc)
        m._set(*kmeans_codebook(lin.weight, bits, zc), lin.bias)
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., I) -> (..., O)
        return F.linear(x, self.weight.to(x.dtype), self.bias)

    def spec(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.out_features,
                **self._storage_spec()}

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> SharedLinear:
        return cls(**spec)


@serializable
class SharedConv(_Shared):
    """``nn.Conv1d`` / ``nn.Conv2d`` with a shared codebook (see the module doc)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: list[int],
                 stride: list[int], padding: list[int] | str, dilation: list[int], groups: int = 1,
                 bias: bool = True, bits: int = 5, nbytes: int = 0, codec: str = "zlib",
                 zero_code: bool = True) -> None:
        super().__init__()
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.kernel_size, self.stride = tuple(kernel_size), tuple(stride)
        self.padding = padding if isinstance(padding, str) else tuple(padding)
        self.dilation, self.groups = tuple(dilation), int(groups)
        shape = (self.out_channels, self.in_channels // self.groups, *self.kernel_size)
        self._init_storage(shape, bits, nbytes, codec, zero_code, bias)

    @classmethod
    def from_float(cls, conv: nn.Conv1d | nn.Conv2d, bits: int = 5,
                   zero_code: bool | None = None) -> SharedConv:
        """Cluster ``conv.weight`` (zeros padding mode only)."""
        zc = bool((conv.weight == 0).any()) if zero_code is None else zero_code
        pad = conv.padding if isinstance(conv.padding, str) else list(conv.padding)
        m = cls(conv.in_channels, conv.out_channels, list(conv.kernel_size), list(conv.stride),
                pad, list(conv.dilation), conv.groups, conv.bias is not None, bits, 0, "zlib", zc)
        m._set(*kmeans_codebook(conv.weight, bits, zc), conv.bias)
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fn = F.conv1d if len(self.kernel_size) == 1 else F.conv2d
        return fn(x, self.weight.to(x.dtype), self.bias, self.stride, self.padding, self.dilation,
                  self.groups)

    def spec(self) -> dict[str, Any]:
        return {"in_channels": self.in_channels, "out_channels": self.out_channels,
                "kernel_size": list(self.kernel_size), "stride": list(self.stride),
                "padding": self.padding if isinstance(self.padding, str) else list(self.padding),
                "dilation": list(self.dilation), "groups": self.groups, **self._storage_spec()}

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> SharedConv:
        return cls(**spec)


__all__ = ["CODECS", "SharedConv", "SharedLinear", "decode_indices", "encode_indices",
           "kmeans_codebook"]
