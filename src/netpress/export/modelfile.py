"""Model files without pickle: ``.pt2`` programs (unpickling refused), state dicts, safetensors.

Also the ``torch.export`` round trip the artifact's ``export`` source uses.

Example:
    >>> import tempfile, torch, torch.nn as nn
    >>> from netpress.export.modelfile import load_model_file
    >>> with tempfile.TemporaryDirectory() as d:
    ...     torch.save(nn.Linear(2, 2), f"{d}/m.pt")  # a pickled module: refused
    ...     try:
    ...         load_model_file(f"{d}/m.pt")
    ...     except Exception as exc:
    ...         print(type(exc).__name__)
    ModelError
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import pickle
import threading
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
import torch.nn as nn

from netpress.core.data import Batch
from netpress.core.errors import ArtifactError, ModelError

#: where a loaded program module keeps its example inputs (``module.meta``), for re-export
EXAMPLE_KEY = "netpress_example_inputs"


def export_program(model: nn.Module, example: Any = None) -> bytes:
    """``torch.export`` ``model`` (eval mode, batch dim dynamic) into ``.pt2`` bytes.

    Args:
        model: the model; its program must hold exactly the tensors of its state dict.
        example: a :class:`Batch`, a tuple of input tensors, or ``(args, kwargs)``; defaults to
            the inputs a ``.pt2`` model was loaded with.

    Raises:
        ArtifactError: no example inputs, or the model cannot be exported.

    Example:
        >>> import torch, torch.nn as nn
        >>> data = export_program(nn.Linear(3, 2), (torch.randn(1, 3),))
        >>> load_program(data)(torch.randn(5, 3)).shape
        torch.Size([5, 2])
    """
    if example is None:
        meta = getattr(model, "meta", None)
        example = meta.get(EXAMPLE_KEY) if isinstance(meta, dict) else None
    if isinstance(example, Batch):
        args, kwargs = (((), dict(example.inputs)) if isinstance(example.inputs, dict)
                        else (tuple(example.inputs), {}))
    elif isinstance(example, tuple) and len(example) == 2 and isinstance(example[1], dict):
        args, kwargs = tuple(example[0]), dict(example[1])
    elif isinstance(example, tuple):
        args, kwargs = example, {}
    else:
        raise ArtifactError("example", got=type(example).__name__,
                            expected="example inputs (a Batch or a tuple of tensors) for an "
                            "export source", fix="pass example=... to save_artifact")
    was_training = model.training
    try:
        eval_mode(model)
        args = tuple(_widen(a) for a in args)
        kwargs = {k: _widen(v) for k, v in kwargs.items()}
        program = torch.export.export(model, args, kwargs,
                                      dynamic_shapes=_batch_dynamic(args, kwargs))
        buf = io.BytesIO()
        torch.export.save(program, buf)
    except Exception as exc:  # torch.export raises many types
        raise ArtifactError("source export", got=f"{type(exc).__name__}: {str(exc)[:200]}",
                            expected="a model torch.export can trace",
                            fix="use a zoo or module source instead") from None
    finally:
        if was_training:  # a torch.export program module (a .pt2 source) refuses train()/eval()
            with contextlib.suppress(NotImplementedError):
                model.train(True)
    data = buf.getvalue()
    if set(load_program(data).state_dict()) != set(model.state_dict()):
        raise ArtifactError("source export", got="an exported program whose tensors differ from "
                            "the model's state dict", expected="the same tensor names",
                            fix="use a zoo or module source instead")
    return data


def _batch_dynamic(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The first dim of every tensor input may vary (AUTO: specialised if the model needs it)."""

    def one(v: Any) -> Any:
        return {0: torch.export.Dim.AUTO} if isinstance(v, torch.Tensor) and v.dim() else None

    if args and kwargs:
        return None
    return {k: one(v) for k, v in kwargs.items()} if kwargs else tuple(one(a) for a in args)


def _widen(v: Any) -> Any:
    """A batch of 1 becomes 2 (torch.export would specialise a size-1 batch dim to 1)."""
    if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == 1:
        return torch.cat([v, v])
    return v


def eval_mode(module: nn.Module) -> nn.Module:
    """``module.eval()``; a torch.export program module (exported in eval mode) refuses it."""
    try:
        return module.eval()
    except NotImplementedError:
        return module


_NO_PICKLE_LOCK = threading.Lock()


@contextlib.contextmanager
def _no_pickle() -> Iterator[None]:
    """Inside: ``torch.load`` is forced to ``weights_only=True`` and raw unpickling raises."""
    from torch.export.pt2_archive import _package

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise pickle.UnpicklingError("netpress refuses to unpickle objects")

    real_load = torch.load

    def safe_load(*args: Any, **kwargs: Any) -> Any:
        kwargs["weights_only"] = True
        return real_load(*args, **kwargs)

    with _NO_PICKLE_LOCK:
        saved = (torch.load, _package.pickle, torch._C._pickle_load_obj)
        torch.load = safe_load  # type: ignore[assignment]
        _package.pickle = type("NoPickle", (), {"loads": staticmethod(refuse)})  # type: ignore
        torch._C._pickle_load_obj = refuse
        try:
            yield
        finally:
            torch.load, _package.pickle, torch._C._pickle_load_obj = saved


def _attr(module: nn.Module, node: Any) -> torch.Tensor | None:
    """The parameter / buffer a ``get_attr`` node reads (``None`` for anything else)."""
    if getattr(node, "op", None) != "get_attr":
        return None
    try:
        return module.get_parameter(node.target)
    except AttributeError:
        try:
            return module.get_buffer(node.target)
        except AttributeError:
            return None


def _lifted(node: Any, module: nn.Module) -> tuple[nn.Module, list[Any]] | None:
    """The ``nn.Linear`` / ``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.BatchNorm1d`` / ``nn.BatchNorm2d``
    an aten call stands for, sharing the program's tensors, and the ``get_attr`` nodes it
    consumes (``None``: another call, a compressed model's codes, or non-plain arguments)."""
    aten = torch.ops.aten
    args = list(node.args)
    if node.kwargs or len(args) < 2:
        return None
    if node.target == aten.batch_norm.default and len(args) >= 8 and args[5] is False:
        attrs = args[1:5]  # weight, bias, running_mean, running_var
        ts = [_attr(module, a) for a in attrs]
        val = node.meta.get("val")
        if any(t is None for t in ts) or not isinstance(ts[0], nn.Parameter) or not isinstance(
                val, torch.Tensor) or val.dim() not in (2, 3, 4):
            return None
        bn: nn.Module = (nn.BatchNorm2d if val.dim() == 4 else nn.BatchNorm1d)(
            ts[0].numel(), eps=float(args[7]), momentum=float(args[6]))
        bn.weight, bn.bias = ts[0], ts[1]
        bn.running_mean, bn.running_var = ts[2], ts[3]
        return bn, attrs
    attrs = [a for a in args[1:3] if a is not None]
    ts = [_attr(module, a) for a in attrs]
    if any(not isinstance(t, nn.Parameter) for t in ts):
        return None  # buffers (a compressed model's codes) and constants are not lifted
    w, b = ts[0], (ts[1] if len(ts) > 1 else None)
    if node.target == aten.linear.default and w.dim() == 2:
        layer: nn.Module = nn.Linear(w.shape[1], w.shape[0], bias=b is not None)
    elif node.target in (aten.conv1d.default, aten.conv2d.default) and w.dim() in (3, 4):
        nd = w.dim() - 2
        stride, padding, dilation, groups = (args[3:] + [1, 0, 1, 1][len(args) - 3:])[:4]
        cls = nn.Conv1d if nd == 1 else nn.Conv2d
        layer = cls(w.shape[1] * int(groups), w.shape[0], tuple(w.shape[2:]), stride=stride,
                    padding=padding, dilation=dilation, groups=int(groups), bias=b is not None)
    else:
        return None
    layer.weight = w
    if b is not None:
        layer.bias = b
    return layer, attrs


def lift_layers(module: nn.Module) -> list[str]:
    """Turn a program module's ``aten.linear`` / ``conv1d`` / ``conv2d`` / eval-mode
    ``batch_norm`` calls back into ``nn.Linear`` / ``Conv1d`` / ``Conv2d`` / ``BatchNorm1d`` /
    ``BatchNorm2d`` submodules (same tensors, same names), so every technique that finds or swaps
    layers by type (or folds a conv's BatchNorm) works on a ``.pt2`` model.

    A call is lifted when its tensors are the program's own, held by one submodule that holds
    nothing else and that nothing else reads; the layer takes that submodule's name
    (``fc1.weight`` -> ``fc1``). Returns the lifted names.

    Example:
        >>> import torch, torch.nn as nn
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(64, 2))
        >>> prog = torch.export.export(net.eval(), (torch.zeros(2, 1, 6, 6),)).module()
        >>> lift_layers(prog), type(prog.get_submodule("3")).__name__
        (['0', '3'], 'Linear')
    """
    graph = getattr(module, "graph", None)
    if graph is None:
        return []
    done = []
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        found = _lifted(node, module)
        if found is None:
            continue
        layer, attrs = found
        owner = attrs[0].target.rpartition(".")[0]
        if not owner or any(len(a.users) != 1 or a.target.rpartition(".")[0] != owner
                            for a in attrs):
            continue
        holder = module.get_submodule(owner)
        held = {n for n, _ in holder.named_parameters()} | {n for n, _ in holder.named_buffers()}
        if list(holder.children()) or held - {"num_batches_tracked"} != {
                a.target.rpartition(".")[2] for a in attrs}:
            continue  # the holder has more than this call reads
        if isinstance(layer, nn.modules.batchnorm._BatchNorm) and "num_batches_tracked" in held:
            layer.num_batches_tracked = holder.num_batches_tracked
        module.set_submodule(owner, layer)
        with graph.inserting_before(node):
            new = graph.call_module(owner, (node.args[0],))
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        for a in attrs:
            graph.erase_node(a)
        done.append(owner)
    lifted = set(done)
    for node in list(graph.nodes):  # e.g. an unused num_batches_tracked read of a lifted BN
        if node.op == "get_attr" and not node.users and node.target.rpartition(".")[0] in lifted:
            graph.erase_node(node)
    if done:
        module.recompile()
    return done


def _set_training(self: nn.Module, mode: bool = True) -> nn.Module:
    for m in self.modules():
        m.training = mode
    return self


def _set_eval(self: nn.Module) -> nn.Module:
    return _set_training(self, False)


def load_program(source: Path | bytes, where: str = "program.pt2") -> nn.Module:
    """The module of a ``torch.export`` program (a ``.pt2`` path or its bytes), unpickling refused.

    Raises:
        ModelError: unreadable, or it needs unpickling (``where`` names it).
    """
    if isinstance(source, Path):
        where = str(source)
    log = logging.getLogger("torch.export")  # it logs a traceback before raising: not for users
    level = log.level
    try:
        log.setLevel(logging.ERROR)
        with _no_pickle():
            program = torch.export.load(io.BytesIO(source) if isinstance(source, bytes)
                                        else str(source))
        module = program.module()
    except Exception as exc:  # torch.export.load raises many types
        raise ModelError(where, got=f"{type(exc).__name__}: {str(exc)[:200]}",
                         expected="a torch.export .pt2 file without pickled objects",
                         fix="re-export it with torch.export.save (tensors only)") from None
    finally:
        log.setLevel(level)
    # torch makes the program's train()/eval() raise; netpress calls them everywhere (measuring,
    # exporting, fine-tuning). The graph is fixed (traced once, normally in eval mode), so here
    # they only set the flags, as on any module without Dropout / BatchNorm.
    module.train = types.MethodType(_set_training, module)  # type: ignore[method-assign]
    module.eval = types.MethodType(_set_eval, module)  # type: ignore[method-assign]
    lift_layers(module)
    module.eval()  # the program was traced in eval mode: lifted BatchNorms use running stats
    example, meta = getattr(program, "example_inputs", None), getattr(module, "meta", None)
    if example is not None and isinstance(meta, dict):
        # GraphModule.meta survives deepcopy (a plain attribute would not)
        meta[EXAMPLE_KEY] = copy.deepcopy(example)
    return module


def _fixed_batch_inputs(module: nn.Module) -> list[str]:
    """Tensor inputs of a program module whose first (batch) dim is a fixed int: ``name[n]``."""
    graph = getattr(module, "graph", None)
    out = []
    for node in graph.nodes if graph is not None else []:
        val = node.meta.get("val") if node.op == "placeholder" else None
        if isinstance(val, torch.Tensor) and val.dim() and isinstance(val.shape[0], int):
            out.append(f"{node.name}[{val.shape[0]}]")
    return out


def load_model_file(path: str | Path) -> nn.Module | dict[str, torch.Tensor]:
    """Load a model file without unpickling arbitrary objects.

    Accepted: ``.pt2`` (``torch.export.save``; returns the program's module, eval mode),
    ``.safetensors`` and plain state-dict ``.pt`` / ``.pth`` / ``.bin`` files (``torch.load`` with
    ``weights_only=True``; returns the dict of tensors).

    Raises:
        ModelError: a pickled model object (refused: unpickling runs arbitrary code), an unknown
            suffix, or an unreadable file.

    Example:
        >>> load_model_file("model.pkl")  # doctest: +IGNORE_EXCEPTION_DETAIL
        Traceback (most recent call last):
        netpress.core.errors.ModelError: model.pkl: ...
    """
    path = Path(path)
    fix = ("save the model with torch.export.save (.pt2) or its state_dict with safetensors; "
           "pickled model objects are refused because unpickling runs arbitrary code")
    suffix = path.suffix.lower()
    if suffix not in {".pt2", ".safetensors", ".pt", ".pth", ".bin"}:
        raise ModelError(str(path), got=f"a {suffix or 'suffix-less'} file",
                         expected=".pt2, .safetensors or a state-dict .pt/.pth", fix=fix)
    if not path.is_file():
        raise ModelError(str(path), got="no such file", expected="a model file",
                         fix="check the path")
    if suffix == ".pt2":
        module = eval_mode(load_program(path))
        fixed = _fixed_batch_inputs(module)
        if fixed:
            raise ModelError(str(path), got=f"a program exported with a fixed batch size "
                             f"({', '.join(fixed)})",
                             expected="a dynamic batch dimension: netpress calibrates, measures "
                             "and exports with other batch sizes than the example's",
                             fix="re-export with torch.export.export(model, (x,), dynamic_shapes="
                             "({0: torch.export.Dim.AUTO},)) and a batch of 2 or more, then "
                             "torch.export.save")
        return module
    try:
        if suffix == ".safetensors":
            return safetensors.torch.load_file(str(path))
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError, RuntimeError, safetensors errors
        raise ModelError(str(path), got=f"a file torch.load(weights_only=True) refuses "
                         f"({type(exc).__name__}: {str(exc).splitlines()[0][:160]})",
                         expected="a plain state dict of tensors", fix=fix) from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelError(str(path), got=type(obj).__name__, expected="a dict of tensors", fix=fix)
    return obj


__all__ = ["export_program", "load_model_file", "load_program"]
