"""The channel dependency graph of structured pruning (the one place that traces the model).

Built with ``torch-pruning``'s ``DependencyGraph`` (traced on example inputs): a *channel group*
is a set of coupled dimensions that must be removed together — a conv's filters, its BN, the next
conv's input channels; every conv feeding the same residual add; the slices of a ``torch.cat``
that feed a later layer; a depthwise conv's channels (its ``groups`` follow). netpress only reads
the groups (which layers, which indices) and asks them to remove a chosen index set; importance
scores, budgets and rounding live in :mod:`netpress.prune.structured.prune`.

Groups that would change the model's output (the classifier's logits) are never pruned. Groups
that pass through a reshape torch-pruning cannot map channel by channel (the 4-D -> 5-D views of
a ShuffleNet channel shuffle: its index mapping fails or is skipped) are left alone too, so the
channels inside such blocks are still pruned and the shuffled ones kept. A group
that touches a layer netpress cannot resize (a custom module holding its own ``nn.Parameter``, an
RNN, ...) raises :class:`RecipeError` naming it; put that name in ``ignore`` and every group
touching it is left alone.

Example:
    >>> import torch, torch.nn as nn
    >>> from netpress.core.data import Batch
    >>> net = nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 4, 1))
    >>> graph = ChannelGraph(net, Batch((torch.zeros(1, 3, 8, 8),)), ignore=set())
    >>> [(g.root, g.size, sorted(g.out_layers), sorted(g.in_layers)) for g in graph.groups()]
    [('0', 16, ['0'], ['3'])]
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch.nn as nn

from netpress.core.data import Batch
from netpress.core.errors import ModelError, RecipeError

#: leaf module types whose parameters torch-pruning resizes correctly
SUPPORTED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d,
             nn.BatchNorm3d, nn.LayerNorm, nn.PReLU, nn.Embedding)


#: attributes by which an attention block states its head count
HEAD_ATTRS = ("num_heads", "n_heads", "nhead", "num_attention_heads")


def attention_blocks(model: nn.Module, ignore: set[str]) -> list[tuple[str, nn.Module, int]]:
    """Attention blocks (a module with a head count and weights) that are not in ``ignore``:
    ``(name, module, heads)``, outermost only.

    The channel graph would cut their query / key / value projections channel by channel, which
    breaks the split into heads (a head's width stays ``dim // heads`` while the projections
    lose arbitrary columns: wrong outputs, or a trace that never ends on Swin's windows). Heads
    are removed whole only for encoders in the BERT layout (:mod:`.transformer`).

    Example:
        >>> [n for n, _, h in attention_blocks(nn.Sequential(nn.MultiheadAttention(8, 2)), set())]
        ['0']
    """
    out: list[tuple[str, nn.Module, int]] = []
    for name, m in model.named_modules():
        if not name or name in ignore or any(name.startswith(o + ".") for o, _, _ in out):
            continue
        heads = next((v for a in HEAD_ATTRS if isinstance(v := getattr(m, a, None), int)
                      and not isinstance(v, bool)), None)
        if heads is not None and any(True for _ in m.parameters()):
            out.append((name, m, heads))
    return out


@dataclass
class ChannelGroup:
    """One set of coupled channels.

    Attributes:
        root: qualified name of the layer whose output channels define the group.
        size: number of channels (root index space).
        out_layers: ``{layer name: root index of each of its pruned output rows}``.
        in_layers: ``{layer name: root index of each of its pruned input columns}``.
        norm_layers: names of BN / LayerNorm layers resized with the group.
        items: ``(layer module, kind, layer indices, root indices)`` for importance scoring;
            kind is ``"out"``, ``"in"`` or ``"norm"``.
    """

    root: str
    size: int
    out_layers: dict[str, list[int]] = field(default_factory=dict)
    in_layers: dict[str, list[int]] = field(default_factory=dict)
    norm_layers: list[str] = field(default_factory=list)
    items: list[tuple[nn.Module, str, list[int], list[int]]] = field(default_factory=list)
    _prune: Callable[[list[int]], None] | None = None

    def remove(self, idxs: list[int]) -> None:
        """Physically remove root channels ``idxs`` from every layer of the group."""
        if idxs and self._prune is not None:
            self._prune(sorted(idxs))


def _import_tp() -> Any:
    try:
        import torch_pruning as tp
    except ImportError:  # pragma: no cover - a declared dependency
        raise ModelError("prune.structured", got="torch-pruning missing",
                         expected="the torch-pruning package (dependency graph)",
                         fix="pip install torch-pruning") from None
    return tp


@contextmanager
def _guarded_reshapes(opaque: set[Any]) -> Iterator[None]:
    """Record reshape nodes whose channel mapping torch-pruning cannot build (``opaque``).

    torch-pruning maps channels through 1-D / 4-D reshapes only (flatten); other ranks are
    silently treated as identity and a channel shuffle's view raises ``ZeroDivisionError``.
    """
    from torch_pruning.dependency import index_mapping

    original = index_mapping.update_reshape_index_mapping

    def guarded(graph: Any, node: Any) -> None:
        size = getattr(node.grad_fn, "_saved_self_sizes", None)
        if size is not None and len(size) not in (1, 2, 4):
            opaque.add(node)
            return
        try:
            original(graph, node)
        except ZeroDivisionError:
            opaque.add(node)

    index_mapping.update_reshape_index_mapping = guarded
    try:
        yield
    finally:
        index_mapping.update_reshape_index_mapping = original


#: the most channel indices one index mapping may produce (VGG's 512 x 7 x 7 flatten: 25,088)
MAX_MAPPED_INDICES = 1 << 20


class _GroupTooLarge(Exception):
    """torch-pruning's group search kept growing (see :func:`_bounded_groups`)."""


@contextmanager
def _bounded_groups(limit: int) -> Iterator[None]:
    """Stop a group search that grows past ``limit`` items.

    Around reshapes / rolls / window partitions (Swin's residual stream) torch-pruning's search
    can revisit nodes with ever new index sets and grow without end (23 GB of RSS on swin_t);
    no real group is larger than a few items per node of the graph.
    """
    from torch_pruning.dependency.group import Group
    from torch_pruning.dependency.index_mapping import _FlattenIndexMapping

    add, flatten = Group.add_dep, _FlattenIndexMapping.__call__

    def bounded_add(self: Any, dep: Any, idxs: Any) -> None:
        if len(self._group) >= limit:
            raise _GroupTooLarge
        add(self, dep, idxs)

    def bounded_flatten(self: Any, idxs: Any) -> Any:
        if not self.reverse and len(idxs) * self._stride > MAX_MAPPED_INDICES:
            raise _GroupTooLarge  # flattens feeding flattens: index lists multiply
        return flatten(self, idxs)

    Group.add_dep, _FlattenIndexMapping.__call__ = bounded_add, bounded_flatten
    try:
        yield
    finally:
        Group.add_dep, _FlattenIndexMapping.__call__ = add, flatten


def _example_args(example: Batch) -> Any:
    inputs = example.inputs
    return dict(inputs) if isinstance(inputs, dict) else tuple(inputs)


class ChannelGraph:
    """Channel groups of ``model`` traced on ``example``; removing channels edits ``model``.

    Args:
        model: the model to prune (edited in place by :meth:`ChannelGroup.remove`).
        example: inputs to trace with (one example is enough).
        ignore: qualified names of layers that must keep their shapes.

    Raises:
        ModelError: the model cannot be traced on ``example``.
    """

    def __init__(self, model: nn.Module, example: Batch, ignore: set[str]) -> None:
        blocks = attention_blocks(model, ignore)
        if blocks:
            name, block, heads = blocks[0]
            kind = type(block).__name__
            raise RecipeError(
                f"prune.structured layer {name!r}",
                got=f"a {kind} with {heads} heads ({len(blocks)} such blocks)",
                expected="Conv / Linear layers (the channel graph would cut an attention "
                "block's projections channel by channel, breaking its heads), or an encoder in "
                "the Hugging Face BERT layout, whose heads are removed whole",
                fix=f"add {kind!r} to `ignore` (every {kind} keeps its width; the layers "
                "outside the attention blocks, e.g. the MLPs, are still pruned)")
        tp = _import_tp()
        self._tp = tp
        self.model = model
        self.ignore = ignore
        args = _example_args(example)
        was_training = model.training
        model.eval()
        self._opaque: set[Any] = set()
        try:
            with warnings.catch_warnings(), _guarded_reshapes(self._opaque):
                warnings.simplefilter("ignore")
                self._dg = tp.DependencyGraph().build_dependency(
                    model, example_inputs=args, verbose=False,
                    forward_fn=(lambda m, a: m(**a)) if isinstance(args, dict) else
                    (lambda m, a: m(*a)),
                )
        except Exception as exc:
            raise ModelError(
                "prune.structured: dependency graph", got=f"{type(exc).__name__}: {exc}"[:300],
                expected="a model torch-pruning can trace on the example batch",
                fix="check the example inputs, or prune this model with an unstructured method",
            ) from exc
        finally:
            model.train(was_training)
        self._names = {m: n for n, m in model.named_modules()}
        self._param_names = {p: n for n, p in model.named_parameters()}

    def name_of(self, module: Any) -> str:
        """Qualified name of a module (or parameter) of the model."""
        if isinstance(module, nn.Parameter):
            return self._param_names.get(module, "<parameter>")
        return self._names.get(module, type(module).__name__)

    def _all_groups(self, roots: tuple[type, ...]) -> list[Any]:
        """``DependencyGraph.get_all_groups``, skipping (into :attr:`skipped`) the roots whose
        index mapping fails (coupled through an unmappable reshape) or whose group search does
        not end (:func:`_bounded_groups`)."""
        dg, seen, out = self._dg, set(), []
        self.skipped: list[str] = []
        limit = 8 * len(dg.module2node) + 64
        for m in list(dg.module2node):
            if not isinstance(m, roots) or m in seen or m in dg.IGNORED_LAYERS_IN_TRACING:
                continue
            pruner = dg.get_pruner_of_module(m)
            if pruner is None or pruner.get_out_channels(m) is None:
                continue
            try:
                with _guarded_reshapes(self._opaque), _bounded_groups(limit):
                    group = dg.get_pruning_group(m, pruner.prune_out_channels,
                                                 list(range(pruner.get_out_channels(m))))
            except (IndexError, ZeroDivisionError, ValueError, _GroupTooLarge):
                self.skipped.append(self.name_of(m))
                continue
            for dep, _ in group:
                if dg.is_out_channel_pruning_fn(dep.handler):
                    seen.add(dep.target.module)
            out.append(group)
        return out

    def _remove(self, module: nn.Module, handler: Any, idxs: list[int]) -> None:
        with _guarded_reshapes(set()):
            self._dg.get_pruning_group(module, handler, idxs).prune()

    def _output_group(self, group: Any) -> bool:
        """Whether pruning this group would change the model's output."""
        for dep, _ in group:
            node = dep.target
            if dep.handler is not None and self._dg.is_out_channel_pruning_fn(dep.handler) \
                    and not node.outputs:
                return True
        return False

    def _check_layer(self, module: Any, root: str) -> None:
        if isinstance(module, nn.Parameter) or (
            isinstance(module, nn.Module) and not isinstance(module, SUPPORTED)
            and any(True for _ in module.parameters(recurse=False))
        ):
            name = self.name_of(module)
            owner = name.rpartition(".")[0] if isinstance(module, nn.Parameter) else name
            if isinstance(module, nn.Parameter):  # e.g. ConvNeXt's layer_scale: ignore only it
                leaf = name.rpartition(".")[2]
                fix = (f"add 're:.*\\.{leaf}' to `ignore` (the channels every such parameter "
                       f"scales are kept; the rest of {owner!r} is still pruned), or {owner!r} "
                       "to keep that whole block")
            else:
                fix = f"add {owner!r} to `ignore` (its coupled channels are then kept)"
            raise RecipeError(
                f"prune.structured layer {owner!r}",
                got=f"a {type(module).__name__} coupled to the channels of {root!r}",
                expected="Conv, Linear, BatchNorm, LayerNorm, PReLU or Embedding "
                "layers (or a BERT attention block)", fix=fix)

    def groups(self, targets: Callable[[str, nn.Module], bool] | None = None
               ) -> Iterator[ChannelGroup]:
        """The prunable channel groups, in execution order.

        Args:
            targets: ``(name, module) -> bool`` choosing the root layers (default: all).

        Yields:
            :class:`ChannelGroup` objects whose :meth:`~ChannelGroup.remove` edits the model.

        Raises:
            RecipeError: a group touches a layer that cannot be resized and is not ignored.
        """
        tp = self._tp
        fn = tp.pruner.function
        out_fns = {fn.prune_conv_out_channels, fn.prune_linear_out_channels}
        in_fns = {fn.prune_conv_in_channels, fn.prune_linear_in_channels}
        roots = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
        for group in self._all_groups(roots):
            root_module = group[0].dep.target.module
            root = self.name_of(root_module)
            if self._output_group(group):
                continue
            if any(dep.target in self._opaque or dep.source in self._opaque for dep, _ in group):
                continue  # through a reshape with no channel mapping (channel shuffle)
            if targets is not None and not targets(root, root_module):
                continue
            modules = [dep.target.module for dep, _ in group]
            if any(self.name_of(m) in self.ignore for m in modules):
                continue
            # a parameter owned by an ignored module is ignored too
            if any(isinstance(m, nn.Parameter)
                   and self.name_of(m).rpartition(".")[0] in self.ignore for m in modules):
                continue
            if any(isinstance(m, nn.modules.conv._ConvNd) and 1 < m.groups != m.in_channels
                   for m in modules):
                continue  # grouped (not depthwise) conv: channels stay (group widths must hold)
            for m in modules:
                self._check_layer(m, root)
            cg = ChannelGroup(root=root, size=len(group[0].idxs))
            for i, (dep, idxs) in enumerate(group):
                layer, handler = dep.target.module, dep.handler
                root_idxs = list(group[i].root_idxs)
                if any(r is None for r in root_idxs):
                    continue
                name = self.name_of(layer)
                if handler in out_fns:
                    cg.out_layers.setdefault(name, []).extend(root_idxs)
                    cg.items.append((layer, "out", list(idxs), root_idxs))
                elif handler in in_fns:
                    cg.in_layers.setdefault(name, []).extend(root_idxs)
                    cg.items.append((layer, "in", list(idxs), root_idxs))
                elif isinstance(layer, (nn.modules.batchnorm._BatchNorm, nn.LayerNorm)):
                    cg.norm_layers.append(name)
                    cg.items.append((layer, "norm", list(idxs), root_idxs))
            handler = group[0].dep.handler
            cg._prune = (lambda idxs, m=root_module, h=handler: self._remove(m, h, idxs))
            yield cg


__all__ = ["HEAD_ATTRS", "SUPPORTED", "ChannelGroup", "ChannelGraph", "attention_blocks"]
