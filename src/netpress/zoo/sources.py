"""Raw real-world data that ships inside installed packages (nothing is downloaded).

These functions return plain numpy arrays / strings; :mod:`netpress.zoo.data` turns them into
batches and :mod:`netpress.zoo.trained` trains the small zoo models on them. Every function is
deterministic and cached in-process.

- digits: ``sklearn.datasets.load_digits`` (1797 scanned 8x8 handwritten digits), fixed stratified
  70/30 split.
- MNIST-1D: ``mnist1d.data.make_dataset(mnist1d.data.get_dataset_args())`` (generated locally, the
  package's own 4000/1000 split; its download path is never used).
- photos: colour photographs bundled with scikit-image and scikit-learn.
- sentences: English prose from the Python documentation (``pydoc_data.topics``, the text behind
  ``help()``), split into sentences with code and markup removed.

Example:
    >>> from netpress.zoo.sources import digits_arrays
    >>> x_train, y_train, x_test, y_test = digits_arrays()
    >>> x_train.shape[1:], x_train.dtype.name, len(x_train) + len(x_test)
    ((1, 8, 8), 'float32', 1797)
"""

from __future__ import annotations

import os
import random
import re
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from netpress.core.errors import DataError

# Fixed, so that the zoo models never see the examples used to evaluate them, whatever `seed`.
DIGITS_SPLIT_SEED = 0
DIGITS_TEST_FRACTION = 0.3

Split = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # x_train, y_train, x_test, y_test


@lru_cache(maxsize=1)
def digits_arrays() -> Split:
    """sklearn digits as ``(x_train, y_train, x_test, y_test)``.

    Returns:
        ``x_*`` float32 ``(N, 1, 8, 8)`` scaled to [0, 1]; ``y_*`` int64 ``(N,)``. The split is a
        fixed stratified 70/30 split (1257 / 540 examples). Arrays are read-only.

    Example:
        >>> xtr, ytr, xte, yte = digits_arrays()
        >>> len(xtr), len(xte), float(xtr.max())
        (1257, 540, 1.0)
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)  # (N, 1, 8, 8)
    y = digits.target.astype(np.int64)  # (N,)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=DIGITS_TEST_FRACTION, stratify=y, random_state=DIGITS_SPLIT_SEED
    )
    return _readonly(x_tr, y_tr, x_te, y_te)


def _make_mnist1d(**overrides: Any) -> dict:
    """``mnist1d.data.make_dataset`` with the package's arguments (``overrides`` replace some),
    the global ``random`` / ``numpy.random`` state saved and restored around it."""
    try:
        import mnist1d.data
    except ImportError as exc:
        raise DataError("zoo data 'mnist1d'", got="package mnist1d missing",
                        expected="the mnist1d package", fix="pip install mnist1d") from exc
    args = mnist1d.data.get_dataset_args()
    for key, value in overrides.items():
        setattr(args, key, value)
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        return mnist1d.data.make_dataset(args)
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)


@lru_cache(maxsize=1)
def mnist1d_arrays() -> Split:
    """MNIST-1D with the package's default arguments as ``(x_train, y_train, x_test, y_test)``.

    Built locally with ``make_dataset`` (never downloaded). ``make_dataset`` reseeds the global
    ``random`` / ``numpy.random`` state; that state is saved and restored around the call.

    Returns:
        ``x_*`` float32 ``(N, 1, 40)``; ``y_*`` int64 ``(N,)``; 4000 train / 1000 test examples.

    Raises:
        DataError: the ``mnist1d`` package is not installed.

    Example:
        >>> xtr, ytr, xte, yte = mnist1d_arrays()
        >>> xtr.shape, xte.shape
        ((4000, 1, 40), (1000, 1, 40))
    """
    ds = _make_mnist1d()
    x_tr = np.asarray(ds["x"], dtype=np.float32)[:, None, :]  # (N, 1, 40)
    x_te = np.asarray(ds["x_test"], dtype=np.float32)[:, None, :]  # (N, 1, 40)
    y_tr = np.asarray(ds["y"], dtype=np.int64)
    y_te = np.asarray(ds["y_test"], dtype=np.int64)
    return _readonly(x_tr, y_tr, x_te, y_te)


MNIST1D_SPLIT_SEED = 42  # the package default: the zoo's train / evaluation split


@lru_cache(maxsize=2)
def mnist1d_unlabeled(n: int, seed: int = 1) -> np.ndarray:
    """``n`` extra MNIST-1D inputs, without labels: a transfer set for distillation.

    Drawn by the same procedural generator as :func:`mnist1d_arrays` (``make_dataset`` with the
    package's arguments) with another ``seed``, so none of them is one of the zoo's train /
    evaluation examples; the generated labels are discarded here (a teacher labels the inputs).
    The set is standardised by its own mean / std, as ``make_dataset`` does for the zoo split.
    The global ``random`` / ``numpy.random`` state is saved and restored around the call.

    Args:
        n: number of inputs, a positive multiple of 10 (``make_dataset`` draws ``n // 10`` per
            template).
        seed: generator seed; must differ from the zoo split's seed (42).

    Returns:
        float32 ``(n, 1, 40)``, read-only.

    Raises:
        DataError: ``n`` is not a positive multiple of 10, ``seed`` is 42, or the ``mnist1d``
            package is not installed.

    Example:
        >>> x = mnist1d_unlabeled(20, seed=1)
        >>> x.shape, x.dtype.name
        ((20, 1, 40), 'float32')
    """
    return _mnist1d_draw(n, seed, "mnist1d_unlabeled")[0]


@lru_cache(maxsize=2)
def mnist1d_generated(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` extra *labelled* MNIST-1D examples: a larger held-out test set.

    The zoo's evaluation split holds 1,000 examples (a standard error of about 0.3 points at
    99 % accuracy); gaps of a fraction of a point between small models need more. These come
    from the same generator as :func:`mnist1d_arrays` with another ``seed`` (the same as
    :func:`mnist1d_unlabeled` draws, with their labels kept), so use a seed no training or
    transfer set uses.

    Args:
        n: number of examples, a positive multiple of 10.
        seed: generator seed, not 42 (the zoo split).

    Returns:
        ``(x, y)``: float32 ``(n, 1, 40)`` and int64 ``(n,)``, read-only.

    Raises:
        DataError: as :func:`mnist1d_unlabeled`.

    Example:
        >>> x, y = mnist1d_generated(20, seed=3)
        >>> x.shape, y.shape, sorted(set(y.tolist())) == list(range(10))
        ((20, 1, 40), (20,), True)
    """
    return _mnist1d_draw(n, seed, "mnist1d_generated")


def _mnist1d_draw(n: int, seed: int, where: str) -> tuple[np.ndarray, np.ndarray]:
    if n <= 0 or n % 10:
        raise DataError(f"{where}(n)", got=n, expected="a positive multiple of 10",
                        fix="round n to a multiple of 10 (n // 10 inputs per digit template)")
    if seed == MNIST1D_SPLIT_SEED:
        raise DataError(f"{where}(seed)", got=seed,
                        expected=f"a seed other than {MNIST1D_SPLIT_SEED}",
                        fix="pick another seed: 42 regenerates the zoo's own train / evaluation "
                            "examples")
    ds = _make_mnist1d(num_samples=int(n), train_split=1.0, seed=int(seed))
    x = np.asarray(ds["x"], dtype=np.float32)[:, None, :]  # (n, 1, 40)
    y = np.asarray(ds["y"], dtype=np.int64)  # (n,)
    return _frozen(x), _frozen(y)


def _frozen(a: np.ndarray) -> np.ndarray:
    """A contiguous, read-only copy (or view) of ``a``."""
    a = np.ascontiguousarray(a)
    a.flags.writeable = False
    return a


def _readonly(x_tr: np.ndarray, y_tr: np.ndarray, x_te: np.ndarray, y_te: np.ndarray) -> Split:
    return _frozen(x_tr), _frozen(y_tr), _frozen(x_te), _frozen(y_te)


# ---------------------------------------------------------------------------------------------
# photos
# ---------------------------------------------------------------------------------------------


def _skimage(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        import skimage.data

        if name == "motorcycle":
            return skimage.data.stereo_motorcycle()[0]  # left view only: the right is a near copy
        return getattr(skimage.data, name)()

    return load


def _sklearn(index: int) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        from sklearn.datasets import load_sample_images

        return load_sample_images().images[index]

    return load


# Colour photographs that ship inside the installed packages. The split is fixed and balanced by
# how confident ImageNet MobileNetV2 is on each (measured once): calibration and evaluation never
# share a source image. skimage's `cat` is the same picture as `chelsea`, so it is not used; the
# images that skimage fetches over the network (eagle, lily, skin, ...) are not used either.
CALIBRATION_PHOTOS: dict[str, Callable[[], np.ndarray]] = {
    "skimage:chelsea": _skimage("chelsea"),
    "skimage:rocket": _skimage("rocket"),
    "skimage:immunohistochemistry": _skimage("immunohistochemistry"),
    "sklearn:flower": _sklearn(1),
}
EVALUATION_PHOTOS: dict[str, Callable[[], np.ndarray]] = {
    "skimage:astronaut": _skimage("astronaut"),
    "skimage:coffee": _skimage("coffee"),
    "skimage:hubble_deep_field": _skimage("hubble_deep_field"),
    "skimage:retina": _skimage("retina"),
    "skimage:motorcycle": _skimage("motorcycle"),
    "sklearn:china": _sklearn(0),
}


@lru_cache(maxsize=2)
def photo_sources(split: str) -> tuple[tuple[str, np.ndarray], ...]:
    """The source photographs of one split as ``((id, HxWx3 uint8 array), ...)``.

    Args:
        split: ``"calibration"`` or ``"evaluation"`` (disjoint sets of images).

    Returns:
        The images that load offline, in a fixed order. Arrays are read-only.

    Raises:
        DataError: unknown split, or none of its images can be loaded.

    Example:
        >>> [name for name, _ in photo_sources("calibration")][:2]
        ['skimage:chelsea', 'skimage:rocket']
    """
    table = {"calibration": CALIBRATION_PHOTOS, "evaluation": EVALUATION_PHOTOS}.get(split)
    if table is None:
        raise DataError("photo split", got=split, expected="'calibration' or 'evaluation'",
                        fix="ask for one of the two splits")
    out = []
    failures = []
    for name, load in table.items():
        try:
            img = np.asarray(load())
        except Exception as exc:  # an image that needs the network is skipped
            failures.append(f"{name} ({type(exc).__name__})")
            continue
        if img.ndim != 3 or img.shape[2] < 3:
            failures.append(f"{name} (shape {img.shape})")
            continue
        img = np.ascontiguousarray(img[..., :3].astype(np.uint8))  # (H, W, 3)
        img.flags.writeable = False
        out.append((name, img))
    if not out:
        raise DataError(f"photos ({split})", got=f"no loadable images; failed: {failures}",
                        expected="the photos bundled with scikit-image and scikit-learn",
                        fix="reinstall scikit-image and scikit-learn")
    return tuple(out)


# ---------------------------------------------------------------------------------------------
# sentences
# ---------------------------------------------------------------------------------------------

_HEADING = re.compile(r"^[*=\-~^]{3,}$")
_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"“])")
_EMPHASIS = re.compile(r"\*([^*\s][^*]*)\*")
# code-looking tokens: grammar rules, prompts, calls, indexing, dotted/underscored names, operators
_CODE = re.compile(r"::=|>>>|\w\(|\[\d|\w_\w|\w\.\w|[{}<>|\\@#$%]|\s[-+*/=]{1,2}\s|__")
_ABBREV_END = (" e.g.", " i.e.", " etc.", " vs.")


@lru_cache(maxsize=1)
def sentences() -> tuple[str, ...]:
    """English sentences written by people: the prose of Python's ``help()`` topics.

    Paragraphs that are indented (code, grammar) or are headings are dropped, ``*emphasis*`` is
    unwrapped, and sentences that contain code-looking tokens, are shorter than 30 or longer than
    300 characters, or are mostly non-letters are skipped. Duplicates are removed; order is fixed.

    Returns:
        The sentences (673 on CPython 3.11).

    Raises:
        DataError: ``pydoc_data`` is missing (some stripped-down Python builds).

    Example:
        >>> s = sentences()
        >>> len(s) > 600, all(x[0].isupper() or x[0] in '"“' for x in s)
        (True, True)
    """
    try:
        from pydoc_data.topics import topics
    except ImportError as exc:
        raise DataError("zoo data 'sentences'", got="pydoc_data missing",
                        expected="the standard library's pydoc_data package",
                        fix="use a full CPython installation (not a stripped build)") from exc
    seen: dict[str, None] = {}
    for key in sorted(topics):
        for para in re.split(r"\n\s*\n", topics[key]):
            lines = para.split("\n")
            if any(line.startswith((" ", "\t")) for line in lines):
                continue  # code block, grammar rule or indented example
            if any(_HEADING.match(line.strip()) for line in lines):
                continue
            flat = _EMPHASIS.sub(r"\1", " ".join(line.strip() for line in lines))
            for sent in _SPLIT.split(flat):
                sent = re.sub(r"\s+", " ", sent).strip()
                if _is_prose(sent):
                    seen.setdefault(sent, None)
    return tuple(seen)


# stdlib folders whose docstrings are not prose worth having (tests, GUIs, vendored code)
_DOC_SKIP = frozenset({"test", "tests", "idlelib", "site-packages", "lib2to3", "turtledemo",
                       "tkinter", "ensurepip", "__pycache__"})


@lru_cache(maxsize=1)
def docstring_sentences() -> tuple[str, ...]:
    """English sentences from the docstrings of the Python standard library (a training corpus).

    The stdlib's ``.py`` files are parsed with :mod:`ast` (nothing is imported or run); module,
    class and function docstrings go through the same paragraph and prose filters as
    :func:`sentences`, and any sentence that also occurs in :func:`sentences` is dropped, so this
    corpus never overlaps the evaluation sentences. Parsing takes ~10 s, so the result is cached
    as JSON in the netpress cache dir, keyed by the Python version.

    Returns:
        The sentences in a fixed order (about 7,000 on CPython 3.11).

    Example:
        >>> d = docstring_sentences()  # doctest: +SKIP
        >>> len(d) > 5000, not set(d) & set(sentences())  # doctest: +SKIP
        (True, True)
    """
    import json
    import sys
    import sysconfig

    from netpress.zoo.trained import cache_dir

    path = cache_dir() / f"docstring-sentences-{sys.version_info[0]}.{sys.version_info[1]}.json"
    try:
        return tuple(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError):
        pass
    out = _docstring_prose(Path(sysconfig.get_paths()["stdlib"]))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(out), encoding="utf-8")
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only cache only costs the parse next time
    return out


def _docstring_prose(root: Path) -> tuple[str, ...]:
    import ast

    held_out = set(sentences())
    seen: dict[str, None] = {}
    files = sorted(p for p in root.rglob("*.py")
                   if not _DOC_SKIP.intersection(p.relative_to(root).parts))
    for f in files:
        try:
            tree = ast.parse(f.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError, ValueError):
            continue
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef,
                                     ast.AsyncFunctionDef)):
                continue
            for para in re.split(r"\n\s*\n", ast.get_docstring(node) or ""):
                lines = para.split("\n")
                if any(line.startswith((" ", "\t")) for line in lines):
                    continue
                flat = _EMPHASIS.sub(r"\1", " ".join(line.strip() for line in lines))
                for sent in _SPLIT.split(flat):
                    sent = re.sub(r"\s+", " ", sent).strip()
                    if _is_prose(sent) and sent not in held_out:
                        seen.setdefault(sent, None)
    return tuple(seen)


def _is_prose(sent: str) -> bool:
    if not 30 <= len(sent) <= 300:
        return False
    if not re.match(r"^[A-Z\"“][a-z\"]", sent) or not sent.endswith((".", "?", "!")):
        return False
    if _CODE.search(sent) or "*" in sent or sent.endswith(_ABBREV_END):
        return False
    letters = sum(c.isalpha() or c.isspace() for c in sent)
    return letters >= 0.9 * len(sent)


__all__ = [
    "CALIBRATION_PHOTOS",
    "EVALUATION_PHOTOS",
    "digits_arrays",
    "mnist1d_arrays",
    "mnist1d_generated",
    "mnist1d_unlabeled",
    "photo_sources",
    "sentences",
]
