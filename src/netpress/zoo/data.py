"""Real data for the zoo models, as calibration / train / evaluation lists of :class:`Batch`.

- ``photos``: 224x224 crops of colour photos bundled with scikit-image / scikit-learn, no labels;
  inputs ``(B, 3, 224, 224)``; metric ``top1_agreement``.
- ``digits``: sklearn digits, fixed stratified 70/30 split; ``(B, 1, 8, 8)``; ``accuracy``.
- ``mnist1d``: MNIST-1D, the package's 4000/1000 split; ``(B, 1, 40)``; ``accuracy``.
- ``sentences``: prose sentences of Python's ``help()`` topics, MiniLM-tokenised; dicts of
  ``(B, T)`` int64 ``input_ids`` / ``attention_mask``; ``cosine``.

Evaluation examples never come from the same source as calibration / train examples: photos are
split by source image, sentences by sentence, digits / MNIST-1D by their fixed held-out split
(fixed whatever ``seed``, so the zoo models never see the examples that evaluate them). ``seed``
sets crop positions, sentence shuffling and the order of the training batches.

Bundles are cached in-process: the batches of two calls share tensors, so do not modify them in
place.

Example:
    >>> from netpress.zoo.data import load_data
    >>> bundle = load_data("digits")
    >>> bundle.evaluation[0].inputs[0].shape, bundle.default_metric
    (torch.Size([32, 1, 8, 8]), 'accuracy')
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import torch

from netpress.core.data import Batch
from netpress.core.errors import DataError, ModelError
from netpress.zoo.sources import (
    digits_arrays,
    docstring_sentences,
    mnist1d_arrays,
    photo_sources,
    sentences,
)

BATCH_SIZE = 32
CALIBRATION_EXAMPLES = 256  # digits / MNIST-1D: the first 256 (shuffled) training examples
PHOTO_SIZE = 224
PHOTO_CALIBRATION_CROPS = 256
PHOTO_EVALUATION_CROPS = 400
# Random-resized-crop style: each crop covers this fraction of its source image's area, with a
# log-uniform aspect ratio in [3/4, 4/3], a random position and a horizontal flip half the time.
PHOTO_SCALES = (1.0, 0.6, 0.35, 0.2, 0.1)
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
SENTENCE_CALIBRATION = 100
SENTENCE_TRAIN = 2048  # stdlib docstring sentences for fine-tuning / larger calibration
SENTENCE_MAX_LENGTH = 128

_DEFAULT_DATA = {
    "digits_cnn": "digits",
    "minilm": "sentences",
    "mnist1d_cnn": "mnist1d",
    "mobilenet_v2": "photos",
}


@dataclass
class DataBundle:
    """Calibration, training and held-out evaluation batches of one zoo data set.

    Attributes:
        name: the data set name.
        calibration: batches for calibration / fine-tuning (from the training sources).
        train: the fine-tuning split (may share calibration's sources, never evaluation's).
        evaluation: held-out batches; their sources are disjoint from calibration and train.
        task: ``"classification"`` or ``"embedding"``.
        default_metric: ``"accuracy"``, ``"top1_agreement"`` or ``"cosine"``.
        description: one paragraph for reports.
        sources: per split, the source id of every example in batch order (a photo's source
            image, a sentence's text, a digit's index in its split); used to check disjointness.
    """

    name: str
    calibration: list[Batch]
    train: list[Batch]
    evaluation: list[Batch]
    task: str
    default_metric: str
    description: str
    sources: dict[str, list[str]] = field(default_factory=dict)


def data_names() -> list[str]:
    """Names accepted by :func:`load_data`, sorted.

    Example:
        >>> data_names()
        ['digits', 'mnist1d', 'photos', 'sentences']
    """
    return sorted(_BUILDERS)


def default_data(model_name: str) -> str:
    """The zoo data set that goes with a zoo model.

    Args:
        model_name: a zoo model name.

    Returns:
        A name accepted by :func:`load_data`.

    Raises:
        ModelError: unknown model name.

    Example:
        >>> default_data("mobilenet_v2")
        'photos'
    """
    if model_name not in _DEFAULT_DATA:
        raise ModelError("zoo model", got=model_name, expected=f"one of {sorted(_DEFAULT_DATA)}",
                         fix="use a zoo model name, e.g. mobilenet_v2")
    return _DEFAULT_DATA[model_name]


def load_data(name: str, seed: int = 0) -> DataBundle:
    """Load a zoo data set as batches (cached in-process; fresh lists on every call).

    Args:
        name: one of :func:`data_names`.
        seed: crop positions (photos), sentence shuffle (sentences), training-batch order
            (digits, mnist1d). Held-out splits of digits / MNIST-1D do not depend on it.

    Returns:
        The :class:`DataBundle`; batches hold 32 examples (the last may hold fewer).

    Raises:
        DataError: unknown name, a bad seed, or the data cannot be built.

    Example:
        >>> bundle = load_data("sentences")
        >>> sorted(bundle.evaluation[0].inputs), bundle.evaluation[0].inputs["input_ids"].dtype
        (['attention_mask', 'input_ids'], torch.int64)
    """
    if name not in _BUILDERS:
        raise DataError("zoo data", got=name, expected=f"one of {data_names()}",
                        fix="use e.g. data: zoo:photos")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise DataError(f"zoo data {name!r} seed", got=seed, expected="an integer >= 0",
                        fix="pass e.g. seed=0")
    bundle = _cached_bundle(name, int(seed))
    return dataclasses.replace(
        bundle,
        calibration=list(bundle.calibration),
        train=list(bundle.train),
        evaluation=list(bundle.evaluation),
        sources={k: list(v) for k, v in bundle.sources.items()},
    )


def clear_cache() -> None:
    """Drop the in-process cache of bundles (the photos bundle holds ~400 MB).

    Example:
        >>> clear_cache()
    """
    _cached_bundle.cache_clear()


@lru_cache(maxsize=4)
def _cached_bundle(name: str, seed: int) -> DataBundle:
    return _BUILDERS[name](seed)


def _tensor_batches(
    x: torch.Tensor, y: torch.Tensor | None, batch_size: int = BATCH_SIZE
) -> list[Batch]:
    return [
        Batch((x[i : i + batch_size],), None if y is None else y[i : i + batch_size])
        for i in range(0, len(x), batch_size)
    ]


# ---------------------------------------------------------------------------------------------
# photos
# ---------------------------------------------------------------------------------------------


def _photos(seed: int) -> DataBundle:
    cal_x, cal_ids = make_crops(photo_sources("calibration"), PHOTO_CALIBRATION_CROPS, seed, 0)
    eval_x, eval_ids = make_crops(photo_sources("evaluation"), PHOTO_EVALUATION_CROPS, seed, 1)
    calibration = _tensor_batches(torch.from_numpy(cal_x), None)
    cal_names = sorted(set(cal_ids))
    eval_names = sorted(set(eval_ids))
    return DataBundle(
        name="photos",
        calibration=calibration,
        train=calibration,
        evaluation=_tensor_batches(torch.from_numpy(eval_x), None),
        task="classification",
        default_metric="top1_agreement",
        description=(
            f"{len(cal_ids)} calibration crops from {len(cal_names)} photos ({', '.join(cal_names)})"
            f" and {len(eval_ids)} evaluation crops from {len(eval_names)} other photos"
            f" ({', '.join(eval_names)}), bundled with scikit-image and scikit-learn; "
            f"{PHOTO_SIZE}x{PHOTO_SIZE} random-resized crops (area {min(PHOTO_SCALES)}-"
            f"{max(PHOTO_SCALES)}, flips), ImageNet-normalised; no labels (agreement with the "
            "original model's top-1)."
        ),
        sources={"calibration": cal_ids, "train": cal_ids, "evaluation": eval_ids},
    )


def make_crops(
    images: Sequence[tuple[str, np.ndarray]], n: int, seed: int, stream: int = 0
) -> tuple[np.ndarray, list[str]]:
    """``n`` random-resized 224x224 crops, cycling over ``images`` and over :data:`PHOTO_SCALES`.

    Args:
        images: ``(id, HxWx3 uint8)`` source photos.
        n: number of crops.
        seed: random seed of positions, aspect ratios and flips.
        stream: a second seed component, so different splits draw independent crops.

    Returns:
        ``(crops, ids)``: float32 ``(n, 3, 224, 224)`` ImageNet-normalised, and each crop's source
        id.

    Raises:
        DataError: ``images`` is empty.

    Example:
        >>> img = np.zeros((300, 400, 3), dtype=np.uint8)
        >>> x, ids = make_crops([("black", img)], 2, seed=0)
        >>> x.shape, ids
        ((2, 3, 224, 224), ['black', 'black'])
    """
    from PIL import Image

    if not images:
        raise DataError("photo crops", got="no source images", expected="at least one image",
                        fix="check scikit-image and scikit-learn are installed")
    rng = np.random.default_rng([seed, stream])
    pils = [Image.fromarray(np.asarray(img)) for _, img in images]
    out = np.empty((n, PHOTO_SIZE, PHOTO_SIZE, 3), dtype=np.uint8)  # (n, H, W, C)
    ids = []
    for i in range(n):
        k = i % len(images)
        scale = PHOTO_SCALES[(i // len(images)) % len(PHOTO_SCALES)]
        box = _crop_box(images[k][1].shape[1], images[k][1].shape[0], scale, rng)
        crop = pils[k].resize((PHOTO_SIZE, PHOTO_SIZE), Image.Resampling.BILINEAR, box=box)
        arr = np.asarray(crop)  # (224, 224, 3)
        out[i] = arr[:, ::-1] if rng.random() < 0.5 else arr
        ids.append(images[k][0])
    x = out.astype(np.float32) / 255.0
    x = (x - IMAGENET_MEAN) / IMAGENET_STD  # (n, H, W, C)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2)), ids  # (n, C, H, W)


def _crop_box(
    width: int, height: int, scale: float, rng: np.random.Generator
) -> tuple[int, int, int, int]:
    area = scale * width * height
    ratio = float(np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3))))
    w = min(width, max(1, round((area * ratio) ** 0.5)))
    h = min(height, max(1, round((area / ratio) ** 0.5)))
    x0 = int(rng.integers(0, width - w + 1))
    y0 = int(rng.integers(0, height - h + 1))
    return x0, y0, x0 + w, y0 + h


# ---------------------------------------------------------------------------------------------
# labelled arrays: digits, MNIST-1D
# ---------------------------------------------------------------------------------------------


def _labelled(
    name: str,
    arrays: Callable[[], tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]],
    seed: int,
    description: str,
) -> DataBundle:
    x_tr, y_tr, x_te, y_te = arrays()
    order = np.random.default_rng(seed).permutation(len(x_tr))
    train = _tensor_batches(torch.from_numpy(x_tr[order]), torch.from_numpy(y_tr[order]))
    n_cal = CALIBRATION_EXAMPLES // BATCH_SIZE
    train_ids = [f"{name}:train:{i}" for i in order]
    return DataBundle(
        name=name,
        calibration=train[:n_cal],
        train=train,
        evaluation=_tensor_batches(torch.from_numpy(np.array(x_te)), torch.from_numpy(np.array(y_te))),
        task="classification",
        default_metric="accuracy",
        description=(
            f"{description}: {len(x_tr)} training examples (the first {n_cal * BATCH_SIZE} are the "
            f"calibration set) and {len(x_te)} held-out evaluation examples, 10 classes."
        ),
        sources={
            "calibration": train_ids[: n_cal * BATCH_SIZE],
            "train": train_ids,
            "evaluation": [f"{name}:test:{i}" for i in range(len(x_te))],
        },
    )


def _digits(seed: int) -> DataBundle:
    return _labelled("digits", digits_arrays, seed,
                     "sklearn digits (scanned 8x8 handwritten digits, pixels scaled to [0, 1]), "
                     "fixed stratified 70/30 split")


def _mnist1d(seed: int) -> DataBundle:
    return _labelled("mnist1d", mnist1d_arrays, seed,
                     "MNIST-1D (length-40 signals built locally with mnist1d.make_dataset), "
                     "the package's own train/test split")


# ---------------------------------------------------------------------------------------------
# sentences
# ---------------------------------------------------------------------------------------------


def _sentences(seed: int) -> DataBundle:
    from netpress.zoo.models import tokenizer

    texts = list(sentences())
    random.Random(seed).shuffle(texts)
    cal, ev = texts[:SENTENCE_CALIBRATION], texts[SENTENCE_CALIBRATION:]
    if not ev:
        raise DataError("zoo data 'sentences'", got=f"{len(texts)} sentences",
                        expected=f"more than {SENTENCE_CALIBRATION}",
                        fix="use a full CPython installation (pydoc_data)")
    train = list(docstring_sentences())
    random.Random(seed).shuffle(train)
    train = train[:SENTENCE_TRAIN]
    tok = tokenizer("minilm")
    return DataBundle(
        name="sentences",
        calibration=tokenize(tok, cal),
        train=tokenize(tok, train),
        evaluation=tokenize(tok, ev),
        task="embedding",
        default_metric="cosine",
        description=(
            f"{len(cal)} calibration and {len(ev)} evaluation sentences (disjoint) of English "
            "prose from Python's help() topics (pydoc_data), code and markup removed; "
            f"{len(train)} train sentences from the standard library's docstrings (none of them "
            "among the help() sentences); MiniLM WordPiece tokens, padded per batch, at most "
            f"{SENTENCE_MAX_LENGTH} tokens."
        ),
        sources={"calibration": cal, "train": train, "evaluation": ev},
    )


def tokenize(tok: object, texts: Sequence[str], batch_size: int = BATCH_SIZE) -> list[Batch]:
    """Tokenise ``texts`` into batches of ``{input_ids, attention_mask}`` (int64, padded per batch).

    Args:
        tok: a Hugging Face tokenizer (e.g. ``netpress.zoo.tokenizer("minilm")``).
        texts: the sentences.
        batch_size: sentences per batch.

    Returns:
        The batches, each ``(B, T)`` with ``T`` the longest sentence of the batch (at most 128).

    Example:
        >>> from netpress.zoo.models import tokenizer
        >>> b = tokenize(tokenizer("minilm"), ["One.", "Two words."])[0]
        >>> b.inputs["input_ids"].shape
        torch.Size([2, 5])
    """
    out = []
    for i in range(0, len(texts), batch_size):
        enc = tok(  # type: ignore[operator]
            list(texts[i : i + batch_size]), padding=True, truncation=True,
            max_length=SENTENCE_MAX_LENGTH, return_tensors="pt",
        )
        out.append(Batch({
            "input_ids": enc["input_ids"].to(torch.int64),  # (B, T)
            "attention_mask": enc["attention_mask"].to(torch.int64),  # (B, T)
        }))
    return out


_BUILDERS: dict[str, Callable[[int], DataBundle]] = {
    "digits": _digits,
    "mnist1d": _mnist1d,
    "photos": _photos,
    "sentences": _sentences,
}

__all__ = [
    "DataBundle",
    "clear_cache",
    "data_names",
    "default_data",
    "load_data",
    "make_crops",
    "tokenize",
]
