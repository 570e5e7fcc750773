"""Serializable modules: a module's *spec* is a JSON-able dict from which it can be rebuilt.

Artifacts never pickle. When compression changes a module (a ``Linear`` became a ``QuantLinear``,
a pruned ``Conv2d`` lost filters, a ``Linear`` became a ``Sequential`` of two low-rank ones), the
manifest stores the module's spec; reload builds the base architecture, rebuilds each recorded
module from its spec, then loads the tensors. Only classes in this registry can be built from a
manifest, so a manifest cannot name arbitrary code.

A spec is ``{"class": NAME, "kwargs": {...}}``; containers (``Sequential``, ``ModuleList``,
``ModuleDict``) add ``"children": {child_name: spec}``. Names are ``torch.nn.Linear`` for the plain
torch modules listed in :data:`TORCH_MODULES` and ``netpress.nn.QuantLinear`` (etc.) for netpress's
own, which provide ``spec() -> dict`` and ``from_spec(kwargs) -> module`` and are registered with
:func:`serializable`.

Example:
    >>> import torch.nn as nn
    >>> from netpress.nn.registry import build_module, module_spec
    >>> spec = module_spec(nn.Conv2d(3, 8, 3, stride=2, bias=False))
    >>> spec["class"], spec["kwargs"]["stride"], spec["kwargs"]["bias"]
    ('torch.nn.Conv2d', [2, 2], False)
    >>> type(build_module(spec)).__name__, tuple(build_module(spec).weight.shape)
    ('Conv2d', (8, 3, 3, 3))
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch.nn as nn

from netpress.core.errors import ArtifactError, ModelError

M = TypeVar("M", bound=type[nn.Module])

_NETPRESS: dict[str, type[nn.Module]] = {}


def serializable(cls: M) -> M:
    """Class decorator: register a netpress module (it must define ``spec`` and ``from_spec``)."""
    if not callable(getattr(cls, "spec", None)) or not callable(getattr(cls, "from_spec", None)):
        raise TypeError(f"{cls.__name__} must define spec() and the classmethod from_spec()")
    _NETPRESS[f"netpress.nn.{cls.__name__}"] = cls
    return cls


def _has(attr: str) -> Callable[[nn.Module], bool]:
    return lambda m: getattr(m, attr, None) is not None


def _conv(m: nn.Module) -> dict[str, Any]:
    return {
        "in_channels": m.in_channels, "out_channels": m.out_channels,
        "kernel_size": m.kernel_size, "stride": m.stride, "padding": m.padding,
        "dilation": m.dilation, "groups": m.groups, "bias": m.bias is not None,
        "padding_mode": m.padding_mode,
    }


def _attrs(*names: str, **computed: Callable[[nn.Module], Any]) -> Callable[[nn.Module], dict]:
    def get(m: nn.Module) -> dict[str, Any]:
        out = {n: getattr(m, n) for n in names}
        out.update({k: f(m) for k, f in computed.items()})
        return out

    return get


_BN = _attrs("num_features", "eps", "momentum", "affine", "track_running_stats")
_INPLACE = _attrs("inplace")

#: plain torch modules that can be rebuilt from a spec, with how to read their constructor kwargs
TORCH_MODULES: dict[type[nn.Module], Callable[[nn.Module], dict[str, Any]]] = {
    nn.Linear: _attrs("in_features", "out_features", bias=_has("bias")),
    nn.Conv1d: _conv,
    nn.Conv2d: _conv,
    nn.Conv3d: _conv,
    nn.BatchNorm1d: _BN,
    nn.BatchNorm2d: _BN,
    nn.LayerNorm: _attrs("normalized_shape", "eps", "elementwise_affine", bias=_has("bias")),
    nn.GroupNorm: _attrs("num_groups", "num_channels", "eps", "affine"),
    nn.Embedding: _attrs("num_embeddings", "embedding_dim", "padding_idx", "max_norm",
                         "norm_type", "scale_grad_by_freq", "sparse"),
    nn.Identity: _attrs(),
    nn.Flatten: _attrs("start_dim", "end_dim"),
    nn.Dropout: _attrs("p", "inplace"),
    nn.ReLU: _INPLACE,
    nn.ReLU6: _INPLACE,
    nn.SiLU: _INPLACE,
    nn.Hardswish: _INPLACE,
    nn.GELU: _attrs("approximate"),
    nn.Tanh: _attrs(),
    nn.Sigmoid: _attrs(),
    nn.AdaptiveAvgPool1d: _attrs("output_size"),
    nn.AdaptiveAvgPool2d: _attrs("output_size"),
    nn.MaxPool2d: _attrs("kernel_size", "stride", "padding", "dilation", "return_indices",
                         "ceil_mode"),
    nn.AvgPool2d: _attrs("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad",
                         "divisor_override"),
}
_CONTAINERS: tuple[type[nn.Module], ...] = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
_TUPLE_KEYS = {"kernel_size", "stride", "padding", "dilation", "normalized_shape", "output_size"}


def _jsonable(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value


def _class_name(module: nn.Module) -> str | None:
    cls = type(module)
    if cls in TORCH_MODULES or cls in _CONTAINERS:
        return f"torch.nn.{cls.__name__}"
    name = f"netpress.nn.{cls.__name__}"
    return name if _NETPRESS.get(name) is cls else None


def is_serializable(module: nn.Module) -> bool:
    """Whether :func:`module_spec` can describe ``module`` (and its children, for containers)."""
    if _class_name(module) is None:
        return False
    if isinstance(module, _CONTAINERS):
        return all(is_serializable(c) for c in module.children())
    return True


def module_spec(module: nn.Module, where: str = "module") -> dict[str, Any]:
    """The JSON-able spec of ``module`` (see the module doc).

    Args:
        module: a registered netpress module, a plain torch module of :data:`TORCH_MODULES`, or a
            ``Sequential`` / ``ModuleList`` / ``ModuleDict`` of those.
        where: the module's qualified name, used in errors.

    Returns:
        ``{"class": ..., "kwargs": {...}}`` (plus ``"children"`` for containers).

    Raises:
        ModelError: the module's class cannot be rebuilt without pickle.
    """
    name = _class_name(module)
    if name is None:
        raise ModelError(
            where, got=f"a {type(module).__module__}.{type(module).__name__} that compression "
            "changed", expected="a module netpress can rebuild without pickle",
            fix="leave this module out of the technique (`ignore`), or register the class with "
            "netpress.nn.serializable (spec() + from_spec())",
        )
    if isinstance(module, _CONTAINERS):
        children = {k: module_spec(c, f"{where}.{k}") for k, c in module.named_children()}
        return {"class": name, "kwargs": {}, "children": children}
    if type(module) in TORCH_MODULES:
        kwargs = TORCH_MODULES[type(module)](module)
    else:
        kwargs = module.spec()  # type: ignore[operator]
    return {"class": name, "kwargs": _jsonable(kwargs)}


def build_module(spec: Any, where: str = "module") -> nn.Module:
    """Rebuild a module (fresh tensors of the right shapes) from :func:`module_spec`'s output.

    Raises:
        ArtifactError: the spec is malformed or names a class outside the registry.
    """
    if not isinstance(spec, dict) or not isinstance(spec.get("class"), str):
        raise ArtifactError(where, got=spec, expected='a module spec {"class": ..., "kwargs": ...}',
                            fix="re-save the artifact with this netpress version")
    name, kwargs = spec["class"], spec.get("kwargs", {})
    if not isinstance(kwargs, dict):
        raise ArtifactError(f"{where}.kwargs", got=kwargs, expected="a mapping",
                            fix="re-save the artifact with this netpress version")
    try:
        if name.startswith("torch.nn."):
            cls = getattr(nn, name[len("torch.nn."):], None)
            if cls in _CONTAINERS:
                return _build_container(cls, spec.get("children", {}), where)
            if cls not in TORCH_MODULES:
                raise KeyError(name)
            args = {k: tuple(v) if k in _TUPLE_KEYS and isinstance(v, list) else v
                    for k, v in kwargs.items()}
            return cls(**args)
        netpress_cls = _NETPRESS.get(name)
        if netpress_cls is None:
            raise KeyError(name)
        return netpress_cls.from_spec(kwargs)  # type: ignore[attr-defined]
    except KeyError:
        raise ArtifactError(where, got=name, expected=f"a registered module class ({known()})",
                            fix="upgrade netpress to the version that wrote the artifact") from None
    except (TypeError, ValueError) as exc:
        raise ArtifactError(where, got=f"{name}({kwargs})", expected=f"valid arguments ({exc})",
                            fix="re-save the artifact with this netpress version") from None


def _build_container(cls: type[nn.Module], children: Any, where: str) -> nn.Module:
    if not isinstance(children, dict):
        raise ArtifactError(f"{where}.children", got=children, expected="a mapping",
                            fix="re-save the artifact with this netpress version")
    built = {k: build_module(v, f"{where}.{k}") for k, v in children.items()}
    if cls is nn.ModuleDict:
        return nn.ModuleDict(built)
    container = cls()
    for k, child in built.items():
        container.add_module(k, child)
    return container


def known() -> str:
    """Comma-separated names of every class :func:`build_module` accepts."""
    torch_names = [f"torch.nn.{c.__name__}" for c in (*TORCH_MODULES, *_CONTAINERS)]
    return ", ".join(sorted(torch_names + list(_NETPRESS)))


__all__ = ["TORCH_MODULES", "build_module", "is_serializable", "known", "module_spec",
           "serializable"]
