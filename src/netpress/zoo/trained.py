"""Small CNNs trained on real data on first use, then cached by content hash.

``digits_cnn`` (sklearn digits, 8x8 images) and ``mnist1d_cnn`` (MNIST-1D, length-40 signals) are
plain ``nn.Sequential`` stacks of Conv / BatchNorm / ReLU / MaxPool / Linear, so every pruning,
quantization and export path applies to them. Training is seeded and runs on 1 thread; the
weights are cached as safetensors under ``<cache>/zoo/<name>-<hash>.safetensors`` where ``<cache>``
is ``$NETPRESS_CACHE`` or ``platformdirs.user_cache_dir("netpress")`` and ``<hash>`` covers this
file's source (architecture + training code), the hyper-parameters and the training data. The file
is written atomically (temporary file + ``os.replace``), so concurrent first uses are safe.

Example:
    >>> import torch
    >>> from netpress.zoo.trained import build_trained
    >>> build_trained("digits_cnn")(torch.zeros(2, 1, 8, 8)).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from netpress.core.errors import ModelError
from netpress.zoo.sources import digits_arrays, mnist1d_arrays

logger = logging.getLogger(__name__)

CACHE_ENV = "NETPRESS_CACHE"
# One thread: these models are too small to gain from intra-op parallelism, and on a busy 2-core
# machine two OpenMP threads spin against other processes (measured 3-4x slower than one). A fixed
# count also keeps the weights bit-identical from run to run.
TRAIN_THREADS = 1


@dataclass(frozen=True)
class TrainSpec:
    """Hyper-parameters of one zoo model (part of the cache key).

    Args:
        width: channels of the first conv layer (deeper layers use multiples of it).
        epochs: passes over the training split.
        lr: peak learning rate of the one-cycle AdamW schedule.
        batch_size: examples per optimisation step.
        weight_decay: AdamW weight decay.
        seed: seeds weight init and batch order.
    """

    width: int
    epochs: int
    lr: float
    batch_size: int = 64
    weight_decay: float = 1e-4
    seed: int = 0


def digits_cnn(width: int = 16) -> nn.Sequential:
    """CNN for 8x8 digits: 3 conv blocks, 2 max-pools, one Linear head.

    Args:
        width: channels of the first conv (then ``2*width`` and ``4*width``).

    Returns:
        An untrained ``nn.Sequential`` mapping ``(B, 1, 8, 8)`` to logits ``(B, 10)``.

    Example:
        >>> digits_cnn(8)(torch.zeros(1, 1, 8, 8)).shape
        torch.Size([1, 10])
    """
    w = width
    return nn.Sequential(
        nn.Conv2d(1, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(),  # (B, w, 8, 8)
        nn.Conv2d(w, 2 * w, 3, padding=1), nn.BatchNorm2d(2 * w), nn.ReLU(),
        nn.MaxPool2d(2),  # (B, 2w, 4, 4)
        nn.Conv2d(2 * w, 4 * w, 3, padding=1), nn.BatchNorm2d(4 * w), nn.ReLU(),
        nn.MaxPool2d(2),  # (B, 4w, 2, 2)
        nn.Flatten(),  # (B, 16w)
        nn.Linear(4 * w * 2 * 2, 10),  # (B, 10)
    )


def mnist1d_cnn(width: int = 32) -> nn.Sequential:
    """1-D CNN for MNIST-1D: 4 conv blocks (two with stride 2), one Linear head.

    Args:
        width: channels of the first two convs (then ``2*width``).

    Returns:
        An untrained ``nn.Sequential`` mapping ``(B, 1, 40)`` to logits ``(B, 10)``.

    Example:
        >>> mnist1d_cnn(8)(torch.zeros(1, 1, 40)).shape
        torch.Size([1, 10])
    """
    w = width
    return nn.Sequential(
        nn.Conv1d(1, w, 5, padding=2), nn.BatchNorm1d(w), nn.ReLU(),  # (B, w, 40)
        nn.Conv1d(w, w, 3, stride=2, padding=1), nn.BatchNorm1d(w), nn.ReLU(),  # (B, w, 20)
        nn.Conv1d(w, 2 * w, 3, padding=1), nn.BatchNorm1d(2 * w), nn.ReLU(),  # (B, 2w, 20)
        nn.Conv1d(2 * w, 2 * w, 3, stride=2, padding=1), nn.BatchNorm1d(2 * w), nn.ReLU(),
        nn.Flatten(),  # (B, 2w * 10)
        nn.Linear(2 * w * 10, 10),  # (B, 10)
    )


ArraysFn = Callable[[], tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]

# name -> (architecture builder, data, hyper-parameters). Measured on 2 cores: see tests/zoo.
TRAINED: dict[str, tuple[Callable[[int], nn.Sequential], ArraysFn, TrainSpec]] = {
    "digits_cnn": (digits_cnn, digits_arrays, TrainSpec(width=16, epochs=12, lr=0.01)),
    "mnist1d_cnn": (mnist1d_cnn, mnist1d_arrays, TrainSpec(width=32, epochs=15, lr=0.01)),
}


def _entry(name: str) -> tuple[Callable[[int], nn.Sequential], ArraysFn, TrainSpec]:
    if name not in TRAINED:
        raise ModelError("zoo model", got=name, expected=f"one of {sorted(TRAINED)}",
                         fix="pick a trained zoo model name")
    return TRAINED[name]


def build_trained(name: str) -> nn.Sequential:
    """The architecture of a trained zoo model, with fresh (untrained) weights.

    Args:
        name: ``"digits_cnn"`` or ``"mnist1d_cnn"``.

    Returns:
        The ``nn.Sequential`` (train mode, as built).

    Raises:
        ModelError: unknown name.

    Example:
        >>> type(build_trained("mnist1d_cnn")).__name__
        'Sequential'
    """
    builder, _, spec = _entry(name)
    return builder(spec.width)


def cache_dir() -> Path:
    """Root of netpress's on-disk cache: ``$NETPRESS_CACHE`` or the platform user cache dir.

    Example:
        >>> isinstance(cache_dir(), Path)
        True
    """
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("netpress"))


def content_hash(name: str) -> str:
    """SHA-256 of this module's source, the model's hyper-parameters and its training data.

    Args:
        name: a trained zoo model name.

    Returns:
        64 hex digits; the cache file name uses the first 16.

    Example:
        >>> len(content_hash("digits_cnn"))
        64
    """
    _, arrays, spec = _entry(name)
    x_train, y_train, _, _ = arrays()
    digest = hashlib.sha256()
    digest.update(inspect.getsource(sys.modules[__name__]).encode())
    digest.update(json.dumps({"name": name, **asdict(spec)}, sort_keys=True).encode())
    for arr in (x_train, y_train):
        digest.update(str((arr.dtype.str, arr.shape)).encode())
        digest.update(np.ascontiguousarray(arr).tobytes())
    return digest.hexdigest()


def cache_path(name: str) -> Path:
    """Where the trained weights of ``name`` are (or will be) cached.

    Example:
        >>> cache_path("digits_cnn").name.startswith("digits_cnn-")
        True
    """
    return cache_dir() / "zoo" / f"{name}-{content_hash(name)[:16]}.safetensors"


def load_trained(name: str) -> nn.Sequential:
    """The trained model ``name`` in eval mode: from the cache, or trained now and cached.

    Args:
        name: ``"digits_cnn"`` or ``"mnist1d_cnn"``.

    Returns:
        The trained ``nn.Sequential`` in eval mode.

    Raises:
        ModelError: unknown name.

    Example:
        >>> model = load_trained("digits_cnn")  # trains once (a few seconds), then cached
        >>> model.training
        False
    """
    from safetensors.torch import load_file

    model = build_trained(name)
    path = cache_path(name)
    if path.is_file():
        try:
            model.load_state_dict(load_file(str(path)))
            return model.eval()
        except Exception as exc:  # corrupt or stale file: retrain and overwrite it
            logger.warning("ignoring unreadable zoo cache %s (%s); retraining", path, exc)
    state, meta = train(name)
    model.load_state_dict(state)
    _save_atomic(state, meta, path)
    return model.eval()


def train(name: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Train ``name`` from scratch, deterministically; the global RNG and thread count are kept.

    Args:
        name: a trained zoo model name.

    Returns:
        ``(state_dict, metadata)``; metadata holds ``test_accuracy`` and ``train_seconds`` (as
        strings, the safetensors metadata format).

    Raises:
        ModelError: unknown name.

    Example:
        >>> state, meta = train("digits_cnn")
        >>> float(meta["test_accuracy"]) > 0.9
        True
    """
    builder, arrays, spec = _entry(name)
    x_train, y_train, x_test, y_test = (torch.from_numpy(np.array(a)) for a in arrays())
    logger.info("training zoo model %s on first use (cached afterwards)", name)
    threads = torch.get_num_threads()
    start = time.perf_counter()
    try:
        torch.set_num_threads(TRAIN_THREADS)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(spec.seed)
            model = builder(spec.width)
            _fit(model, x_train, y_train, spec)
    finally:
        torch.set_num_threads(threads)
    seconds = time.perf_counter() - start
    acc = accuracy(model, x_test, y_test)
    logger.info("trained %s in %.1f s: held-out accuracy %.4f", name, seconds, acc)
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    meta = {"name": name, "hash": content_hash(name), "test_accuracy": f"{acc:.6f}",
            "train_seconds": f"{seconds:.2f}", "spec": json.dumps(asdict(spec))}
    return state, meta


def _fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, spec: TrainSpec) -> None:
    """AdamW + one-cycle schedule, cross-entropy, seeded batch order."""
    steps_per_epoch = (len(x) + spec.batch_size - 1) // spec.batch_size
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=spec.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=spec.lr, total_steps=spec.epochs * steps_per_epoch
    )
    gen = torch.Generator().manual_seed(spec.seed)
    model.train()
    for _ in range(spec.epochs):
        order = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), spec.batch_size):
            idx = order[i : i + spec.batch_size]
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])  # logits (b, 10)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512) -> float:
    """Top-1 accuracy of ``model`` (put in eval mode) on ``(x, y)``.

    Example:
        >>> m = digits_cnn(4)
        >>> 0.0 <= accuracy(m, torch.zeros(3, 1, 8, 8), torch.zeros(3, dtype=torch.long)) <= 1.0
        True
    """
    model.eval()
    correct = 0
    for i in range(0, len(x), batch_size):
        correct += int((model(x[i : i + batch_size]).argmax(1) == y[i : i + batch_size]).sum())
    return correct / max(len(x), 1)


def _save_atomic(state: dict[str, torch.Tensor], meta: dict[str, str], path: Path) -> None:
    """Write ``state`` to ``path`` via a temporary file in the same folder and ``os.replace``."""
    from safetensors.torch import save_file

    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        save_file(state, tmp, metadata=meta)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; the cache is an ordinary user file
        os.replace(tmp, path)
        tmp = None
    except OSError as exc:  # read-only cache: the model still works, it is just not cached
        logger.warning("could not cache zoo model at %s (%s); set %s to a writable folder",
                       path, exc, CACHE_ENV)
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def cached_metadata(name: str) -> dict[str, str] | None:
    """Metadata stored with the cached weights of ``name`` (accuracy, training time), if cached.

    Example:
        >>> _ = load_trained("digits_cnn")
        >>> sorted(cached_metadata("digits_cnn"))[:3]
        ['hash', 'name', 'spec']
    """
    from safetensors import safe_open

    path = cache_path(name)
    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


__all__ = [
    "TRAINED",
    "TrainSpec",
    "accuracy",
    "build_trained",
    "cache_dir",
    "cache_path",
    "cached_metadata",
    "content_hash",
    "digits_cnn",
    "load_trained",
    "mnist1d_cnn",
    "train",
]
