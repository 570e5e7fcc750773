"""Weight-shared layers with entropy-coded indices (Deep Compression, SPEC A4).

``SharedLinear`` / ``SharedConv`` store a layer's weight as a small codebook plus one index per
weight, and the index stream is entropy-coded: the smallest of zlib, bz2, raw LZMA (standard
library) and an adaptive arithmetic coder (:func:`arith_encode`, context = previous index zero or
not). The state dict (what the artifact stores) holds only

  * ``payload``: uint8 ``(nbytes,)``: first the bytes of ``aux`` — float16 ``(2^bits +
    out_features,)``, the codebook followed by the bias (zeros when the layer has none); float32
    with the per-channel scales appended for layers taken from QAT — then the coded index stream
    (index 0 is the exact zero of pruned weights when ``zero_code`` is set). One tensor per layer
    keeps the safetensors header small.

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
CODECS = ("zlib", "bz2", "lzma", "arith")
_TOP, _HALF, _QTR = (1 << 32) - 1, 1 << 31, 1 << 30
_INC, _MAX_TOTAL = 24, 1 << 16


class _Model:
    """Adaptive frequencies of ``k`` symbols in two contexts (previous index zero or not)."""

    def __init__(self, k: int) -> None:
        self.freq = [[1] * k, [1] * k]
        self.total = [k, k]

    def update(self, ctx: int, s: int) -> None:
        f = self.freq[ctx]
        f[s] += _INC
        self.total[ctx] += _INC
        if self.total[ctx] > _MAX_TOTAL:
            self.freq[ctx] = [(v + 1) // 2 for v in f]
            self.total[ctx] = sum(self.freq[ctx])


def arith_encode(codes: np.ndarray, k: int) -> bytes:
    """Adaptive arithmetic coding (Witten-Neal-Cleary, 32-bit integer) of ``codes`` in ``[0, k)``.

    Context: whether the previous index was 0 (runs of pruned weights). Within a few bytes of the
    adaptive order-1 entropy, which zlib/LZMA do not reach on short streams.
    """
    model, low, high, pending, out = _Model(k), 0, _TOP, 0, []
    prev = 0
    for s in codes.tolist():
        ctx = int(prev == 0)
        f, tot = model.freq[ctx], model.total[ctx]
        cum = sum(f[:s])
        rng = high - low + 1
        high = low + rng * (cum + f[s]) // tot - 1
        low = low + rng * cum // tot
        while True:
            if high < _HALF:
                out.append(0)
                out.extend([1] * pending)
                pending = 0
            elif low >= _HALF:
                out.append(1)
                out.extend([0] * pending)
                pending = 0
                low -= _HALF
                high -= _HALF
            elif low >= _QTR and high < 3 * _QTR:
                pending += 1
                low -= _QTR
                high -= _QTR
            else:
                break
            low, high = 2 * low, 2 * high + 1
        model.update(ctx, s)
        prev = s
    pending += 1
    out.append(0 if low < _QTR else 1)
    out.extend([1 if low < _QTR else 0] * pending)
    return np.packbits(np.array(out, dtype=np.uint8)).tobytes()


def arith_decode(data: bytes, k: int, n: int) -> np.ndarray:
    """Inverse of :func:`arith_encode` (``n`` indices)."""
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8)).tolist()
    nb = len(bits)
    pos, value = 0, 0
    for _ in range(32):
        value = 2 * value + (bits[pos] if pos < nb else 0)
        pos += 1
    model, low, high, prev = _Model(k), 0, _TOP, 0
    out = np.empty(n, dtype=np.uint8)
    for i in range(n):
        ctx = int(prev == 0)
        f, tot = model.freq[ctx], model.total[ctx]
        rng = high - low + 1
        target = ((value - low + 1) * tot - 1) // rng
        s, cum = 0, 0
        while cum + f[s] <= target:
            cum += f[s]
            s += 1
        high = low + rng * (cum + f[s]) // tot - 1
        low = low + rng * cum // tot
        while True:
            if high < _HALF:
                pass
            elif low >= _HALF:
                value -= _HALF
                low -= _HALF
                high -= _HALF
            elif low >= _QTR and high < 3 * _QTR:
                value -= _QTR
                low -= _QTR
                high -= _QTR
            else:
                break
            low, high = 2 * low, 2 * high + 1
            value = 2 * value + (bits[pos] if pos < nb else 0)
            pos += 1
        out[i] = s
        model.update(ctx, s)
        prev = s
    return out


def encode_indices(codes: np.ndarray, k: int = 256) -> tuple[bytes, str]:
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
    if k <= 64 and len(raw) <= 2_000_000:  # pure-Python coder: small codebooks, small layers
        options["arith"] = arith_encode(np.frombuffer(raw, dtype=np.uint8), k)
    codec = min(options, key=lambda k: len(options[k]))
    return options[codec], codec


def decode_indices(data: bytes, codec: str, n: int, k: int = 256) -> np.ndarray:
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
        elif codec == "arith":
            return arith_decode(data, k, n)
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
                      zero_code: bool, bias: bool, channel_scale: bool = False) -> None:
        if not 1 <= int(bits) <= 8:
            raise ValueError(f"bits must be in 1..8, not {bits}")
        if codec not in CODECS:
            raise ValueError(f"codec must be one of {CODECS}")
        self.shape, self.bits, self.nbytes = tuple(shape), int(bits), int(nbytes)
        self.codec, self.zero_code, self.has_bias = codec, bool(zero_code), bool(bias)
        self.channel_scale = bool(channel_scale)
        n_aux = (1 << self.bits) + shape[0] * (2 if self.channel_scale else 1)
        dtype = torch.float32 if self.channel_scale else torch.float16
        self.register_buffer("payload", torch.zeros(self.nbytes, dtype=torch.uint8))
        self.register_buffer("aux", torch.zeros(n_aux, dtype=dtype), persistent=False)
        self.register_buffer("weight", torch.zeros(shape), persistent=False)
        self.register_load_state_dict_post_hook(_decode_hook)

    def _set(self, codebook: torch.Tensor, idx: torch.Tensor, bias: torch.Tensor | None,
             scale: torch.Tensor | None = None) -> None:
        data, codec = encode_indices(idx.reshape(-1).to(torch.uint8).numpy(), 1 << self.bits)
        b = torch.zeros(self.shape[0]) if bias is None else bias.detach().float()
        parts = [codebook.float(), b] + ([scale.detach().float().reshape(-1)] if scale is not None
                                          else [])
        aux = torch.cat(parts).to(self.aux.dtype)
        blob = aux.numpy().tobytes() + data  # one stored tensor per layer: aux, then the stream
        self.nbytes, self.codec = len(blob), codec
        self.payload = torch.frombuffer(bytearray(blob), dtype=torch.uint8).clone()
        self.decode()

    def _set_packed(self, packed: nn.Module) -> None:
        """Take the signed integer codes and per-channel scales of a QAT ``Packed*`` layer."""
        q = packed.codes().to(torch.int64)  # type: ignore[operator]  # signed, weight shape
        offset = 1 << (self.bits - 1)
        codebook = torch.arange(1 << self.bits, dtype=torch.float32) - offset
        self._set(codebook, q + offset, packed.bias, packed.weight_scale)

    @property
    def codebook(self) -> torch.Tensor:
        return self.aux[: 1 << self.bits].float()

    @property
    def bias(self) -> torch.Tensor | None:
        k = 1 << self.bits
        return self.aux[k: k + self.shape[0]].float() if self.has_bias else None

    def decode(self) -> None:
        """Decode ``payload`` into the float ``weight`` buffer."""
        n = int(np.prod(self.shape))
        blob = self.payload.cpu().numpy().tobytes()
        n_aux = self.aux.numel() * self.aux.element_size()
        if len(blob) < n_aux:
            raise ArtifactError("shared weight payload", got=f"{len(blob)} bytes",
                                expected=f"at least {n_aux}", fix="re-save the artifact")
        np_dtype = np.float32 if self.aux.dtype == torch.float32 else np.float16
        self.aux = torch.from_numpy(np.frombuffer(blob[:n_aux], dtype=np_dtype).copy())
        idx = decode_indices(blob[n_aux:], self.codec, n, 1 << self.bits)
        w = self.codebook[torch.from_numpy(idx.astype(np.int64))].reshape(self.shape)
        if self.channel_scale:  # integer codes times a per-output-channel scale (QAT layers)
            scale = self.aux[(1 << self.bits) + self.shape[0]:].float()  # (O,)
            w = w * scale.reshape(-1, *([1] * (w.dim() - 1)))
        self.weight = w.to(self.aux.device)

    def netpress_weight_counts(self) -> tuple[int, int]:
        nb = self.shape[0] if self.has_bias else 0
        nzb = int(torch.count_nonzero(self.bias)) if self.has_bias else 0
        return self.weight.numel() + nb, int(torch.count_nonzero(self.weight)) + nzb

    def _storage_spec(self) -> dict[str, Any]:
        return {"bits": self.bits, "nbytes": self.nbytes, "codec": self.codec,
                "zero_code": self.zero_code, "bias": self.has_bias,
                "channel_scale": self.channel_scale}


@serializable
class SharedLinear(_Shared):
    """``nn.Linear`` with a k-means codebook and entropy-coded indices (see the module doc)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, bits: int = 5,
                 nbytes: int = 0, codec: str = "zlib", zero_code: bool = True,
                 channel_scale: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        self._init_storage((self.out_features, self.in_features), bits, nbytes, codec, zero_code,
                           bias, channel_scale)

    @classmethod
    def from_packed(cls, packed: nn.Module) -> SharedLinear:
        """Entropy-code the integer codes of a QAT ``PackedLinear`` (same weights exactly)."""
        out_f, in_f = packed.weight_shape  # type: ignore[misc]
        m = cls(in_f, out_f, packed.bias is not None, packed.bits, 0, "zlib", False, True)
        m._set_packed(packed)
        return m

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
                 zero_code: bool = True, channel_scale: bool = False) -> None:
        super().__init__()
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.kernel_size, self.stride = tuple(kernel_size), tuple(stride)
        self.padding = padding if isinstance(padding, str) else tuple(padding)
        self.dilation, self.groups = tuple(dilation), int(groups)
        shape = (self.out_channels, self.in_channels // self.groups, *self.kernel_size)
        self._init_storage(shape, bits, nbytes, codec, zero_code, bias, channel_scale)

    @classmethod
    def from_packed(cls, packed: nn.Module) -> SharedConv:
        """Entropy-code the integer codes of a QAT ``PackedConv1d`` / ``PackedConv2d``."""
        n = len(packed.weight_shape) - 2  # type: ignore[arg-type]

        def tup(v: Any) -> list[Any]:
            return [v] * n if isinstance(v, int) else list(v)

        pad = packed.padding if isinstance(packed.padding, str) else tup(packed.padding)
        m = cls(packed.in_channels, packed.out_channels, tup(packed.kernel_size),
                tup(packed.stride), pad, tup(packed.dilation), packed.groups,
                packed.bias is not None, packed.bits, 0, "zlib", False, True)
        m._set_packed(packed)
        return m

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
