"""Layer-input capture for the sequential (one layer at a time) weight-only methods: GPTQ, AWQ.

True-sequential quantization needs each layer's inputs with every earlier layer already quantized.
Re-running the model from its inputs for every layer costs a partial forward per layer (MiniLM:
36 layers, ~2/3 of the GPTQ time), so two shortcuts are taken, each checked, never assumed:

* **shared inputs**: layers fed the very same tensor object (query/key/value) are captured in one
  pass (:func:`capture_runs`), since that tensor was computed before any of them ran;
* **block cache** (:class:`BlockCache`): when the layers live in the blocks of an ``nn.ModuleList``
  (a transformer's layers) and one checked forward shows that block ``i + 1`` receives exactly
  block ``i``'s output plus the same other arguments as block 0 (same objects), the inputs of
  block 0 are captured once and pushed through one block at a time with its quantized layers.
  Anything else (a block whose extra arguments change, layers outside the blocks) falls back to
  a forward of the whole model per capture.

Example:
    >>> import torch, torch.nn as nn
    >>> from netpress.core.data import Batch
    >>> class Net(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.ReLU()) for _ in range(3))
    ...     def forward(self, x):
    ...         for b in self.blocks:
    ...             x = b(x)
    ...         return x
    >>> net = Net(); names = [f"blocks.{i}.0" for i in range(3)]
    >>> cache = BlockCache.build(net, [Batch((torch.randn(4, 8),))], names)
    >>> cache.prefix, cache.block_of("blocks.2.0")
    ('blocks', 2)
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

from netpress.core.errors import DataError

#: one calibration batch as a capture sees it: a callable running the forward, and its token mask
Run = tuple[Callable[[], Any], "torch.Tensor | None"]


class _Captured(Exception):
    """Raised by a capture hook to stop the forward once the inputs are seen."""


def capture_runs(runs: list[Run], layer: nn.Module, followers: list[tuple[str, nn.Module]],
                 name: str, stop: bool = True, sink: Any = None) -> tuple[Any, list[str]]:
    """Inputs of ``layer`` over ``runs`` (padding dropped), and the followers fed the same tensor.

    A follower shares the input when, on every run, its forward receives the very tensor object
    ``layer`` received, unmodified (same ``_version``), before the forward reaches a follower that
    does not share: its input was computed before ``layer`` ran, so quantizing ``layer`` cannot
    change it. The forward stops there (``stop``), or right after ``layer`` when no follower is
    given.

    With a ``sink`` (an object with ``add(rows (n, in_features) float32)``, e.g. GPTQ's
    :class:`~netpress.quantize.gptq.HessianStats`) each run's rows are handed to it as they are
    seen and never stacked: the inputs are not held whole (MiniLM's FFN output layer: 15 MiB).

    Returns:
        ``(inputs (N, in_features) float32, or the sink, names of the sharing followers in call
        order)``.

    Raises:
        DataError: no run reached the layer, or its inputs hold NaN/Inf (the layer is named).
    """
    rows: list[torch.Tensor] = []
    n_seen, finite = [0], [True]
    mask_now: list[torch.Tensor | None] = [None]
    seen: list[Any] = [None, 0, []]  # the tensor layer got, its _version, followers sharing it
    names = {id(m): n for n, m in followers}

    def hook(_mod: nn.Module, args: tuple[Any, ...]) -> None:
        if seen[0] is not None and stop:  # called again in this run: the first input is enough
            raise _Captured
        x = args[0].detach().to(torch.float32)  # (..., I)
        mask = mask_now[0]
        if mask is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(mask.shape):
            x = x[mask.bool()]  # (tokens, I)
        x = x.reshape(-1, x.shape[-1])
        n_seen[0] += 1
        if sink is None:
            rows.append(x)
        else:
            finite[0] = finite[0] and bool(torch.isfinite(x).all())
            sink.add(x)
        del x
        seen[0], seen[1] = args[0], args[0]._version
        if stop and not followers:
            raise _Captured

    def follower_hook(mod: nn.Module, args: tuple[Any, ...]) -> None:
        if seen[0] is not None and args and args[0] is seen[0] and args[0]._version == seen[1]:
            seen[2].append(names[id(mod)])
        elif seen[0] is not None and stop:
            raise _Captured

    handles = [layer.register_forward_pre_hook(hook)]
    handles += [m.register_forward_pre_hook(follower_hook) for _, m in followers]
    per_run: list[list[str]] = []
    try:
        with torch.no_grad():
            for run, mask in runs:
                mask_now[0] = mask
                seen[:] = [None, 0, []]
                try:
                    run()
                except _Captured:
                    pass
                if seen[0] is not None:
                    per_run.append(list(seen[2]))
    finally:
        for h in handles:
            h.remove()
        seen[0] = mask_now[0] = None  # the last run's tensors
    if not n_seen[0]:
        raise DataError(f"quantize layer {name}", got="no calibration input reached it",
                        expected="calibration batches whose forward uses this layer",
                        fix="pass calibration data for this model, or add the layer to `ignore`")
    n_rows = n_seen[0]
    x = _stack_rows(rows) if sink is None else sink  # empties rows
    if sink is None:
        finite[0] = bool(torch.isfinite(x).all())
    trim_heap()  # the forwards' activations, freed: the layer's own work starts from a lean heap
    if not finite[0]:
        raise DataError(f"quantize layer {name}", got="NaN/Inf in its calibration inputs",
                        expected="finite activations",
                        fix="check the calibration data (and earlier layers) for NaN/Inf")
    shared: list[str] = []
    if len(per_run) == len(runs) == n_rows:
        for i, n in enumerate(per_run[0]):  # the common prefix, each called once per run
            if all(len(p) > i and p[i] == n for p in per_run) and n not in shared:
                shared.append(n)
            else:
                break
    return x, shared


def _stack_rows(rows: list[torch.Tensor]) -> torch.Tensor:
    """``torch.cat(rows)``, emptying ``rows`` as it copies: the captured rows and their
    concatenation are never alive together (peak memory: one copy of the inputs, not two)."""
    out = torch.empty(sum(r.shape[0] for r in rows), rows[0].shape[1], dtype=rows[0].dtype)
    i = 0
    while rows:
        r = rows.pop(0)
        out[i:i + r.shape[0]] = r
        i += r.shape[0]
        del r
    return out


def trim_heap() -> None:
    """Hand the heap's free pages back to the OS (glibc ``malloc_trim(0)``; a no-op elsewhere).

    Called between layers by the sequential methods: each layer allocates and frees tensors of
    tens of MiB (inputs, Hessian, its inverse) whose sizes change from layer to layer, and glibc
    keeps freed heap memory mapped, so without it the resident size ratchets up layer after layer
    (MiniLM GPTQ: ~+100 MiB over the stage). Costs well under a millisecond.

    Example:
        >>> trim_heap()
    """
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def release_file_pages(t: torch.Tensor) -> int:
    """Unmap the clean file-backed pages under ``t`` from this process; returns the bytes released.

    A model loaded from safetensors (transformers, the zoo) holds its weights in a private
    memory map of the file: a weight becomes resident (counted in RSS) once read and stays so
    while the mapping lives, i.e. as long as any other weight of the file is alive, even after the
    layer was replaced by its quantized version. The sequential methods call this on each float
    weight they have replaced (MiniLM: 40 MiB of Linear weights over the stage).

    Only whole pages inside ``t`` that ``/proc/self/pagemap`` reports present and file-backed (not
    written: a written page of a private map is anonymous) are dropped, with
    ``madvise(MADV_DONTNEED)``: such a page holds exactly the file's bytes, so a later read of
    ``t`` maps the same bytes again (from the page cache or the file), whoever still refers to it.
    Anonymous memory (a copied or modified weight) is never touched. A no-op (0) off Linux.

    Example:
        >>> release_file_pages(torch.zeros(1000))  # anonymous memory: nothing to release
        0
    """
    import mmap

    import numpy as np

    libc = _libc()
    if libc is None or t.device.type != "cpu" or not t.is_contiguous() or not t.numel():
        return 0
    page = mmap.PAGESIZE
    start = t.data_ptr()
    lo, hi = -(-start // page) * page, (start + t.numel() * t.element_size()) // page * page
    if hi <= lo:
        return 0
    try:
        with open("/proc/self/pagemap", "rb") as f:
            f.seek(lo // page * 8)
            flags = np.frombuffer(f.read((hi - lo) // page * 8), dtype=np.uint64)
    except OSError:  # pragma: no cover - no pagemap (not Linux, or restricted)
        return 0
    if len(flags) != (hi - lo) // page:  # pragma: no cover - short read
        return 0
    clean = ((flags >> np.uint64(63)) & (flags >> np.uint64(61)) & np.uint64(1)).astype(bool)
    edges = np.flatnonzero(np.diff(np.concatenate(([0], clean.astype(np.int8), [0]))))
    released = 0
    for a, b in zip(edges[::2].tolist(), edges[1::2].tolist(), strict=True):  # runs of clean pages
        if libc.madvise(lo + a * page, (b - a) * page, 4) == 0:  # MADV_DONTNEED
            released += (b - a) * page
    return released


@functools.lru_cache(maxsize=1)
def _libc() -> Any:
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:  # pragma: no cover - no loadable C library
        return None
    if libc is None or not hasattr(libc, "malloc_trim"):  # musl, macOS: nothing to trim
        return None
    libc.malloc_trim.argtypes = [ctypes.c_size_t]
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc


def model_runs(model: nn.Module, batches: list[Any]) -> list[Run]:
    """Whole-model forwards of ``batches`` as :data:`Run` s."""
    return [(lambda b=b: b.run(model), b.mask) for b in batches]


def _first(out: Any) -> Any:
    return out[0] if isinstance(out, (tuple, list)) else out


class BlockCache:
    """Inputs of the blocks of one ``nn.ModuleList``, advanced one block at a time.

    Build with :meth:`build` (``None`` when the model does not qualify); :meth:`runs` gives the
    forwards of the current block on its cached inputs, :meth:`advance_to` pushes the inputs through
    blocks (with whatever layers they hold now, i.e. the quantized ones).
    """

    def __init__(self, prefix: str, blocks: nn.ModuleList, batches: list[Any]) -> None:
        self.prefix, self.blocks, self.batches = prefix, blocks, batches
        self.index = -1  # the block whose inputs are cached (-1: none captured yet)
        self.inputs: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

    @classmethod
    def build(cls, model: nn.Module, batches: list[Any], layer_names: list[str],
              min_blocks: int = 2) -> BlockCache | None:
        """The ModuleList holding the most of ``layer_names`` (in >= ``min_blocks`` blocks), if
        its data flow checks out on the first batch; else ``None``.

        ``min_blocks=1`` also caches a single block's inputs: worth it when each layer is run
        more than once (lowrank's :class:`~netpress.lowrank.sequential.SequentialMoments`)."""
        best: tuple[int, str, nn.ModuleList] | None = None
        for prefix, mod in model.named_modules():
            if not isinstance(mod, nn.ModuleList) or not prefix or len(mod) < 2:
                continue
            hits = {n.split(".")[len(prefix.split("."))] for n in layer_names
                    if n.startswith(prefix + ".")}
            if len(hits) >= min_blocks and (best is None or len(hits) > best[0]):
                best = (len(hits), prefix, mod)
        if best is None or not batches:
            return None
        cache = cls(best[1], best[2], batches)
        return cache if cache._flow_checks(model) else None

    def _flow_checks(self, model: nn.Module) -> bool:
        """One forward of the first two examples of the first batch: block i+1 gets block i's
        output and block 0's other arguments, as the very same objects (two examples: a forward
        of a whole batch cost MiniLM ~90 MiB of transient activations for an identity check)."""
        seen: list[tuple[tuple[Any, ...], dict[str, Any], Any]] = []

        def pre(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            seen.append((args, dict(kwargs), None))

        def post(_m: nn.Module, _args: Any, _kwargs: Any, out: Any) -> None:
            seen[-1] = (*seen[-1][:2], out)

        handles = [b.register_forward_pre_hook(pre, with_kwargs=True) for b in self.blocks]
        handles += [b.register_forward_hook(post, with_kwargs=True) for b in self.blocks]
        try:
            with torch.no_grad():
                self.batches[0].slice(2).run(model)
        except Exception:  # noqa: BLE001 - any surprise: no block cache, the plain path runs
            return False
        finally:
            for h in handles:
                h.remove()
        if len(seen) != len(self.blocks) or not seen[0][0]:
            return False
        args0, kw0, _ = seen[0]
        for (args, kw, _), (_, _, prev_out) in zip(seen[1:], seen[:-1], strict=True):
            if not args or args[0] is not _first(prev_out) or len(args) != len(args0):
                return False
            if any(a is not b for a, b in zip(args[1:], args0[1:], strict=True)):
                return False
            if kw.keys() != kw0.keys() or any(kw[k] is not kw0[k] for k in kw):
                return False
        return True

    def block_of(self, name: str) -> int | None:
        """Index of the block holding layer ``name``, or ``None``."""
        if not name.startswith(self.prefix + "."):
            return None
        part = name[len(self.prefix) + 1:].split(".")[0]
        return int(part) if part.isdigit() and int(part) < len(self.blocks) else None

    def _capture_block0(self, model: nn.Module) -> None:
        def pre(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            self.inputs.append((tuple(args), dict(kwargs)))
            raise _Captured

        handle = self.blocks[0].register_forward_pre_hook(pre, with_kwargs=True)
        try:
            with torch.no_grad():
                for b in self.batches:
                    try:
                        b.run(model)
                    except _Captured:
                        pass
        finally:
            handle.remove()
        if len(self.inputs) != len(self.batches):
            raise DataError(f"quantize block {self.prefix}.0", got="batches that skip the block",
                            expected="every calibration batch to run it",
                            fix="check the calibration data for this model")
        self.index = 0

    def advance_to(self, model: nn.Module, index: int) -> None:
        """Cache the inputs of block ``index`` (forward through the blocks before it)."""
        if self.index < 0:
            self._capture_block0(model)
        with torch.no_grad():
            while self.index < index:
                block = self.blocks[self.index]
                for i, (a, k) in enumerate(self.inputs):  # in place: one batch's old inputs freed
                    self.inputs[i] = ((_first(block(*a, **k)), *a[1:]), k)  # as its output lands
                    del a, k
                self.index += 1
        trim_heap()  # the blocks' activations, freed

    def runs(self) -> list[Run]:
        """Forwards of the current block on its cached inputs."""
        block = self.blocks[self.index]
        return [(lambda a=a, k=k: block(*a, **k), b.mask)
                for (a, k), b in zip(self.inputs, self.batches, strict=True)]


__all__ = ["BlockCache", "Run", "capture_runs", "model_runs", "release_file_pages", "trim_heap"]
