"""ONNX export, an ONNX Runtime runner, and verification against PyTorch.

Exporters: ``torch.onnx.export`` in torch 2.14 has two, and ``exporter="auto"`` (the default)
tries both in an order that depends on the model:

- float models: the TorchScript exporter (``dynamo=False``) first. It handles torchvision CNNs and
  Hugging Face encoders with dynamic batch and sequence axes, supports opset 17, writes one
  self-contained file and takes ~0.7 s on MobileNetV2 (the dynamo exporter: ~12 s);
- models with integer weight buffers (netpress ``QuantLinear``/``QuantConv*``): the
  ``torch.export``-based exporter (``dynamo=True``) first, because only it lowers their
  dequantization to ``DequantizeLinear`` on int8 initializers; the TorchScript exporter's constant
  folding would store the weights as float32 again (it is the fallback, with folding off).
  Integer weights stay int8 only when the dequantization is a ``quantized_decomposed`` op under
  export, as in ``netpress.nn``; a plain ``q.float() * scale`` is constant-folded to float32 by
  the dynamo exporter's optimiser.

The dynamo exporter only has opset >= 18 implementations (17 becomes 18) and by default writes
weights to a side ``.data`` file, which netpress turns off below 2 GB.

Naming: inputs are named after the example :class:`Batch` (its dict keys, ``input`` for one
positional tensor, ``input_0``, ``input_1``... for several); the single output is ``output``
(the first tensor of a tuple / ``ModelOutput``). Axis 0 of every input and of the output is the
dynamic ``batch``; 2-D integer inputs (token ids, masks) also get a dynamic ``sequence`` axis 1,
and so does a 3-D output whose axis 1 has the example's sequence length.

Example:
    >>> import tempfile, pathlib, torch
    >>> from netpress.core.data import Batch
    >>> from netpress.export.onnx import export_onnx, verify_onnx
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> batch = Batch((torch.randn(3, 4),))
    >>> with tempfile.TemporaryDirectory() as d:
    ...     path = export_onnx(net, batch.slice(1), pathlib.Path(d, "net.onnx"))
    ...     verify_onnx(net, path, [batch]) < 1e-5
    True
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from netpress.core.data import Batch
from netpress.core.errors import ArtifactError, ModelError, RecipeError
from netpress.measure._util import eval_mode
from netpress.measure.count import is_weight_buffer
from netpress.measure.metrics import first_tensor
from netpress.measure.size import state_dict_bytes
from netpress.quantize.overflow import u8s8_saturates

EXPORTERS = ("auto", "torchscript", "dynamo")
# Protobuf cannot hold a message of 2 GiB; stay clear of it before switching to external data.
SINGLE_FILE_LIMIT = 1_900_000_000

_ORT_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}


class _OnnxAdapter(nn.Module):
    """Positional tensors in, the model's first output tensor out (what ONNX export needs)."""

    def __init__(self, model: nn.Module, names: list[str] | None) -> None:
        super().__init__()
        self.model = model
        self.names = names  # None: call positionally

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        if self.names is None:
            return first_tensor(self.model(*tensors))
        return first_tensor(self.model(**dict(zip(self.names, tensors, strict=True))))


def _input_names(example: Batch) -> tuple[list[str], list[torch.Tensor]]:
    if isinstance(example.inputs, dict):
        return list(example.inputs), list(example.inputs.values())
    tensors = list(example.inputs)
    if len(tensors) == 1:
        return ["input"], tensors
    return [f"input_{i}" for i in range(len(tensors))], tensors


def _dynamic_axes(
    names: list[str], tensors: list[torch.Tensor], output: torch.Tensor
) -> dict[str, dict[int, str]]:
    axes: dict[str, dict[int, str]] = {}
    seq_len = None
    for name, t in zip(names, tensors, strict=True):
        if t.dim() == 0:
            continue
        axes[name] = {0: "batch"}
        if t.dim() == 2 and not t.is_floating_point() and not t.is_complex():
            axes[name][1] = "sequence"  # token ids / attention masks: (B, T)
            seq_len = int(t.shape[1])
    if output.dim() >= 1:
        axes["output"] = {0: "batch"}
        if seq_len is not None and output.dim() >= 3 and int(output.shape[1]) == seq_len:
            axes["output"][1] = "sequence"  # token outputs: (B, T, H)
    return axes


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _summary(exc: BaseException) -> str:
    """One line: the exception type and the first line of its root cause's message."""
    root = exc
    while root.__cause__ is not None and root.__cause__ is not root:
        root = root.__cause__
    lines = [line.strip() for line in _ANSI.sub("", str(root)).splitlines() if line.strip()]
    text = lines[0] if lines else ""
    text = text if len(text) <= 240 else text[:237] + "..."
    if root is exc:
        return f"{type(exc).__name__}: {text}"
    return f"{type(exc).__name__} ({type(root).__name__}: {text})"


def has_integer_weights(model: nn.Module) -> bool:
    """Whether ``model`` keeps integer weight codes in buffers (netpress quantized layers).

    Example:
        >>> import torch
        >>> has_integer_weights(torch.nn.Linear(2, 2))
        False
    """
    return any(
        is_weight_buffer(name.rpartition(".")[2]) and not buf.is_floating_point() and buf.dtype != torch.bool
        for name, buf in model.named_buffers()
    )


def _export_torchscript(
    adapter: nn.Module,
    args: tuple[torch.Tensor, ...],
    out: Path,
    names: list[str],
    axes: dict[str, dict[int, str]],
    opset: int,
    fold: bool = True,
) -> None:
    # Constant folding would turn int8 weights + their dequantization into float initializers.
    torch.onnx.export(
        adapter,
        args,
        str(out),
        dynamo=False,
        input_names=names,
        output_names=["output"],
        dynamic_axes=axes,
        opset_version=opset,
        do_constant_folding=fold,
        verbose=False,
    )


def _export_dynamo(
    adapter: nn.Module,
    args: tuple[torch.Tensor, ...],
    out: Path,
    names: list[str],
    axes: dict[str, dict[int, str]],
    opset: int,
    external: bool,
) -> None:
    # The adapter takes *tensors, so dynamic_axes cannot be mapped onto its signature: give
    # torch.export named dims (shared "batch"/"sequence" also tell it the sizes are equal).
    dims = {label: torch.export.Dim(label) for spec in axes.values() for label in spec.values()}
    per_input = tuple({axis: dims[label] for axis, label in axes.get(n, {}).items()} or None for n in names)
    program = torch.onnx.export(
        adapter,
        args,
        None,
        dynamo=True,
        input_names=names,
        output_names=["output"],
        dynamic_shapes=(per_input,),
        opset_version=max(opset, 18),
        external_data=external,
        verbose=False,
    )
    if program is None:  # pragma: no cover - torch returns the program when f is None
        raise RuntimeError("the dynamo exporter returned no program")
    program.save(str(out), external_data=external)


def export_onnx(
    model: nn.Module,
    example: Batch,
    path: str | os.PathLike[str],
    opset: int = 17,
    exporter: str = "auto",
    runtime: str = "onnxruntime",
) -> Path:
    """Export ``model`` to one ONNX file at ``path``, written atomically.

    Quantized models get the graph their integer kernels need: static PTQ (``W8A8*`` layers) and
    SmoothQuant become QDQ graphs, dynamic quantization ``DynamicQuantizeMatMul`` (ONNX Runtime) or
    int8 ``DequantizeLinear`` weights (``runtime="openvino"``), weight-only RTN / GPTQ / AWQ layers
    ``MatMulNBits`` fed their packed codes (2/4/8 bits; others stay a float ``MatMul``).

    The file appears only when the export succeeded (temp file in the same folder, then
    ``os.replace``). Models under ~1.9 GB are written as a single file; larger ones use the dynamo
    exporter with external data next to it (``<name>.data``).

    Args:
        model: the model; exported in eval mode (its training flag is restored).
        example: inputs used for tracing; their names become the ONNX input names. A batch of
            one works: the batch axis is exported as dynamic anyway.
        path: the ``.onnx`` file to write (parent folders are created).
        opset: ONNX opset, >= 17 (17 and 18 are tested).
        exporter: ``"auto"``, ``"torchscript"`` or ``"dynamo"`` (see the module doc).
        runtime: the runtime the file is for (``onnxruntime`` / ``openvino``); it only changes
            the graph of dynamically quantized layers (OpenVINO has no ``com.microsoft`` ops).

    Returns:
        ``path`` as a :class:`Path`.

    Raises:
        RecipeError: ``opset`` < 17 or an unknown ``exporter``.
        ModelError: the model cannot be exported; the message gives each exporter's reason.
        ArtifactError: ``path`` cannot be written.

    Example:
        >>> import tempfile, pathlib, torch
        >>> with tempfile.TemporaryDirectory() as d:
        ...     p = export_onnx(torch.nn.Linear(4, 2), Batch((torch.zeros(1, 4),)),
        ...                     pathlib.Path(d, "lin.onnx"))
        ...     p.name, p.stat().st_size > 0
        ('lin.onnx', True)
    """
    from netpress.nn.ptq import W8A8Conv2d, W8A8Linear  # static PTQ: the integer QDQ graph

    if any(isinstance(m, (W8A8Conv2d, W8A8Linear)) for m in model.modules()):
        from netpress.quantize.qdq_onnx import export_qdq_onnx

        return export_qdq_onnx(model, example, path)
    from netpress.nn.smooth import SmoothQuantLinear  # SmoothQuant W8A8: Mul(1/s) -> Q -> DQ -> MatMul

    if any(isinstance(m, SmoothQuantLinear) for m in model.modules()):
        from netpress.quantize.smooth import export_smoothquant_onnx

        return Path(export_smoothquant_onnx(model, example, path)["path"])
    integer = _integer_exporter(model, runtime)
    if integer is not None:  # layers whose integer / low-bit kernel is a rewritten ONNX op
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        with _staged(target) as staged:
            integer(model, example, staged)
        return target
    if not isinstance(opset, int) or opset < 17:
        raise RecipeError(
            "export_onnx opset", got=opset, expected="an int >= 17", fix="use opset=17 or opset=18"
        )
    if exporter not in EXPORTERS:
        raise RecipeError(
            "export_onnx exporter",
            got=exporter,
            expected=f"one of {', '.join(EXPORTERS)}",
            fix="use exporter='auto'",
        )
    if not isinstance(example, Batch):
        raise ModelError(
            "export_onnx example",
            got=type(example).__name__,
            expected="a netpress Batch",
            fix="wrap the inputs: Batch((x,))",
        )
    target = Path(path)
    names, tensors = _input_names(example)
    args = tuple(tensors)
    with eval_mode(model):
        adapter = _OnnxAdapter(model, names if isinstance(example.inputs, dict) else None)
        adapter.training = False
        try:
            with torch.inference_mode():
                reference = adapter(*args)
        except Exception as exc:
            raise ModelError(
                f"export_onnx({type(model).__name__}): forward failed ({_summary(exc)})",
                expected="a forward that runs on the example batch",
                fix="pass an example with the inputs the model takes",
            ) from exc
        axes = _dynamic_axes(names, tensors, reference)
        large = state_dict_bytes(model) >= SINGLE_FILE_LIMIT
        int_weights = has_integer_weights(model)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ArtifactError(
                f"{target.parent} ({_summary(exc)})",
                expected="a writable folder",
                fix="choose another output path",
            ) from exc
        reasons = []
        wide = any(b.dtype == torch.int16 for b in model.buffers())
        for kind in _exporter_plan(exporter, large, int_weights, wide):
            try:
                with _staged(target) as staged, _quiet():
                    if kind == "torchscript":
                        _export_torchscript(adapter, args, staged, names, axes, opset, fold=not int_weights)
                    else:
                        _export_dynamo(adapter, args, staged, names, axes, opset, large)
                return target
            except ArtifactError:
                raise
            except Exception as exc:  # each exporter's failure is summarised below
                reasons.append(f"{kind} exporter: {_summary(exc)}")
    raise ModelError(
        f"export_onnx({type(model).__name__}) failed [{'; '.join(reasons)}]",
        expected="a forward traceable by torch.onnx.export",
        fix="replace ops ONNX lacks (custom ops, Python code on tensor values) in forward, or "
        "pick the exporter that got further with exporter='torchscript' / 'dynamo'",
    )


def verify_tolerance(path: str | os.PathLike[str]) -> dict[str, float]:
    """Tolerance of :func:`verify_onnx` for the file at ``path``: integer kernels
    (``QuantizeLinear`` on activations, ``com.microsoft`` integer ops such as ``MatMulNBits``
    with int8 activations) round differently from torch's emulation, so those files get a loose
    check that still catches a broken export; float graphs the default one."""
    import onnx

    nodes = onnx.load(str(path), load_external_data=False).graph.node
    integer = any(n.op_type == "QuantizeLinear" or n.domain == "com.microsoft" for n in nodes)
    return {"atol": 0.25, "rtol": 0.1} if integer else {}


def _integer_exporter(model: nn.Module, runtime: str) -> Any:
    """The exporter of dynamically quantized / weight-only low-bit models (``None``: neither)."""
    from netpress.nn.lowbit import DynamicQuantLinear, LowBitLinear

    kinds = {type(m) for m in model.modules()}
    if any(issubclass(k, DynamicQuantLinear) for k in kinds):
        from netpress.quantize.dynamic import export_dynamic

        return partial(export_dynamic, runtime="openvino" if runtime == "openvino" else "onnxruntime")
    if any(issubclass(k, LowBitLinear) for k in kinds):
        from netpress.quantize.weight_only import export_matmul_nbits

        return export_matmul_nbits
    return None


def _exporter_plan(exporter: str, large: bool, int_weights: bool, wide: bool = False) -> list[str]:
    """Exporters to try, in order (see the module doc). ``wide``: int16 weight codes, whose
    Cast/Sub/Mul dequantization only TorchScript (no constant folding) keeps integer."""
    if large or exporter == "dynamo":
        return ["dynamo"]
    if exporter == "torchscript":
        return ["torchscript"]
    return ["dynamo", "torchscript"] if int_weights and not wide else ["torchscript", "dynamo"]


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence tracer/deprecation warnings and the exporters' progress prints."""
    with (
        warnings.catch_warnings(),
        contextlib.redirect_stdout(io.StringIO()),
        contextlib.redirect_stderr(io.StringIO()),
    ):
        warnings.simplefilter("ignore")
        yield


@contextlib.contextmanager
def _staged(target: Path) -> Iterator[Path]:
    """Yield a temp path next to ``target``; on success move what was written there into place.

    Raises:
        ArtifactError: the files cannot be moved into place.
    """
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield work / target.name
        try:
            _publish(work, target)
        except OSError as exc:
            raise ArtifactError(
                f"{target} ({_summary(exc)})",
                expected="a writable path",
                fix="check permissions and free space",
            ) from exc
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _publish(work: Path, target: Path) -> None:
    """Move the staged files into place: side data files first, the .onnx last."""
    staged = work / target.name
    for extra in sorted(work.iterdir()):
        if extra != staged:
            os.replace(extra, target.parent / extra.name)
    os.replace(staged, target)


def make_session(path: str | os.PathLike[str], threads: int = 2) -> Any:
    """An ONNX Runtime CPU session set up the way netpress measures.

    ``intra_op_num_threads=threads``, ``inter_op_num_threads=1``, sequential execution,
    ``ORT_ENABLE_ALL`` graph optimisations, ``CPUExecutionProvider``.

    Args:
        path: the ``.onnx`` file.
        threads: intra-op threads, >= 1.

    Returns:
        An ``onnxruntime.InferenceSession``.

    Raises:
        ArtifactError: ``path`` does not exist.
        ModelError: ONNX Runtime cannot load it.

    Example:
        >>> make_session("missing.onnx")
        Traceback (most recent call last):
        ...
        netpress.core.errors.ArtifactError: missing.onnx: got 'no such file', expected an ONNX file. Fix: export the model first (export_onnx)
    """  # noqa: E501
    import onnxruntime as ort

    file = Path(path)
    if not file.is_file():
        raise ArtifactError(
            str(file), got="no such file", expected="an ONNX file", fix="export the model first (export_onnx)"
        )
    options = ort.SessionOptions()
    options.intra_op_num_threads = int(threads)
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only
    if u8s8_saturates():
        # x86-64 without VNNI: ORT's u8·s8 kernels sum pairs of products in saturating int16
        # (vpmaddubsw), so int8 results drift (the W8A8 CNN of tests/test_adaround.py: up to
        # 7.4 % of the output range off the integer simulation, 0.19 % with this exact u8·u8
        # path; see netpress.quantize.overflow).
        options.add_session_config_entry("session.x64quantprecision", "1")
    if weight_only_qdq(file):
        # DequantizeLinear on initializers with no QuantizeLinear anywhere: there is no integer
        # kernel to feed, and ORT keeps such DQ nodes un-folded (measured 2-3x slower than fp32 on
        # MobileNetV2). Without QDQ handling they fold into fp32 weights once, at load.
        options.add_session_config_entry("session.disable_quant_qdq", "1")
    try:
        return ort.InferenceSession(str(file), sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ModelError(
            f"{file} ({_summary(exc)})",
            expected="a model ONNX Runtime can load",
            fix="re-export it with export_onnx, or check the opset/ops",
        ) from exc


def weight_only_qdq(path: str | os.PathLike[str]) -> bool:
    """Whether the graph dequantizes weights but never quantizes activations (weight-only int)."""
    import onnx

    try:
        graph = onnx.load(str(path), load_external_data=False).graph
    except Exception:  # noqa: BLE001 - ORT reports unreadable files with a better message
        return False
    ops = {n.op_type for n in graph.node}
    return "DequantizeLinear" in ops and not ops & {"QuantizeLinear", "DynamicQuantizeLinear"}


class OnnxRunner:
    """Run an ONNX file on :class:`Batch` objects with ONNX Runtime.

    Args:
        path: the ``.onnx`` file.
        threads: intra-op threads (see :func:`make_session`).

    Attributes:
        session: the ``onnxruntime.InferenceSession``.
        input_names: the graph's input names, in order.

    Example:
        >>> import tempfile, pathlib, torch
        >>> batch = Batch((torch.ones(2, 4),))
        >>> with tempfile.TemporaryDirectory() as d:
        ...     p = export_onnx(torch.nn.Linear(4, 3), batch, pathlib.Path(d, "m.onnx"))
        ...     OnnxRunner(p).run(batch).shape
        (2, 3)
    """

    def __init__(self, path: str | os.PathLike[str], threads: int = 2) -> None:
        self.path = Path(path)
        self.threads = threads
        self.session = make_session(self.path, threads)
        inputs = self.session.get_inputs()
        self.input_names: list[str] = [i.name for i in inputs]
        self._dtypes = {i.name: _ORT_DTYPES.get(i.type) for i in inputs}

    def _array(self, name: str, value: Any) -> np.ndarray:
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu().numpy()
        array = np.ascontiguousarray(value)
        dtype = self._dtypes.get(name)
        return array.astype(dtype, copy=False) if dtype is not None else array

    def feeds(self, batch: Batch) -> dict[str, np.ndarray]:
        """``{input name: numpy array}`` for ``batch``, cast to the graph's input dtypes.

        Dict inputs are matched by name (keys the graph does not use are dropped); positional
        inputs are matched in order.

        Args:
            batch: the inputs.

        Returns:
            The feeds for ``session.run``.

        Raises:
            ModelError: an input the graph needs is missing from ``batch``.

        Example:
            >>> import tempfile, pathlib, torch
            >>> with tempfile.TemporaryDirectory() as d:
            ...     p = export_onnx(torch.nn.Linear(4, 3), Batch((torch.ones(1, 4),)),
            ...                     pathlib.Path(d, "m.onnx"))
            ...     sorted(OnnxRunner(p).feeds(Batch((torch.ones(5, 4),))))
            ['input']
        """
        if isinstance(batch.inputs, dict):
            missing = [n for n in self.input_names if n not in batch.inputs]
            if missing:
                raise ModelError(
                    f"{self.path.name} inputs",
                    got=sorted(batch.inputs),
                    expected=f"keys {self.input_names}",
                    fix=f"add {missing} to the batch",
                )
            return {n: self._array(n, batch.inputs[n]) for n in self.input_names}
        if len(batch.inputs) < len(self.input_names):
            raise ModelError(
                f"{self.path.name} inputs",
                got=f"{len(batch.inputs)} tensors",
                expected=f"{len(self.input_names)} ({self.input_names})",
                fix="pass every input the model was exported with",
            )
        return {n: self._array(n, t) for n, t in zip(self.input_names, batch.inputs, strict=False)}

    def check_feeds(self, feeds: dict[str, Any]) -> dict[str, np.ndarray]:
        """Validate user-made feeds (names present) and cast them to the graph's dtypes.

        Raises:
            ModelError: a needed input is missing.
        """
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise ModelError(
                f"{self.path.name} feeds",
                got=sorted(feeds),
                expected=f"keys {self.input_names}",
                fix=f"add {missing}",
            )
        return {n: self._array(n, feeds[n]) for n in self.input_names}

    def run(self, batch: Batch) -> np.ndarray:
        """The first output of the graph on ``batch``.

        Raises:
            ModelError: missing inputs, or ONNX Runtime fails (shapes, dtypes).
        """
        feeds = self.feeds(batch)
        try:
            return np.asarray(self.session.run(None, feeds)[0])
        except Exception as exc:
            shapes = {k: tuple(v.shape) for k, v in feeds.items()}
            raise ModelError(
                f"{self.path.name} run failed ({_summary(exc)})",
                got=shapes,
                expected="inputs matching the exported graph",
                fix="feed the same input names, ranks and dtypes as at export",
            ) from exc


def verify_onnx(
    model: nn.Module,
    path: str | os.PathLike[str],
    batches: Batch | Sequence[Batch],
    atol: float = 1e-4,
    rtol: float = 1e-3,
    threads: int = 2,
) -> float:
    """Compare ONNX Runtime outputs with PyTorch's on ``batches``; return the max abs difference.

    Every element must satisfy ``|onnx - torch| <= atol + rtol * |torch|`` (``numpy.allclose``).

    Args:
        model: the PyTorch model the file was exported from (run in eval mode).
        path: the ``.onnx`` file.
        batches: one batch or several; use a batch size other than the export example's to check
            the dynamic axes.
        atol: absolute tolerance.
        rtol: relative tolerance.
        threads: ONNX Runtime intra-op threads.

    Returns:
        The largest absolute difference over all batches.

    Raises:
        ModelError: shapes differ, ONNX output is not finite, or a value is out of tolerance
            (the message names the max difference and the batch).

    Example:
        >>> import tempfile, pathlib, torch
        >>> net, batch = torch.nn.Linear(4, 3), Batch((torch.randn(5, 4),))
        >>> with tempfile.TemporaryDirectory() as d:
        ...     p = export_onnx(net, batch.slice(1), pathlib.Path(d, "m.onnx"))
        ...     verify_onnx(net, p, batch) < 1e-5
        True
    """
    batch_list = [batches] if isinstance(batches, Batch) else list(batches)
    if not batch_list:
        raise ModelError(
            "verify_onnx batches",
            got="an empty list",
            expected="at least one Batch",
            fix="pass evaluation batches",
        )
    runner = OnnxRunner(path, threads=threads)
    worst = 0.0
    with eval_mode(model):
        for i, batch in enumerate(batch_list):
            with torch.inference_mode():
                ref = first_tensor(batch.run(model)).detach().cpu().float().numpy()
            got = runner.run(batch).astype(np.float32, copy=False)
            if got.shape != ref.shape:
                raise ModelError(
                    f"verify_onnx {Path(path).name} batch {i}",
                    got=got.shape,
                    expected=f"the PyTorch output shape {ref.shape}",
                    fix="re-export with an example of the same kind of inputs",
                )
            if not np.isfinite(got).all():
                raise ModelError(
                    f"verify_onnx {Path(path).name} batch {i}",
                    got="NaN/Inf in ONNX Runtime output",
                    expected="finite values",
                    fix="re-export; check ops unsupported at this opset",
                )
            diff = np.abs(got - ref)  # same shape as the output
            worst = max(worst, float(diff.max()) if diff.size else 0.0)
            if not np.all(diff <= atol + rtol * np.abs(ref)):
                raise ModelError(
                    f"verify_onnx {Path(path).name} batch {i}",
                    got=f"max abs diff {float(diff.max()):.3g}",
                    expected=f"|onnx - torch| <= {atol:g} + {rtol:g}*|torch|",
                    fix="re-export (opset 18, exporter='dynamo'), or loosen atol/rtol if the "
                    "difference is expected (e.g. quantized graphs)",
                )
    return worst


__all__ = ["export_onnx", "make_session", "OnnxRunner", "verify_onnx", "verify_tolerance",
           "has_integer_weights", "EXPORTERS"]
