"""op_grouping: slice large activations and run chains of ops per slice to bound peak memory (exact).

The Feature Slicer + Operator Grouping of Streamlined Inference, found on the ATen graph instead
of written by hand (``enable_forward_chunking``, attention slicing, VAE slicing).

**Slicings.** A tensor is sliced along one of its dims, or along a factor of one: dim ``d`` of
size ``outer * U * inner`` is read as ``(outer, U, inner)`` and a slice keeps a range of the
middle factor. ``U`` (the *unit* count) is common to a whole chain. The factor form lets a
slice cross the reshapes Inductor's decompositions put around every linear: slicing the tokens
``T`` of ``[B, T, H]`` is slicing the factor ``(B, T, 1)`` of the rows of ``[B*T, H]``.

**Rules.** For each op, :func:`_input_slicings` says which slicing of each tensor input yields
a given slicing of the output, or that the input is read whole (a weight, a broadcast operand,
keys/values for a slice of queries), or that the output cannot be sliced that way (a reduced
dim of a sum / amax / var_mean - so softmax and norms are never split over the dim they reduce
- or the contraction dim of a matmul). Pointwise ops (Inductor's ``pointwise`` tag) slice every
dim; ``mm``/``addmm``/``bmm`` rows, columns and batch; convolution its batch and output
channels; reshapes, permutes and (un)squeezes map the dim through.

**Chains.** Starting from the largest activations, a chain grows through producers and
consumers whose slicing the rules derive, keeping to tensors at least half as large as the
seed, plus the consumers that read a large tensor (the down-projection of an FFN, the ``amax``
of a softmax). Every dim of the seed is tried; the chain that leaves the least behind full
size is kept. A chain must be convex (no path leaves it and comes back) and consistent (one
slicing per node), else it is dropped with the reason in the report. A chain reaching one
already grown joins it, over the coarser unit count when one divides the other (a temporal
transformer: attention over the frames of each pixel, sliced over image rows; feed-forward per
pixel: one chain over rows), cutting what lies past a path out and back. A chain cut at a
conflict (it reached an op it cannot slice) joins the chains it reads or feeds the same way, or,
when regrowing meets the conflict again, as they are, with its slicing propagated through them
(a spatial transformer's feed-forward, grown over pixels, joins its attention over frames). A
kept chain stores no layout copy of what it stores anyway, ends in no ``cat`` with a skip
connection, and computes per slice an entry that a copy makes from another entry.

**Peak search.** Once the largest activations are grouped, the estimated peak can lie in smaller
ones held beside long-lived tensors (a video UNet's lowest resolution, beside its skip
connections). The ops alive there seed more chains (:func:`_cover_estimated_peak`), each kept
only if the estimate says so. Last, a member that is a sum of entries dying with it is left
outside its chain and stored before it (:func:`_peel_entry_sums`): one buffer held through the
slices instead of every summand.

**Rewrite.** The chain's nodes are copied once per slice, reading slices (views) of its entries
and whole weights; each exit is the ``cat`` of its slices. Slices follow each other in the graph,
so Inductor's scheduler runs them in order and its buffer reuse gives each slice the memory the
previous one freed: only one slice's intermediates are alive at a time. Each slice is fused by
Inductor like the original chain (the same kernels, on smaller tensors).

**Inductor.** It computes a pointwise sum of stored tensors inside each of its readers instead of
storing it: a chain entry that is such a sum (a residual stream) keeps every summand alive until
the last slice. The rewrite stores it first (:func:`_store_summed_entries`). Three other choices
of Inductor's would put the slices back together; the allocator's measured peak (not the
estimate) showed each: horizontal fusion of independent slices that read
the same small tensors (kept apart: the ops of each slice are tagged and :class:`_SlicesApart`
refuses to fuse two slices of a chain), its reordering for peak memory (turned off for a graph
with sliced chains: its estimate picked an order running every slice before any store), and a
contiguous exit buffer read by a convolution it lays out channels_last (copied whole: 4-d exit
buffers are channels_last when Inductor's layout optimisation applies).

**Slice counts.** ``max_slices`` slices every worthwhile chain that many times; with a
``memory_budget`` a liveness simulation of the graph (pointwise ops fused into their single
consumer, as Inductor does; views free) picks, chain by chain where the simulated peak lies, the
smallest counts whose estimated peak fits. A budget no slicing reaches compiles the smallest
peak found and warns with that figure.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import logging
import math
import operator
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx
from torch._guards import detect_fake_mode
from torch._inductor.pattern_matcher import stable_topological_sort

from zc.config import OpGroupingConfig
from zc.fx_passes.pass_manager import PassContext, PassReport, ZcWarning

log = logging.getLogger("zc")

aten = torch.ops.aten
prims = torch.ops.prims

# Slices are separate copies of the chain in the graph, so compile time grows with the count.
DEFAULT_SLICES = 8
MAX_SLICES = 64
# A node joins a chain through a producer or consumer edge when its output is at least this
# fraction of the seed's: the chain keeps to the tensors that dominate memory.
LARGE_FRACTION = 0.5
# A chain is worth slicing when its internal peak is larger than what it leaves full size
# (entries it reads + exits it writes) times this.
MIN_GAIN = 1.0
# Rounds of seeding at the estimated peak once the large activations are grouped, and the
# activations alive there tried as seeds per round.
PEAK_ROUNDS = 8
PEAK_SEEDS = 6
PEAK_SUFFIXES = 12


@dataclasses.dataclass(frozen=True)
class Slicing:
    """Dim ``dim`` read as ``(outer, U, inner)``; a slice is a range of the middle factor."""

    dim: int
    outer: int = 1
    inner: int = 1


WHOLE = "whole"
# Marks the full-size view of an exit buffer a rewrite leaves behind: a later chain reads it as
# an entry, never as a member (its storage is written by the copies of the earlier chain).
_SLICED_EXIT = "zc_op_grouping_sliced_exit"
# A row slice of a spatial chain keeps at least this many rows (the halo is recomputed per slice).
MIN_SLICE_ROWS = 4
# Node meta of the ops a rewrite emits for one slice: ``(chain serial, slice index)``.
_SLICE_TAG = "zc_op_grouping_slice"
# A sum of entries left outside a chain to be stored (see _peel_entry_sums).
_STORED_SUM = "zc_op_grouping_stored_sum"
_CHAIN_SERIALS = itertools.count()


# ---------------------------------------------------------------------------------------------
# per-op rules: output slicing -> slicing of each tensor argument occurrence


def _val(node: Any) -> Any:
    return node.meta.get("val") if isinstance(node, torch.fx.Node) else None


def _shape(node: torch.fx.Node) -> tuple[int, ...] | None:
    value = _val(node)
    if isinstance(value, (tuple, list)):
        value = value[0]
    if not isinstance(value, torch.Tensor):
        return None
    try:
        return tuple(int(s) for s in value.shape)
    except (TypeError, ValueError):  # symbolic sizes
        return None


def _occurrences(node: torch.fx.Node) -> list[torch.fx.Node]:
    found: list[torch.fx.Node] = []
    torch.fx.node.map_arg((node.args, node.kwargs), lambda n: found.append(n) or n)
    return found


def _broadcast(node: torch.fx.Node, out: Slicing, units: int) -> list[Any] | None:
    out_shape = _shape(node)
    result = []
    for arg in _occurrences(node):
        shape = _shape(arg)
        if shape is None:
            return None
        dim = out.dim - (len(out_shape) - len(shape))
        if dim < 0 or shape[dim] == 1:
            result.append(WHOLE)
        elif shape[dim] == out_shape[out.dim]:
            result.append(Slicing(dim, out.outer, out.inner))
        else:
            return None
    return result


def _reshape(in_shape: Sequence[int], out_shape: Sequence[int], out: Slicing, units: int) -> Slicing | None:
    """The slicing of a reshape's input that gives ``out`` on its output (same flat positions)."""
    stride = out.inner * math.prod(out_shape[out.dim + 1:])
    for dim in range(len(in_shape)):
        inner_size = math.prod(in_shape[dim + 1:])
        if in_shape[dim] > 1 and inner_size <= stride < inner_size * in_shape[dim]:
            if stride % inner_size:
                return None
            inner = stride // inner_size
            if in_shape[dim] % (inner * units):
                return None
            return Slicing(dim, in_shape[dim] // (inner * units), inner)
    return None


def _reduced_dims(node: torch.fx.Node, ndim: int) -> set[int]:
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    if dims is None:
        return set(range(ndim))
    if isinstance(dims, int):
        dims = [dims]
    return {d % ndim for d in dims}


def _keepdim(node: torch.fx.Node) -> bool:
    if "keepdim" in node.kwargs:
        return bool(node.kwargs["keepdim"])
    return bool(node.args[2]) if len(node.args) > 2 and isinstance(node.args[2], bool) else False


def _reduction(node: torch.fx.Node, out: Slicing, units: int) -> list[Any] | None:
    in_shape = _shape(node.args[0])
    reduced = _reduced_dims(node, len(in_shape))
    kept = [d for d in range(len(in_shape)) if _keepdim(node) or d not in reduced]
    dim = kept[out.dim]
    if dim in reduced:
        return None
    return [Slicing(dim, out.outer, out.inner)]


def _matmul(node: torch.fx.Node, out: Slicing, units: int) -> list[Any] | None:
    target = node.target
    if target is aten.bmm.default:
        a_map = {0: 0, 1: 1}
        b_map = {0: 0, 2: 2}
    else:  # mm / addmm
        a_map = {0: 0}
        b_map = {1: 1}
    a = Slicing(a_map[out.dim], out.outer, out.inner) if out.dim in a_map else WHOLE
    b = Slicing(b_map[out.dim], out.outer, out.inner) if out.dim in b_map else WHOLE
    if target is aten.addmm.default:
        if len(_occurrences(node)) != 3:
            return None
        bias_shape, out_shape = _shape(node.args[0]), _shape(node)
        dim = out.dim - (len(out_shape) - len(bias_shape))
        if dim < 0 or bias_shape[dim] == 1:
            bias = WHOLE
        elif bias_shape[dim] == out_shape[out.dim]:
            bias = Slicing(dim, out.outer, out.inner)
        else:
            return None
        return [bias, a, b]
    return [a, b]


def _convolution(node: torch.fx.Node, out: Slicing, units: int) -> list[Any] | None:
    transposed, groups = node.args[6], node.args[8]
    has_bias = node.args[2] is not None
    if out.dim == 0:
        return [out, WHOLE] + ([WHOLE] if has_bias else [])
    if out.dim == 1 and groups == 1 and not transposed:
        return [WHOLE, Slicing(0, out.outer, out.inner)] + ([Slicing(0, out.outer, out.inner)] if has_bias else [])
    return None


def _attention(node: torch.fx.Node, out: Slicing, units: int) -> list[Any] | None:
    """CPU flash attention ``(q, k, v, ...)`` [B, H, L, E]: batch, heads, or query rows."""
    if out.dim > 2:
        return None
    args = _occurrences(node)
    result = []
    for index, arg in enumerate(args):
        shape = _shape(arg)
        if index < 3:
            if out.dim == 2:
                result.append(out if index == 0 else WHOLE)
            elif shape[out.dim] == _shape(node)[out.dim]:
                result.append(out)
            else:
                return None
        else:  # attn_mask, broadcast against [B, H, L, S]
            dim = out.dim - (4 - len(shape))
            if dim < 0 or shape[dim] == 1:
                result.append(WHOLE)
            elif shape[dim] == _shape(node)[out.dim]:
                result.append(Slicing(dim, out.outer, out.inner))
            else:
                return None
    return result


def _view_like(node: torch.fx.Node, out: Slicing, units: int) -> list[Any] | None:
    in_shape, out_shape = _shape(node.args[0]), _shape(node)
    if node.target is aten.as_strided.default and not _as_strided_is_reshape(node):
        return None
    sliced = _reshape(in_shape, out_shape, out, units)
    return None if sliced is None else [sliced]


def _as_strided_is_reshape(node: torch.fx.Node) -> bool:
    source = _val(node.args[0])
    size, stride = list(node.args[1]), list(node.args[2])
    offset = node.args[3] if len(node.args) > 3 else node.kwargs.get("storage_offset", 0)
    return (
        not offset
        and source.is_contiguous()
        and math.prod(size) == source.numel()
        and stride == _contiguous_strides(size)
    )


def _contiguous_strides(size: Sequence[int]) -> list[int]:
    strides, running = [], 1
    for s in reversed(size):
        strides.append(running)
        running *= s
    return strides[::-1]


def _permute(node: torch.fx.Node, out: Slicing, units: int) -> list[Any] | None:
    perm = [p % len(node.args[1]) for p in node.args[1]]
    return [Slicing(perm[out.dim], out.outer, out.inner)]


def _unsqueeze(node: torch.fx.Node, out: Slicing, units: int) -> list[Any] | None:
    inserted = node.args[1] % len(_shape(node))
    return [Slicing(out.dim - (out.dim > inserted), out.outer, out.inner)]


def _squeeze(node: torch.fx.Node, out: Slicing, units: int) -> list[Any] | None:
    in_shape, out_shape = _shape(node.args[0]), _shape(node)
    return [_reshape(in_shape, out_shape, out, units)]


def _expand(node: torch.fx.Node, out: Slicing, units: int) -> list[Any] | None:
    return _broadcast(node, out, units)


def _same_dim(node: torch.fx.Node, out: Slicing, units: int) -> list[Any] | None:
    return [out] + [WHOLE] * (len(_occurrences(node)) - 1)


def _cat(node: torch.fx.Node, out: Slicing, units: int) -> list[Any] | None:
    if out.dim == node.args[1] % len(_shape(node)) if len(node.args) > 1 else out.dim == 0:
        return None
    return [out] * len(_occurrences(node))


def _slice(node: torch.fx.Node, out: Slicing, units: int) -> list[Any] | None:
    dim = node.args[1] if len(node.args) > 1 else 0
    if dim % len(_shape(node)) == out.dim:
        return None
    return [out]


def _split(node: torch.fx.Node, out: Slicing, units: int) -> list[Any] | None:
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
    if dim % len(_shape(node)) == out.dim:
        return None
    return [out]


def _unsafe_index(node: torch.fx.Node, out: Slicing, units: int) -> list[Any] | None:
    indices = node.args[1]
    if out.dim >= len(indices) or indices[out.dim] is not None:
        return None
    # Only leading unindexed dims keep their position in the output.
    if any(i is not None for i in indices[: out.dim]):
        return None
    return [out] + [WHOLE] * (len(_occurrences(node)) - 1)


_REDUCTIONS = {
    aten.sum.dim_IntList, aten.amax.default, aten.amin.default, aten.mean.dim,
    aten.var_mean.correction, aten.var.correction, aten.prod.dim_int, aten.argmax.default,
    aten.argmin.default, aten.any.dim, aten.logsumexp.default,
}
_VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.as_strided.default}
_RULES: dict[Any, Callable[[torch.fx.Node, Slicing, int], list[Any] | None]] = {
    **{op: _reduction for op in _REDUCTIONS},
    **{op: _view_like for op in _VIEWS},
    aten.mm.default: _matmul,
    aten.addmm.default: _matmul,
    aten.bmm.default: _matmul,
    aten.convolution.default: _convolution,
    aten._scaled_dot_product_flash_attention_for_cpu.default: _attention,
    aten.permute.default: _permute,
    aten.unsqueeze.default: _unsqueeze,
    aten.squeeze.dim: _squeeze,
    aten.squeeze.dims: _squeeze,
    aten.squeeze.default: _squeeze,
    aten.expand.default: _expand,
    aten.clone.default: _same_dim,
    aten.cat.default: _cat,
    aten.slice.Tensor: _slice,
    aten._unsafe_index.Tensor: _unsafe_index,
    aten.split.Tensor: _split,
    aten.split_with_sizes.default: _split,
    operator.getitem: _same_dim,
}
# Ops whose result aliases their input (no buffer of their own in Inductor's code).
_ALIASES = _VIEWS | {
    aten.permute.default, aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims,
    aten.squeeze.default, aten.expand.default, aten.slice.Tensor, operator.getitem,
    aten.split.Tensor, aten.split_with_sizes.default,
}


def _is_pointwise(node: torch.fx.Node) -> bool:
    return isinstance(node.target, torch._ops.OpOverload) and torch.Tag.pointwise in node.target.tags


def _input_slicings(node: torch.fx.Node, out: Slicing, units: int) -> list[Any] | None:
    """Slicing (or ``WHOLE``) of each tensor occurrence in ``node``'s arguments for ``out``."""
    if node.op != "call_function" or node.meta.get(_SLICED_EXIT):
        return None
    if isinstance(node.target, torch._ops.OpOverload) and node.target._schema.is_mutable:
        return None  # the copy_ that stores a slice into a preallocated exit buffer
    shape = _shape(node)
    if shape is None or out.dim >= len(shape) or shape[out.dim] != out.outer * units * out.inner:
        return None
    if node.target is operator.getitem:
        if not isinstance(_val(node.args[0]), (tuple, list)):
            return None
    elif isinstance(_val(node), (tuple, list)) and node.target not in _REDUCTIONS and node.target not in _RULES:
        return None
    rule = _RULES.get(node.target)
    if rule is None:
        if not _is_pointwise(node):
            return None
        rule = _broadcast
    if any(_shape(arg) is None for arg in _occurrences(node)):
        return None
    try:
        return rule(node, out, units)
    except (IndexError, TypeError, ValueError):  # an argument form the rule does not know
        return None


def _output_slicing(user: torch.fx.Node, occurrence: int, given: Slicing, units: int) -> Slicing | None:
    """The slicing of ``user``'s output under which its ``occurrence``-th input is ``given``."""
    shape = _shape(user)
    if shape is None:
        return None
    for dim, size in enumerate(shape):
        if size % units:
            continue
        rest = size // units
        for inner in _divisors(rest):
            out = Slicing(dim, rest // inner, inner)
            needed = _input_slicings(user, out, units)
            if needed is not None and needed[occurrence] == given:
                return out
    return None


def _divisors(n: int) -> list[int]:
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


# ---------------------------------------------------------------------------------------------
# memory accounting


def _bytes(node: torch.fx.Node) -> int:
    value = _val(node)
    values = value if isinstance(value, (tuple, list)) else [value]
    total = 0
    for v in values:
        if isinstance(v, torch.Tensor):
            try:
                total += int(v.numel()) * v.element_size()
            except (TypeError, ValueError):
                return 0
    return total


def _materialized(node: torch.fx.Node) -> bool:
    """Whether Inductor gives ``node`` a buffer of its own (roughly: pointwise ops with one
    consumer are fused into it, views alias their input)."""
    if node.op != "call_function" or node.target in _ALIASES:
        return False
    if _is_pointwise(node) and len(node.users) == 1 and not node.meta.get(_STORED_SUM):
        (user,) = node.users
        return not (_is_pointwise(user) or user.target in _REDUCTIONS)
    return True


@dataclasses.dataclass
class _Item:
    """One step of the abstract schedule that :func:`_simulate_peak` walks."""

    key: Any
    nbytes: int
    reads: list[Any]
    alias_of: Any = None


def _lifetimes(items: list[_Item]) -> list[tuple[int, int, int]]:
    """(item index, index of its last reader, bytes) of each buffer of the schedule (a buffer
    dies after its last reader, views keep their base alive)."""
    base = {}
    for item in items:
        base[item.key] = base.get(item.alias_of, item.alias_of) if item.alias_of is not None else item.key
    last_read: dict[Any, int] = {}
    for index, item in enumerate(items):
        for read in item.reads:
            last_read[base.get(read, read)] = index
    return [(index, last_read.get(item.key, index), item.nbytes) for index, item in enumerate(items)
            if item.alias_of is None and item.nbytes]


def _simulate_peak(items: list[_Item]) -> tuple[int, int]:
    """Peak bytes of buffers alive over the schedule and the index where it is reached."""
    live, peak, peak_at = 0, 0, 0
    dying: list[tuple[int, int]] = []  # heap of (last reader's index, bytes)
    for index, dies, nbytes in _lifetimes(items):
        while dying and dying[0][0] < index:
            live -= heapq.heappop(dying)[1]
        live += nbytes
        heapq.heappush(dying, (dies, nbytes))
        if live > peak:
            peak, peak_at = live, index
    return peak, peak_at


def _live_at(items: list[_Item], at: int) -> list[Any]:
    """Keys of the buffers alive at schedule index ``at``, largest first."""
    alive = [(nbytes, index) for index, dies, nbytes in _lifetimes(items) if index <= at <= dies]
    return [items[index].key for _, index in sorted(alive, key=lambda a: (-a[0], a[1]))]


# ---------------------------------------------------------------------------------------------
# chains


@dataclasses.dataclass
class Chain:
    nodes: dict[torch.fx.Node, Slicing]  # in graph order
    units: int
    seed: torch.fx.Node
    entries: dict[tuple[torch.fx.Node, Slicing], None]
    exits: list[torch.fx.Node]
    slices: int = 1
    # Spatial chains (image rows with a halo): each node's row count (upsampling changes it) and
    # what each member reads of each argument occurrence; ``units`` are the exits' rows.
    rows: dict[torch.fx.Node, int] | None = None
    needs: dict[torch.fx.Node, list[Any]] | None = None
    halo: bool = False  # over image rows: convolutions and upsampling read a wider band
    # Exit buffers of 4-d exits in channels_last, the layout Inductor gives convolutions.
    channels_last: bool = False

    @property
    def spatial(self) -> bool:
        return self.halo

    def most_slices(self) -> int:
        return max(1, self.units // MIN_SLICE_ROWS) if self.spatial else self.units

    def describe(self) -> str:
        seed = self.nodes[self.seed]
        what = f"image rows ({self.units} rows, with halo)" if self.spatial else f"dim {seed.dim} ({self.units} units)"
        return f"{len(self.nodes)} ops around {self.seed.name} {list(_shape(self.seed))}, {what}"


class _Rejected(Exception):
    pass


def _grow(seed: torch.fx.Node, slicing: Slicing, units: int, order: dict[torch.fx.Node, int],
          joined: dict[torch.fx.Node, Slicing] | None = None) -> Chain:
    """The chain grown from ``seed`` and from the nodes of the chains in ``joined``.

    Without ``joined``, a path out of the chain and back that cannot join it drops the chain
    (the caller then cuts it at the conflict, :func:`_grow_cut`). With ``joined`` (a merge), the
    member on the far side of such a path goes instead, with what it reaches (a skip connection
    of a UNet read again blocks later, by a ``cat`` whose other input depends on the chain); the
    merge fails if that would drop a joined node.
    """
    threshold = _bytes(seed) * LARGE_FRACTION
    region: dict[torch.fx.Node, Slicing] = {}
    needs: dict[torch.fx.Node, list[Any]] = {}
    work: list[tuple[torch.fx.Node, Slicing]] = []
    dropped: set[torch.fx.Node] = set()

    def add(node: torch.fx.Node, sliced: Slicing) -> None:
        if node in dropped:
            raise _Rejected(f"{node.name} was cut from the chain")
        if node in region:
            if region[node] != sliced:
                raise _Rejected(f"{node.name} would need two slicings ({region[node]} and {sliced})")
            return
        needed = _input_slicings(node, sliced, units)
        if needed is None:
            raise _Rejected(f"{node.name} ({node.target}) cannot be sliced along dim {sliced.dim}")
        region[node] = sliced
        needs[node] = needed
        work.append((node, sliced))
        if isinstance(_val(node), (tuple, list)):  # every projection of a tuple goes with it
            for user in node.users:
                add(user, sliced)

    def drain() -> None:
        while work:
            node, sliced = work.pop()
            if node not in region:
                continue
            for arg, need in zip(_occurrences(node), needs[node]):
                if need is WHOLE or arg in region:
                    if arg in region and region[arg] != need:
                        raise _Rejected(f"{arg.name} feeds {node.name} under two slicings")
                    continue
                if (arg not in dropped and arg.op == "call_function" and _bytes(arg) >= threshold
                        and _input_slicings(arg, need, units)):
                    add(arg, need)
            # Users of a small node join only as its single pointwise epilogue (the residual add
            # after a down-projection): the chain then writes its exit in place of the input it
            # would have left behind.
            epilogue = len(node.users) == 1 and all(_is_pointwise(u) or u.target in _ALIASES for u in node.users)
            if _bytes(node) < threshold and node is not seed and not epilogue:
                continue
            for user in node.users:
                if user in region or user.op != "call_function":
                    continue
                for index, arg in enumerate(_occurrences(user)):
                    if arg is node:
                        out = _output_slicing(user, index, sliced, units)
                        if out is not None:
                            try:
                                add(user, out)
                            except _Rejected:
                                pass
                        break

    for node, sliced in (joined or {}).items():
        add(node, sliced)
    add(seed, slicing)
    drain()
    # Ops on a path that leaves the chain and comes back (a norm's statistics, reshaped and
    # broadcast back onto the tensor they came from) join it, slice-wise, or the chain is dropped.
    while between := _between(region, order):
        for node in sorted(between, key=order.__getitem__, reverse=True):
            need = _reader_need(node, region, needs)
            try:
                if need is WHOLE:
                    user = next(u for u in node.users if u in region)
                    raise _Rejected(f"{node.name} reads the chain but {user.name} needs it whole")
                add(node, need)
            except _Rejected as why:
                if not joined:
                    raise
                # The members on the far side of the path from the seed go.
                ancestors = _related(node, region, upward=True)
                far = _related(node, region, upward=False) if seed in ancestors else ancestors
                if seed in far:
                    raise _Rejected(f"{why}; cutting there drops part of a merged chain") from None
                before = set(region)
                for member in far:
                    del region[member]
                _keep_connected(region, seed)
                gone = before - set(region)
                if any(n in joined for n in gone):
                    raise _Rejected(f"{why}; cutting there drops part of a merged chain") from None
                dropped.update(gone)
                break
        drain()
    return _as_chain(region, needs, seed, units, order)


def _reader_need(node: torch.fx.Node, region: dict[torch.fx.Node, Any], needs: dict[torch.fx.Node, list[Any]]) -> Any:
    """What the first member of ``region`` that reads ``node`` needs of it (None if none does)."""
    return next((need for user in node.users if user in region
                 for arg, need in zip(_occurrences(user), needs[user]) if arg is node), None)


def _as_chain(region: dict[torch.fx.Node, Slicing], needs: dict[torch.fx.Node, list[Any]], seed: torch.fx.Node,
              units: int, order: dict[torch.fx.Node, int]) -> Chain:
    """The chain of ``region`` (no path out of it and back), which must be consistent: a member
    reached twice reads every member under the slicing that member has."""
    for node in region:
        for arg, need in zip(_occurrences(node), needs[node]):
            if arg in region and need != region[arg]:
                raise _Rejected(f"{arg.name} feeds {node.name} under two slicings")
    _drop_outside_views(region, seed)
    nodes = dict(sorted(region.items(), key=lambda item: order[item[0]]))
    entries, exits = _boundary(nodes, needs)
    return Chain(nodes, units, seed, entries, exits)


def _boundary(nodes: dict[torch.fx.Node, Any], needs: dict[torch.fx.Node, list[Any]]
              ) -> tuple[dict[tuple[torch.fx.Node, Slicing], None], list[torch.fx.Node]]:
    """A chain's entries (each tensor from outside with the slicing its members read it under;
    a need is a slicing, or a cut chain's ``(slicing, rows)``) and exits (members read outside)."""
    entries = {}
    for node in nodes:
        for arg, need in zip(_occurrences(node), needs[node]):
            if need is not WHOLE and arg not in nodes:
                entries[(arg, need if isinstance(need, Slicing) else need[0])] = None
    exits = [n for n in nodes if any(u not in nodes for u in n.users)]
    if any(isinstance(_val(n), (tuple, list)) for n in exits):
        raise _Rejected("a multi-output op of the chain is read outside it")
    return entries, exits


def _outside_view(node: torch.fx.Node, region: dict[torch.fx.Node, Any], seed: torch.fx.Node) -> bool:
    """Whether member ``node`` is a view read only outside the chain (not a projection of a
    tuple, which goes with its tuple): as an exit it would store the data its base holds a
    second time (a group norm's statistics read ``reshape(h)`` while the next op reads ``h``);
    left outside, it views its base's exit buffer."""
    return (node is not seed and node.target in _ALIASES and not any(u in region for u in node.users)
            and not isinstance(_val(node.args[0]), (tuple, list)))


def _outside_copy(node: torch.fx.Node, region: dict[torch.fx.Node, Any], seed: torch.fx.Node) -> bool:
    """Whether member ``node`` is a layout copy read only outside the chain, of a member the
    chain stores anyway (read outside too): as an exit it would store the same data twice (a
    motion module's input, copied frames-last for its norm); left outside, it is made from the
    stored one by its readers."""
    if node is seed or node.target is not aten.clone.default or any(u in region for u in node.users):
        return False
    base = node.args[0]
    while base in region and base.target in _ALIASES and len(base.users) == 1:
        base = base.args[0]
    return base in region and any(u not in region for u in base.users)


def _drop_outside_views(region: dict[torch.fx.Node, Any], seed: torch.fx.Node) -> None:
    while views := [n for n in region if _outside_view(n, region, seed) or _outside_copy(n, region, seed)]:
        for node in views:
            del region[node]


def _buffer_of(node: torch.fx.Node) -> torch.fx.Node | None:
    """The preallocated exit buffer (``empty``) that ``node`` (a slice view of it) aliases."""
    while isinstance(node, torch.fx.Node) and node.target is aten.slice.Tensor:
        node = node.args[0]
    if isinstance(node, torch.fx.Node) and node.target in (aten.empty.memory_format, aten.empty_strided.default):
        return node
    return None


def _users(node: torch.fx.Node) -> list[torch.fx.Node]:
    """``node``'s users, plus the hidden edges of an earlier rewrite's exit buffers: the
    ``copy_`` storing a slice is read by the full-size view of its buffer (the view has the
    empty buffer as its only FX input, but its value exists only after every copy)."""
    users = list(node.users)
    if node.target is aten.copy_.default:
        buffer = _buffer_of(node.args[0])
        if buffer is not None:
            users += [u for u in buffer.users if u.meta.get(_SLICED_EXIT)]
    return users


def _inputs(node: torch.fx.Node) -> list[torch.fx.Node]:
    """``node``'s tensor inputs, plus (for the full-size view of an exit buffer) the ``copy_``
    nodes that write the buffer: the reverse of :func:`_users`."""
    found = _occurrences(node)
    if node.meta.get(_SLICED_EXIT):
        stack = [node.args[0]]
        while stack:
            alias = stack.pop()
            for user in alias.users:
                if user.target is aten.slice.Tensor and user.args[0] is alias:
                    stack.append(user)
                elif user.target is aten.copy_.default and user.args[0] is alias:
                    found.append(user)
    return found


def _between(region: dict[torch.fx.Node, Slicing], order: dict[torch.fx.Node, int]) -> set[torch.fx.Node]:
    """Nodes outside ``region`` on a path from it back into it (through an earlier rewrite's
    exit buffers too: a member reading such a buffer must come after every store into it)."""
    last = max(order[n] for n in region)
    descendants: set[torch.fx.Node] = set()
    frontier = [u for n in region for u in _users(n) if u not in region and order[u] < last]
    while frontier:
        node = frontier.pop()
        if node not in descendants:
            descendants.add(node)
            frontier.extend(u for u in _users(node) if u not in region and order[u] < last)
    between: set[torch.fx.Node] = set()
    changed = True
    while changed:  # keep the descendants that reach the region again
        changed = False
        for node in descendants - between:
            if any(u in region or u in between for u in _users(node)):
                between.add(node)
                changed = True
    return between


def _chain_gain(chain: Chain) -> tuple[int, int]:
    """(internal peak bytes, bytes the chain leaves full size: entries + exits)."""
    items = []
    for node in chain.nodes:
        items.append(_Item(node, _bytes(node) if _materialized(node) else 0,
                           [a for a in _occurrences(node) if a in chain.nodes],
                           node.args[0] if node.target in _ALIASES else None))
    internal, _ = _simulate_peak(items)
    boundary = sum(_bytes(arg) for arg, _ in chain.entries) + sum(_bytes(n) for n in chain.exits)
    return internal, boundary


def _seed_slicings(seed: torch.fx.Node) -> list[tuple[Slicing, int, str]]:
    """Ways to slice ``seed``: each of its dims, and each dim of a reshape of it (the tokens of
    ``[B, T, H]`` are a factor of the rows of the ``[B*T, 4H]`` an FFN's matmul writes)."""
    shape = _shape(seed)
    found: dict[tuple[Slicing, int], str] = {}
    for dim, size in enumerate(shape):
        if size >= 2:
            found.setdefault((Slicing(dim), size), f"dim {dim}")
    group, frontier = {seed}, [seed]
    while frontier:
        node = frontier.pop()
        neighbours = list(node.users) + ([node.args[0]] if node.target in _VIEWS else [])
        for other in neighbours:
            if other not in group and other.target in _VIEWS and _shape(other) is not None:
                group.add(other)
                frontier.append(other)
            elif other not in group and node.target in _VIEWS and other is node.args[0] and _shape(other):
                group.add(other)
                frontier.append(other)
    for view in group - {seed}:
        view_shape = _shape(view)
        if math.prod(view_shape) != math.prod(shape):
            continue
        for dim, size in enumerate(view_shape):
            if size < 2:
                continue
            sliced = _reshape(shape, view_shape, Slicing(dim), size)
            if sliced is not None:
                found.setdefault((sliced, size), f"dim {dim} of {view.name} {list(view_shape)}")
    return [(slicing, units, label) for (slicing, units), label in found.items()]


def find_chains(graph: torch.fx.Graph, report: PassReport) -> list[Chain]:
    order = {node: index for index, node in enumerate(graph.nodes)}
    candidates = [n for n in graph.nodes if _seedable(n)]
    candidates.sort(key=lambda n: (-_bytes(n), order[n]))
    taken: set[torch.fx.Node] = set()
    chains: list[Chain] = []
    largest = _bytes(candidates[0]) if candidates else 0
    for seed in candidates:
        # Activations far smaller than the largest ones do not set the peak.
        if _bytes(seed) * 8 < largest:
            break
        if seed in taken:
            continue
        _take(_chain_from(seed, chains, order, taken, report), chains, taken)
    for chain in chains:
        _finish(graph, chain, order)
    _cover_estimated_peak(graph, chains, taken)
    _peel_entry_sums(graph, chains)
    order = {node: index for index, node in enumerate(graph.nodes)}
    return sorted(chains, key=lambda c: order[next(iter(c.nodes))])


def _finish(graph: torch.fx.Graph, chain: Chain, order: dict[torch.fx.Node, int]) -> None:
    """Trims a chain found: no trailing concatenation, copies of entries made per slice."""
    _drop_trailing_cats(chain)
    _recompute_entries(graph, chain, order)


def _seedable(node: torch.fx.Node) -> bool:
    return (node.op == "call_function" and _materialized(node) and bool(_shape(node)) and _bytes(node) > 0
            and not isinstance(_val(node), (tuple, list)))


def _take(chain: Chain | None, chains: list[Chain], taken: set[torch.fx.Node]) -> None:
    """Add ``chain`` in place of the chains it holds nodes of (a merge)."""
    if chain is None:
        return
    chains[:] = [c for c in chains if not any(n in chain.nodes for n in c.nodes)]
    chains.append(chain)
    taken.update(chain.nodes)


def _cover_estimated_peak(graph: torch.fx.Graph, chains: list[Chain], taken: set[torch.fx.Node]) -> None:
    """Seed more chains where the estimated peak lies outside every chain.

    Once the largest activations are grouped, the peak can move to a block of activations below
    the seed cutoff (a video UNet's attention at its lowest resolution, whose tensors are an
    eighth of the full-resolution ones), held beside the long-lived ones (skip connections).
    The ops alive there are tried as seeds. Grown from a small seed, a chain reaches far back
    (everything at that resolution is as large as the seed), storing what it passes whole, or
    stops at a chain grouped over another dim: each is also tried in the forms
    :func:`_variants` lists. The one with the lowest estimated peak (every chain cut
    ``DEFAULT_SLICES`` times), then the fewest bytes alive where the peak was, is kept, if the
    peak is no higher and less is alive there. Near-equal peaks (the same block repeated at one
    resolution) are cut so, one by one; if the peak is no lower at the end, the chains of this
    search are dropped. Seeding everything that small instead would slice many chains off the
    peak, each slice a few more kernel calls.
    """
    def held_at(items: list[_Item], key: Any) -> int:
        """The most bytes alive at ``key``'s op (or at any of its slices)."""
        change = [0] * (len(items) + 1)
        for index, dies, nbytes in _lifetimes(items):
            change[index] += nbytes
            change[dies + 1] -= nbytes
        live, most = 0, 0
        for index, item in enumerate(items):
            live += change[index]
            if item.key is key or isinstance(item.key, tuple) and item.key[0] is key:
                most = max(most, live)
        return most

    start_chains, start_taken = list(chains), set(taken)
    peak, at, items = _estimate_cut(graph, chains)
    first_peak = peak
    added: list[Chain] = []
    tried: set[torch.fx.Node] = set()
    for _ in range(PEAK_ROUNDS):
        key = items[at].key
        if (key[0] if isinstance(key, tuple) else key) in taken:
            break  # the peak is in a slice: choose_slices' business
        at_peak = held_at(items, key)
        order = {node: index for index, node in enumerate(graph.nodes)}
        seeds = []
        for live in [key] + _live_at(items, at):
            for node in (live.users if isinstance(_val(live), (tuple, list)) else [live]):
                if isinstance(node, torch.fx.Node) and _seedable(node) and node not in taken and node not in tried:
                    seeds.append(node)
        best, seen = None, set()
        for seed in sorted(dict.fromkeys(seeds), key=lambda n: (-_bytes(n), order[n]))[:PEAK_SEEDS]:
            tried.add(seed)
            for _, grown in _candidates(seed, chains, order, taken, [], stop_at_taken=True):
                if frozenset(grown.nodes) in seen:
                    continue  # (the seeds of one block grow the same chain)
                seen.add(frozenset(grown.nodes))
                for new, dropped in _variants(grown, chains, order):
                    candidate = [c for c in chains if c not in dropped]
                    for chain in new:
                        _drop_trailing_cats(chain)
                        _take(chain, candidate, set())
                    result = _estimate_cut(graph, candidate)
                    rank = (result[0], held_at(result[2], key))
                    if rank[0] <= peak and rank[1] < at_peak and (best is None or rank < best[0]):
                        best = (rank, result, new, dropped)
        if best is None:
            break
        _, (peak, at, items), new, dropped = best
        chains[:] = [c for c in chains if c not in dropped]
        for chain in new:
            _take(chain, chains, taken)
        added += new
    if peak >= first_peak:
        chains[:] = start_chains
        taken.clear()
        taken.update(start_taken)
        return
    order = {node: index for index, node in enumerate(graph.nodes)}
    for chain in added:
        if chain in chains:
            _recompute_entries(graph, chain, order)


def _cut_points(chain: Chain) -> list[int]:
    """Where ``chain`` may be cut in two (indices of its members, in graph order): at most
    ``PEAK_SUFFIXES`` members that own a buffer, spread evenly."""
    starts = [i for i, n in enumerate(chain.nodes) if i and _materialized(n)]
    return starts[::max(1, math.ceil(len(starts) / PEAK_SUFFIXES))]


def _sub_chain(chain: Chain, kept: list[torch.fx.Node], order: dict[torch.fx.Node, int]) -> Chain | None:
    """The chain of ``kept``, a prefix or a suffix of ``chain``'s members in graph order (so no
    path leaves it and comes back), sliced as in ``chain``; None if it splits a tuple from its
    projections or its exits differ in row count."""
    kept_set = set(kept)
    if any(n.target is operator.getitem and n.args[0] in chain.nodes and (n.args[0] in kept_set) != (n in kept_set)
           for n in chain.nodes):
        return None
    seed = chain.seed if chain.seed in kept_set else max(kept, key=lambda n: (_bytes(n), -order[n]))
    nodes = {n: chain.nodes[n] for n in kept}
    try:
        if chain.needs is None:
            needs = {n: _input_slicings(n, sliced, chain.units) for n, sliced in nodes.items()}
            return _as_chain(nodes, needs, seed, chain.units, order)
        needs = {n: chain.needs[n] for n in kept}
        entries, exits = _boundary(nodes, needs)
    except _Rejected:
        return None
    if len({chain.rows[n] for n in exits}) != 1:
        return None
    return Chain(nodes, chain.rows[exits[0]], seed, entries, exits,
                 rows={n: chain.rows[n] for n in kept}, needs=needs, halo=chain.halo)


def _variants(chain: Chain, chains: list[Chain], order: dict[torch.fx.Node, int]
              ) -> list[tuple[list[Chain], list[Chain]]]:
    """Ways to add ``chain`` to ``chains``, as (chains to add, chains to drop): as it is; its
    suffixes (holding all or none of each chain); and, for a cut chain that feeds another
    chain, joined with a head of that one (the rest left as its own chain): the feed-forward
    and residual add of a motion module, grouped over frames with the resnet after it, joining
    the attention sliced over pixels."""
    found: list[tuple[list[Chain], list[Chain]]] = [([chain], [])]
    members = list(chain.nodes)
    for i in _cut_points(chain):
        kept = members[i:]
        if any(0 < sum(n in kept for n in c.nodes) < len(c.nodes) for c in chains):
            continue
        if (suffix := _sub_chain(chain, kept, order)) is not None:
            found.append(([suffix], []))
    if chain.needs is None:
        return found
    for other in chains:
        if not any(u in other.nodes for n in chain.exits for u in n.users):
            continue
        heads = list(other.nodes)
        for i in _cut_points(other):
            head, rest = _sub_chain(other, heads[:i], order), _sub_chain(other, heads[i:], order)
            if head is None or rest is None:
                continue
            try:
                joined = _union(chain, [head], order)
            except _Rejected:
                continue
            found.append(([joined, rest], [other]))
    return found


def _chain_from(seed: torch.fx.Node, chains: list[Chain], order: dict[torch.fx.Node, int],
                taken: set[torch.fx.Node], report: PassReport) -> Chain | None:
    """The best chain grown from ``seed`` (joined with the chains it overlaps or touches), or
    None with the reasons reported."""
    best, reasons = None, []
    for score, chain in _candidates(seed, chains, order, taken, reasons):
        # A chain holding all of another and storing no more wins whatever it reads: what
        # it reads more (a residual read by its last add) is alive anyway.
        if best is None or (score > best[0] or _covers(chain, best[1])) and not _covers(best[1], chain):
            best = (score, chain)
    if best is None:
        report.skipped(seed.name, f"{list(_shape(seed))}: " + "; ".join(reasons or ["no dim to slice"]))
        return None
    if reasons:
        report.skipped(seed.name, f"{list(_shape(seed))}: dims not taken whole: " + "; ".join(reasons))
    return best[1]


def _candidates(seed: torch.fx.Node, chains: list[Chain], order: dict[torch.fx.Node, int],
                taken: set[torch.fx.Node], reasons: list[str], stop_at_taken: bool = False
                ) -> list[tuple[float, Chain]]:
    """The worthwhile chains grown from ``seed``, one per way to slice it (joined with the
    chains it overlaps or touches), each with its score; why the others are not, in ``reasons``.

    A chain that overlaps chains it cannot join is dropped, or with ``stop_at_taken`` cut where
    it meets them (a motion module's attention over pixels, at its feed-forward grouped over
    frames with the resnet after it): in the search at the estimated peak, which keeps it only
    if the estimate says so."""
    found = []
    for slicing, units, label in _seed_slicings(seed):
        try:
            chain = _grow(seed, slicing, units, order)
        except _Rejected as why:
            # Cut the chain at the conflict (the temporal attention of a video UNet reads
            # the frames its spatial layers treat as batch) instead of dropping it.
            try:
                chain = _grow_cut(seed, order, (slicing, units), taken)
            except _Rejected as cut_why:
                reasons.append(f"{label}: {why}; cut at the conflict: {cut_why}")
                continue
            reasons.append(f"{label}: {why}; cut there ({len(chain.nodes)} ops left)")
        overlapping = [c for c in chains if any(n in c.nodes for n in chain.nodes)]
        if overlapping:
            # The same slicing reaching a chain grown from a larger seed (the lower-resolution
            # blocks of a decoder, batch-sliced like its last block): one chain for both.
            try:
                chain = _merge(seed, slicing, units, order, overlapping)
            except _Rejected as why:
                if not stop_at_taken:
                    reasons.append(f"{label}: overlaps a chain already grouped and cannot join it ({why})")
                    continue
                try:
                    chain = _grow_cut(seed, order, (slicing, units), taken)
                except _Rejected as cut_why:
                    reasons.append(f"{label}: overlaps a chain already grouped and cannot join it "
                                   f"({why}) or stop at it ({cut_why})")
                    continue
                reasons.append(f"{label}: overlaps a chain already grouped and cannot join it ({why}); "
                               f"stopped there ({len(chain.nodes)} ops left)")
        if ((stop_at_taken or not overlapping) and chain.needs is not None
                and (touching := [c for c in chains if _touches(chain, c)])):
            # A cut chain stops at the chains already grouped (a motion module's attention
            # at its feed-forward): joined, their boundary is never held full size.
            try:
                chain = _merge(seed, slicing, units, order, touching)
            except _Rejected:
                for other in touching:  # then one by one, as they are
                    try:
                        chain = _union(chain, [other], order)
                    except _Rejected as why:
                        reasons.append(f"{label}: cannot join {other.seed.name}'s chain ({why})")
        internal, boundary = _chain_gain(chain)
        # A chain cut at a conflict is short (a norm's application and a convolution): it
        # only needs an intermediate of its own, the schedule simulation says if it helps.
        least = sum(_bytes(n) for n in chain.exits) if chain.needs is not None else boundary * MIN_GAIN
        if internal <= least:
            reasons.append(f"{label}: its intermediates ({internal} B) are not larger than what "
                           f"it reads and writes whole ({boundary} B)")
            continue
        # What the chain could save at most: a dim of few units (a batch of 2) saves less.
        found.append((internal * (1 - 1 / min(chain.units, MAX_SLICES)) - boundary, chain))
    return found


def _drop_trailing_cats(chain: Chain) -> None:
    """A concatenation the chain ends with, of its members and tensors from outside (a UNet's up
    block joining its skip connection), is left to run after it: as an exit, its buffer would
    hold the outside tensors' copy through every slice, beside the tensors themselves."""
    while cats := [n for n in chain.nodes if n is not chain.seed and n.target is aten.cat.default
                   and not any(u in chain.nodes for u in n.users)
                   and any(arg not in chain.nodes for arg in _occurrences(n))]:
        for node in cats:
            del chain.nodes[node]
            if chain.needs is not None:
                del chain.needs[node], chain.rows[node]
        needs = chain.needs or {node: _input_slicings(node, sliced, chain.units) for node, sliced in chain.nodes.items()}
        chain.entries, chain.exits = _boundary(chain.nodes, needs)


def _recompute_entries(graph: torch.fx.Graph, chain: Chain, order: dict[torch.fx.Node, int]) -> None:
    """Each slice computes its part of an entry that a layout copy or a pointwise op makes from
    other entries (through views), when the entry's other readers all come before the chain: the
    entry then dies before the chain instead of being held, full size, beside what it was made
    from (a motion module's input, permuted frames-last and copied for its group norm, beside the
    input the module's residual add reads). The readers before the chain keep the original."""
    first = min(order[n] for n in chain.nodes)
    entries = [arg for arg, _ in chain.entries]
    for arg, need in list(chain.entries):
        if (arg.op != "call_function" or entries.count(arg) != 1
                or not (arg.target is aten.clone.default or _is_pointwise(arg))
                or any(order[u] > first for u in arg.users if u not in chain.nodes)):
            continue
        plan: dict[torch.fx.Node, Slicing] = {}
        if not _recomputable(arg, need, chain, plan, _bytes(arg)):
            continue
        copies: dict[torch.fx.Node, torch.fx.Node] = {}
        for node in sorted(plan, key=order.__getitem__):
            with graph.inserting_after(node):
                copies[node] = graph.node_copy(node, lambda a: copies.get(a, a))
            order[copies[node]] = order[node]
        for member in chain.nodes:
            member.replace_input_with(arg, copies[arg])
        for node, sliced in plan.items():
            chain.nodes[copies[node]] = sliced
            if chain.needs is not None:
                needed = _input_slicings(node, sliced, chain.units)
                chain.needs[copies[node]] = [n if n is WHOLE else (n, chain.units) for n in needed]
                chain.rows[copies[node]] = chain.units
        del chain.entries[(arg, need)]
    chain.nodes = dict(sorted(chain.nodes.items(), key=lambda item: order[item[0]]))


def _peel_entry_sums(graph: torch.fx.Graph, chains: list[Chain]) -> None:
    """Leaves outside its chain each member that is a pointwise sum of two or more large
    tensors (entries, or made from entries by a few ops of the chain) that nothing else in or
    after the chain reads, where the estimated peak (every chain cut ``DEFAULT_SLICES`` times)
    is no higher for it: stored before the chain (:func:`_store_summed_entries`), the sum is
    held alone through the slices, where computed per slice it holds every summand to the last
    one (a motion module's ``permute(proj_out(h)) + residual``, read by the resnet after it: two
    buffers held instead of one). The opposite of :func:`_recompute_entries`, which computes per
    slice an entry made from entries the chain holds anyway."""
    order = {node: index for index, node in enumerate(graph.nodes)}
    peak = None
    for chain in chains:
        first = min(order[n] for n in chain.nodes)
        for node in list(chain.nodes):
            if node not in chain.nodes or node in chain.exits or node.target in _ALIASES or not _is_pointwise(node):
                continue
            inner = _entry_made(node, chain)
            if inner is None:
                continue
            sources = {a for n in inner for a in _occurrences(n) if a not in chain.nodes}
            if sum(_bytes(s) * 2 >= _bytes(node) and _dies_in(s, inner, first, order) for s in sources) < 2:
                continue
            peak = _estimate_cut(graph, chains)[0] if peak is None else peak
            kept = (dict(chain.nodes), dict(chain.entries),
                    None if chain.needs is None else (dict(chain.needs), dict(chain.rows)))
            need = chain.nodes[node]
            for member in inner:
                del chain.nodes[member]
                if chain.needs is not None:
                    del chain.needs[member]
                    del chain.rows[member]
            read = {a for member in chain.nodes for a in _occurrences(member)}
            chain.entries = {e: None for e in chain.entries if e[0] in read}
            chain.entries[(node, need)] = None
            node.meta[_STORED_SUM] = True
            peeled = _estimate_cut(graph, chains)[0]
            if peeled <= peak:
                peak = peeled
                continue
            del node.meta[_STORED_SUM]
            chain.nodes, chain.entries = kept[0], kept[1]
            if kept[2] is not None:
                chain.needs, chain.rows = kept[2]


def _entry_made(node: torch.fx.Node, chain: Chain, most: int = 12) -> set[torch.fx.Node] | None:
    """``node`` and the members it is made from, if they lead back to entries only (no seed, no
    exit, at most ``most`` ops) and nothing else in the chain reads them."""
    inner, stack = {node}, [node]
    while stack:
        for arg in _occurrences(stack.pop()):
            if arg in chain.nodes and arg not in inner:
                if arg is chain.seed or arg in chain.exits or len(inner) >= most:
                    return None
                inner.add(arg)
                stack.append(arg)
    if chain.seed in inner or any(u not in inner for n in inner - {node} for u in n.users):
        return None
    return inner


def _dies_in(source: torch.fx.Node, readers: set[torch.fx.Node], first: int, order: dict[torch.fx.Node, int]) -> bool:
    """Whether the buffer ``source`` is (or views) is read, from ``first`` on, only by ``readers``
    (through views of it)."""
    allowed = set(readers)
    while True:
        if source.op != "call_function" or any(u not in allowed and order[u] >= first for u in source.users):
            return False
        if source.target not in _ALIASES:
            return True
        allowed.add(source)
        source = source.args[0]


def _recomputable(node: torch.fx.Node, need: Slicing, chain: Chain, plan: dict[torch.fx.Node, Slicing],
                  size: int, depth: int = 4) -> bool:
    """Whether ``node``'s slice can be made from the chain's entries (``plan``: the ops to copy)."""
    if depth == 0 or node.op != "call_function" or not (
            node.target in _ALIASES or node.target is aten.clone.default or _is_pointwise(node)):
        return False
    needed = _input_slicings(node, need, chain.units)
    if needed is None:
        return False
    plan[node] = need
    for arg, arg_need in zip(_occurrences(node), needed):
        if arg_need is WHOLE:
            if arg.op == "call_function" and _bytes(arg) * 8 > size:
                return False  # a large tensor read whole would be held through the chain
        elif (arg, arg_need) not in chain.entries and not _recomputable(arg, arg_need, chain, plan, size, depth - 1):
            return False
    return True


def _covers(chain: Chain, other: Chain) -> bool:
    """Whether ``chain`` holds every node of ``other`` and more, and stores no more bytes of exits."""
    return (other.nodes.keys() < chain.nodes.keys()
            and sum(_bytes(n) for n in chain.exits) <= sum(_bytes(n) for n in other.exits))


def _touches(chain: Chain, other: Chain) -> bool:
    """Whether ``other`` reads an exit of ``chain`` or writes one of its entries."""
    return (any(u in other.nodes for n in chain.exits for u in n.users)
            or any(arg in other.nodes for arg, _ in chain.entries))


def _coarsen(sliced: Slicing, factor: int) -> Slicing:
    """``sliced`` over ``U / factor`` units: each coarse unit is ``factor`` adjacent fine ones."""
    return Slicing(sliced.dim, sliced.outer, sliced.inner * factor)


def _merge(seed: torch.fx.Node, slicing: Slicing, units: int, order: dict[torch.fx.Node, int],
           overlapping: list[Chain]) -> Chain:
    """One chain for ``seed``'s and the ``overlapping`` chains' nodes.

    Chains over different unit counts of the same positions merge over the coarsest when it
    divides the others (a video UNet's motion module: its attention sliced over image rows, its
    feed-forward over pixels, a multiple of the rows), so that the whole module is one chain
    instead of three that leave their boundaries full size.
    """
    target = _common_units([units] + [c.units for c in overlapping])
    joined = {node: _coarsen(sliced, c.units // target) for c in overlapping for node, sliced in c.nodes.items()}
    merged = _grow(seed, _coarsen(slicing, units // target), target, order, joined)
    merged.seed = max(overlapping, key=lambda c: _bytes(c.seed)).seed
    return merged


def _common_units(counts: list[int]) -> int:
    """The unit count chains over ``counts`` units of the same positions merge over."""
    target = min(counts)
    # Not down to a handful of units: a chain of 256 pixels is worth more than 2 heads' worth.
    if any(u % target for u in counts) or (target < DEFAULT_SLICES and max(counts) != target):
        raise _Rejected(f"it slices other units ({sorted(set(counts))})")
    return target


def _union(base: Chain, others: list[Chain], order: dict[torch.fx.Node, int]) -> Chain:
    """One chain of exactly the nodes of ``base`` and of the (disjoint) chains ``others``, sliced
    as ``base`` is: the others' members take the slicing ``base``'s propagates to them (a
    feed-forward sliced over the pixels of each frame joins an attention sliced over frames, as
    frames). For a cut chain whose regrowth into its neighbours meets its conflict again."""
    units = base.units
    region = dict(base.nodes)
    needs = {node: _input_slicings(node, sliced, units) for node, sliced in region.items()}
    pending = sorted((n for c in others for n in c.nodes), key=order.__getitem__)
    while pending or (pending := sorted(n for n in _between(region, order) if n.target in _ALIASES)):
        # (the views between the chains join too: a reshape of one's exit the other reads)
        left = []
        for node in pending:
            sliced = next((_output_slicing(node, index, region[arg], units)
                           for index, arg in enumerate(_occurrences(node)) if arg in region), None)
            if sliced is None:  # a member reading only entries: as its reader in the region needs it
                sliced = _reader_need(node, region, needs)
            needed = None if sliced is None or sliced is WHOLE else _input_slicings(node, sliced, units)
            if needed is None:
                left.append(node)
                continue
            region[node], needs[node] = sliced, needed
        if len(left) == len(pending):
            raise _Rejected(f"{left[0].name} cannot take the slicing of {base.seed.name}")
        pending = left
    if between := _between(region, order):
        raise _Rejected(f"{min(between, key=order.__getitem__).name} is on a path out of them and back")
    return _as_chain(region, needs, max([base] + others, key=lambda c: _bytes(c.seed)).seed, units, order)


# ---------------------------------------------------------------------------------------------
# spatial chains: image rows, with the halo convolutions need
#
# A chain of convolutions, pointwise ops and nearest upsampling over ``[N, C, H, W]`` images is
# cut into bands of rows. Each member computes the rows its consumers in the chain need: a
# convolution's input band is its output band widened by the kernel's reach (the halo), an
# upsample's the source rows of its index. A band in the middle reads real neighbour rows; a band
# at the border pads with the zeros the convolution's own padding would add, so every row is
# computed from the same inputs as in the whole image: no seams. Reductions over the rows (the
# statistics of a group norm) never join: the statistics are computed on the whole tensor before
# the chain and read whole by every band, which applies the normalisation to its rows.
#
# So a group norm's input is held whole, and each exit is one buffer: a resnet at full resolution
# holds its input, its first convolution's output and its own output at once (the floor of a
# batch-1 decode, 1.25x below Inductor; README). Lower needs exits kept as per-band buffers, each
# freed once the next chain's bands have read it with their halo (at most 2.5x there: the
# upsampler's output is held whole for its norm), or that output computed twice, statistics
# first (a convolution at full resolution again).


def _row_index(node: torch.fx.Node) -> torch.Tensor | None:
    """The source row of each output row of a nearest upsample ``_unsafe_index(x, [None, None,
    rows, cols])`` whose index is computed from constants only (iota arithmetic)."""
    indices = node.args[1]
    shape = _shape(node)
    if (len(indices) < 3 or indices[0] is not None or indices[1] is not None
            or not isinstance(indices[2], torch.fx.Node) or shape is None or len(shape) != 4):
        return None
    index_shape = _shape(indices[2])
    if index_shape is None or index_shape != (shape[2],) + (1,) * (len(indices) - 3):
        return None
    if "zc_row_index" not in node.meta:
        node.meta["zc_row_index"] = _constant_value(indices[2])
    return node.meta["zc_row_index"]


def _constant_value(node: torch.fx.Node) -> torch.Tensor | None:
    values: dict[torch.fx.Node, Any] = {}

    def evaluate(n: torch.fx.Node) -> Any:
        if n not in values:
            if n.op != "call_function" or len(values) > 64:
                raise _Rejected("not a constant")
            args, kwargs = torch.fx.node.map_arg((n.args, n.kwargs), evaluate)
            values[n] = n.target(*args, **kwargs)
        return values[n]

    try:
        with torch._subclasses.fake_tensor.unset_fake_temporarily():
            return evaluate(node).reshape(-1).cpu()
    except Exception:  # noqa: BLE001 - anything not computable from constants is not sliced
        return None


def _row_inputs(node: torch.fx.Node, sliced: Slicing, rows: int, halo: bool = True) -> list[Any] | None:
    """Like :func:`_input_slicings`, for a chain over image rows: each tensor occurrence's
    ``(slicing, rows)`` or ``WHOLE``. Convolutions and nearest upsampling slice their rows
    (dim 2) with a halo; every other rule maps a band of rows to the same band. Without
    ``halo``, only the latter (a chain along an independent dim, ``rows`` its units)."""
    if node.op != "call_function":
        return None
    if halo and node.target is aten.convolution.default:
        shape = _shape(node)
        transposed = node.args[6]
        if (sliced != Slicing(2) or shape is None or len(shape) != 4 or transposed or shape[2] != rows
                or node.args[3][0] != 1):
            return None  # stride 1 over the rows only (the bands of a strided one are untested)
        return [(Slicing(2), _shape(node.args[0])[2])] + [WHOLE] * (len(_occurrences(node)) - 1)
    if halo and node.target is aten._unsafe_index.Tensor and sliced.dim == 2:
        if sliced != Slicing(2) or _row_index(node) is None or _shape(node)[2] != rows:
            return None
        return [(Slicing(2), _shape(node.args[0])[2])] + [WHOLE] * (len(_occurrences(node)) - 1)
    if halo and not (_is_pointwise(node) or node.target in _ROW_OPS):
        # Only ops tested exact over bands (a VAE decoder's, a video UNet's). Permutes, cats and
        # strided convolutions were kept out while a video UNet gave wrong results; that cause was
        # elsewhere (reads of an earlier chain's exit buffer), and they are not yet tested here.
        return None
    needed = _input_slicings(node, sliced, rows)
    if needed is None:
        return None
    return [need if need is WHOLE else (need, rows) for need in needed]


_ROW_OPS = _VIEWS | {aten.clone.default, operator.getitem}


def _input_rows(node: torch.fx.Node, occurrence: int, start: int, stop: int, halo: bool = True) -> tuple[int, int]:
    """The rows of ``node``'s ``occurrence``-th input its output rows ``[start, stop)`` read
    (a convolution's may reach beyond the image: the zero padding)."""
    if not halo:
        return start, stop
    if occurrence == 0 and node.target is aten.convolution.default:
        kernel = _shape(node.args[1])[2]
        stride, padding, dilation = node.args[3][0], node.args[4][0], node.args[5][0]
        return start * stride - padding, (stop - 1) * stride - padding + dilation * (kernel - 1) + 1
    if occurrence == 0 and node.target is aten._unsafe_index.Tensor:
        source = _row_index(node)[start:stop]
        return int(source.min()), int(source.max()) + 1
    return start, stop


def _row_output(user: torch.fx.Node, occurrence: int, given: tuple[Slicing, int],
                halo: bool = True) -> tuple[Slicing, int] | None:
    """The ``(slicing, rows)`` of ``user``'s output under which its input reads ``given``."""
    shape = _shape(user)
    if shape is None:
        return None
    if halo and user.target in (aten.convolution.default, aten._unsafe_index.Tensor) and len(shape) == 4:
        candidates = [(Slicing(2), shape[2])]
    else:
        out = _output_slicing(user, occurrence, given[0], given[1])
        candidates = [] if out is None else [(out, given[1])]
    for out, rows in candidates:
        needed = _row_inputs(user, out, rows, halo)
        if needed is not None and needed[occurrence] == given:
            return out, rows
    return None


def _grow_cut(seed: torch.fx.Node, order: dict[torch.fx.Node, int], start: tuple[Slicing, int] | None = None,
              taken: set[torch.fx.Node] | frozenset = frozenset()) -> Chain:
    """The chain over the image rows of ``seed`` ``[N, C, H, W]`` (or, given ``start``, along
    that slicing of an independent dim, without halo).

    It grows through large producers and consumers like :func:`_grow`, but where it meets an op
    it cannot take (a group norm's statistics, an attention over all pixels, a temporal
    attention over the frames a spatial layer treats as batch) it is cut there instead of
    dropped: the part on the seed's side of the conflict is kept. Nodes in ``taken`` (other
    chains) are not joined: the chain reads them, or they read it.
    """
    halo = start is None
    threshold = _bytes(seed) * LARGE_FRACTION
    region: dict[torch.fx.Node, tuple[Slicing, int]] = {}
    needs: dict[torch.fx.Node, list[Any]] = {}
    work: list[torch.fx.Node] = []

    def add(node: torch.fx.Node, sliced: tuple[Slicing, int]) -> bool:
        if node in region:
            return region[node] == sliced
        if node in taken or (node.target is operator.getitem and node.args[0] not in region):
            return False  # a projection of a tuple goes with the tuple (never a slice of it)
        needed = _row_inputs(node, *sliced, halo)
        if needed is None:
            return False
        region[node], needs[node] = sliced, needed
        work.append(node)
        if isinstance(_val(node), (tuple, list)):
            for user in node.users:
                add(user, sliced)
        return True

    def drain() -> None:
        while work:
            node = work.pop()
            for arg, need in zip(_occurrences(node), needs[node]):
                if need is not WHOLE and arg not in region and arg.op == "call_function" and _bytes(arg) >= threshold:
                    add(arg, need)
            epilogue = len(node.users) == 1 and all(_is_pointwise(u) or u.target in _ALIASES for u in node.users)
            if _bytes(node) < threshold and node is not seed and not epilogue:
                continue
            for user in node.users:
                if user not in region and user.op == "call_function":
                    index = _occurrences(user).index(node)
                    out = _row_output(user, index, region[node], halo)
                    if out is not None:
                        add(user, out)

    if not add(seed, start or (Slicing(2), _shape(seed)[2])):
        raise _Rejected("its rows cannot be sliced" if halo else "it cannot be sliced")
    drain()

    def cut(conflict: torch.fx.Node) -> None:
        """Drop the members on the far side of ``conflict`` from the seed: ``conflict`` is a
        node outside the chain on a path out of it and back, or a member reading another member
        under other rows than it has (dropped with its descendants when the seed is upstream)."""
        ancestors, descendants = _related(conflict, region, upward=True), _related(conflict, region, upward=False)
        if seed in ancestors:
            descendants.add(conflict)
        for node in descendants if seed in ancestors else ancestors:
            region.pop(node, None)

    def join(between: set[torch.fx.Node]) -> bool:
        """Along an independent dim, the small ops on a path out of the chain and back join it
        slice-wise where they can (a per-frame norm's statistics scaled by its weight, read back
        by the normalisation), as :func:`_grow` joins them; whether any did."""
        joined = False
        for node in sorted(between, key=order.__getitem__, reverse=True):
            need = None if node in region else _reader_need(node, region, needs)
            if need is not None and need is not WHOLE and add(node, need):
                joined = True
        drain()
        return joined

    while True:
        # A projection whose tuple a cut left outside goes too (a tuple is never sliced).
        orphan = next((n for n in region if n.target is operator.getitem and n.args[0] not in region), None)
        if orphan is not None:
            dropped = {orphan} | _related(orphan, region, upward=False)
            if seed in dropped:
                raise _Rejected(f"{seed.name} depends on a projection of a tuple outside the chain")
            for node in dropped:
                del region[node]
            _keep_connected(region, seed)
            continue
        # A member reading another member under other rows than it has: cut at the reader.
        clash = next((node for node in region for arg, need in zip(_occurrences(node), needs[node])
                      if arg in region and need != region[arg]), None)
        if clash is not None:
            if clash is seed:
                raise _Rejected(f"{seed.name} reads a member under other rows")
            cut(clash)
            _keep_connected(region, seed)
            continue
        between = _between(region, order)
        if not between:
            break
        if not halo and join(between):
            continue
        cut(min(between, key=order.__getitem__))
        _keep_connected(region, seed)

    # Members read only outside the chain that save nothing stay outside: a view (the reshape a
    # norm's statistics start from) would be an exit of its own, copied into a buffer; an op
    # reading only exits (a resnet's shortcut convolution) would be computed early and held.
    def saves_nothing(node: torch.fx.Node) -> bool:
        if node is seed or any(u in region for u in node.users):
            return False
        if node.target in _ALIASES:
            return _outside_view(node, region, seed)
        return all(any(u not in region for u in arg.users) for arg in _occurrences(node) if arg in region)

    while sinks := [n for n in region if saves_nothing(n)]:
        for node in sinks:
            del region[node]
        _keep_connected(region, seed)
    nodes = dict(sorted(region.items(), key=lambda item: order[item[0]]))
    entries, exits = _boundary(nodes, needs)
    exit_rows = {nodes[n][1] for n in exits}
    if len(exit_rows) != 1:
        raise _Rejected(f"its exits have different row counts {sorted(exit_rows)}")
    return Chain({n: sliced for n, (sliced, _) in nodes.items()}, exit_rows.pop(), seed, entries, exits,
                 rows={n: rows for n, (_, rows) in nodes.items()}, needs={n: needs[n] for n in nodes}, halo=halo)


def _related(start: torch.fx.Node, region: dict[torch.fx.Node, Any], upward: bool) -> set[torch.fx.Node]:
    """Members of ``region`` that are ancestors (``upward``) or descendants of ``start``."""
    found: set[torch.fx.Node] = set()
    seen: set[torch.fx.Node] = set()
    frontier = [start]
    while frontier:
        node = frontier.pop()
        for other in (_inputs(node) if upward else _users(node)):
            if other not in seen:
                seen.add(other)
                if other in region:
                    found.add(other)
                frontier.append(other)
    return found


def _keep_connected(region: dict[torch.fx.Node, Any], seed: torch.fx.Node) -> None:
    """Keep the members connected to ``seed`` through member-to-member edges."""
    kept, frontier = {seed}, [seed]
    while frontier:
        node = frontier.pop()
        for other in list(_occurrences(node)) + list(node.users):
            if other in region and other not in kept:
                kept.add(other)
                frontier.append(other)
    for node in [n for n in region if n not in kept]:
        del region[node]


def find_row_chains(graph: torch.fx.Graph, report: PassReport) -> list[Chain]:
    """Spatial chains over the image rows of the largest 4-d activations."""
    order = {node: index for index, node in enumerate(graph.nodes)}
    candidates = [
        n for n in graph.nodes
        if n.op == "call_function" and _materialized(n) and _shape(n) and len(_shape(n)) == 4
        and _shape(n)[2] >= 2 * MIN_SLICE_ROWS and not isinstance(_val(n), (tuple, list))
    ]
    candidates.sort(key=lambda n: (-_bytes(n), order[n]))
    largest = _bytes(candidates[0]) if candidates else 0
    taken: set[torch.fx.Node] = set()
    chains: list[Chain] = []
    for seed in candidates:
        if _bytes(seed) * 8 < largest:
            break
        if seed in taken:
            continue
        try:
            chain = _grow_cut(seed, order, taken=taken)
        except _Rejected as why:
            report.skipped(seed.name, f"{list(_shape(seed))}, image rows: {why}")
            continue
        # Whether slicing lowers the graph's peak is for the schedule simulation to say; a chain
        # only needs an intermediate of its own (the exits are written whole either way).
        internal, _ = _chain_gain(chain)
        exits = sum(_bytes(n) for n in chain.exits)
        if internal <= exits:
            report.skipped(seed.name, f"{list(_shape(seed))}, image rows: no intermediate besides its exits "
                           f"({internal} B at its peak, {exits} B of exits)")
            continue
        chains.append(chain)
        taken.update(chain.nodes)
    return sorted(chains, key=lambda c: order[next(iter(c.nodes))])


def rewrite_rows(graph: torch.fx.Graph, chain: Chain) -> None:
    """Run a chain built by :func:`_grow_cut` band by band; each member computes the rows (units)
    its consumers need: with a halo, wider bands upstream of each convolution."""
    members = list(chain.nodes)
    emit = _Emitter(graph, members[-1])
    buffers = _exit_buffers(chain, emit)
    serial = next(_CHAIN_SERIALS)
    for k, (start, stop) in enumerate(_bounds(chain.units, chain.slices)):
        emit.slice_tag = (serial, k)
        # Which rows each member computes in this band, from the exits back (the halo widens
        # the band at every convolution); rows outside the image are clipped.
        band: dict[torch.fx.Node, tuple[int, int]] = {e: (start, stop) for e in chain.exits}
        for node in reversed(members):
            if node not in band:
                continue
            for index, (arg, need) in enumerate(zip(_occurrences(node), chain.needs[node])):
                if arg in chain.nodes and need is not WHOLE:
                    low, high = _clip(_input_rows(node, index, *band[node], chain.halo), chain.rows[arg])
                    have = band.get(arg, (low, high))
                    band[arg] = (min(have[0], low), max(have[1], high))
        computed: dict[torch.fx.Node, tuple[torch.fx.Node, int]] = {}
        for node in members:
            if node not in band:
                continue
            low, high = band[node]
            read = []
            for index, (arg, need) in enumerate(zip(_occurrences(node), chain.needs[node])):
                if need is WHOLE:
                    read.append(arg)
                    continue
                first, last = _clip(_input_rows(node, index, low, high, chain.halo), need[1])
                if arg in chain.nodes and isinstance(_val(arg), (tuple, list)):
                    read.append(computed[arg][0])  # its projections take the same band
                elif arg in chain.nodes:
                    value, offset = computed[arg]
                    extent = band[arg][1] - band[arg][0]
                    read.append(_part(emit, value, need[0], extent, first - offset, last - offset))
                else:
                    read.append(_part(emit, arg, need[0], need[1], first, last))
            reads = iter(read)
            args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), lambda _: next(reads))
            if chain.halo and node.target is aten.convolution.default:
                args = _band_convolution(node, args, low, high, emit)
            elif chain.halo and node.target is aten._unsafe_index.Tensor and chain.nodes[node].dim == 2:
                args = _band_upsample(node, args, low, high, emit)
            else:
                args = _resize_args(node, args, chain.nodes[node], high - low)
            computed[node] = (emit(node.target, args, kwargs, like=node), low)
        for exit_node, buffer in buffers.items():
            value, offset = computed[exit_node]
            extent = band[exit_node][1] - band[exit_node][0]
            part = _part(emit, value, chain.nodes[exit_node], extent, start - offset, stop - offset)
            _store_slice(chain, exit_node, buffer, part, start, stop, emit)
    emit.slice_tag = None
    _replace_exits(graph, chain, buffers, emit)


def _clip(rows: tuple[int, int], total: int) -> tuple[int, int]:
    return max(rows[0], 0), min(rows[1], total)


def _band_convolution(node: torch.fx.Node, args: tuple, low: int, high: int,
                      emit: Callable[..., torch.fx.Node]) -> tuple:
    """A band's convolution: no row padding; the rows it reaches beyond the image are the zeros
    the original padding would have added, the others come from the input band."""
    first, last = _input_rows(node, 0, low, high)
    above, below = max(0, -first), max(0, last - _shape(node.args[0])[2])
    source = args[0]
    if above or below:
        source = emit(aten.constant_pad_nd.default, (source, [0, 0, above, below], 0.0))
    padding = list(node.args[4])
    return (source, *args[1:4], [0, *padding[1:]], *args[5:])


def _band_upsample(node: torch.fx.Node, args: tuple, low: int, high: int,
                   emit: Callable[..., torch.fx.Node]) -> tuple:
    """A band's nearest upsample: the output rows' entries of the row index, shifted to the
    source band's first row."""
    first, _ = _input_rows(node, 0, low, high)
    indices = list(args[1])
    rows = emit(aten.slice.Tensor, (indices[2], 0, low, high))
    if first:
        rows = emit(aten.sub.Tensor, (rows, first))
    indices[2] = rows
    return (args[0], indices, *args[2:])


# ---------------------------------------------------------------------------------------------
# slice counts


def _schedule(graph: torch.fx.Graph, chains: Sequence[Chain]) -> list[_Item]:
    """The abstract schedule of the graph after rewriting ``chains`` with their slice counts.

    As the rewrite leaves it: a sliced chain runs as one block where its last member was, its
    exits' full buffers allocated first and each slice's part of an exit dying at its copy; the
    ops between its members that read an exit move after the block (the topological sort).
    """
    sliced = [chain for chain in chains if chain.slices > 1]
    owner = {node: chain for chain in sliced for node in chain.nodes}
    last_of = {list(chain.nodes)[-1]: chain for chain in sliced}
    items: list[_Item] = []
    done: set[torch.fx.Node] = set()
    deferred: list[torch.fx.Node] = []

    # (all_input_nodes: each input once, which is all the schedule needs, without walking args.)
    def ready(node: torch.fx.Node) -> bool:
        return all(arg in done or arg.op in ("placeholder", "get_attr") for arg in node.all_input_nodes)

    def place(node: torch.fx.Node) -> None:
        items.append(_Item(node, _bytes(node) if _materialized(node) else 0, node.all_input_nodes,
                           node.args[0] if node.target in _ALIASES else None))
        done.add(node)

    for node in graph.nodes:
        if node.op in ("placeholder", "get_attr"):
            continue
        chain = owner.get(node)
        if chain is None:
            if ready(node) and not deferred:
                place(node)
            else:
                deferred.append(node)
            continue
        if node not in last_of:
            continue
        largest_slice = math.ceil(chain.units / chain.slices)
        for exit_node in chain.exits:
            items.append(_Item(exit_node, _bytes(exit_node), []))
        # Per member, what every slice's copy of it holds and reads (k filled in below).
        block = []
        for member in chain.nodes:
            size = _bytes(member) * largest_slice // chain.units if _materialized(member) or member in chain.exits else 0
            is_view = member.target in _ALIASES
            views_member = is_view and member.args[0] in chain.nodes  # a view of this slice's copy
            if is_view and not views_member:
                size = 0
            inputs = [(a, a in chain.nodes) for a in member.all_input_nodes]
            block.append((member, size, inputs, views_member))
        # Every slice holds the same: the exits' buffers and the entries, alive through the
        # block, and its own intermediates. The first and the last slice (where the entries die)
        # give the block's peak; the slices between repeat the first.
        for k in sorted({0, chain.slices - 1}):
            for member, size, inputs, views_member in block:
                reads = [(a, k) if inside else a for a, inside in inputs]
                items.append(_Item((member, k), size, reads, (member.args[0], k) if views_member else None))
            for exit_node in chain.exits:
                items.append(_Item(("copy", exit_node, k), 0, [(exit_node, k), exit_node]))
        done.update(chain.nodes)
        # The ops that waited for this block's exits, in graph order: one pass suffices, since a
        # deferred op reads only ops before it in the graph.
        waiting, deferred = deferred, []
        for node in waiting:
            if ready(node):
                place(node)
            else:
                deferred.append(node)
    for node in deferred:
        place(node)
    return items


def _estimate(graph: torch.fx.Graph, chains: Sequence[Chain]) -> tuple[int, int, list[_Item]]:
    items = _schedule(graph, chains)
    peak, at = _simulate_peak(items)
    return peak, at, items


def _estimate_cut(graph: torch.fx.Graph, chains: Sequence[Chain]) -> tuple[int, int, list[_Item]]:
    """:func:`_estimate` with every chain cut ``DEFAULT_SLICES`` times (as far as it can be), for
    the searches that run before the slice counts are chosen; the counts are left at 1."""
    for chain in chains:
        chain.slices = min(DEFAULT_SLICES, chain.most_slices())
    try:
        return _estimate(graph, chains)
    finally:
        for chain in chains:
            chain.slices = 1


def choose_slices(graph: torch.fx.Graph, chains: list[Chain], config: OpGroupingConfig) -> tuple[int, int]:
    """Set each chain's slice count; returns the estimated peak before and after.

    Greedy on the simulated schedule: while the peak is above the budget (or, without one, as
    long as it lies in a chain), the chain holding the peak gets one more slice, up to
    ``max_slices`` (``MAX_SLICES`` with a budget, ``DEFAULT_SLICES`` without).

    Without a budget, every chain at the peak then gets the full count, and so does every other
    chain unless that raises the estimate: the estimate misses some of Inductor's choices (which
    sums it stores, which buffers its fusions keep alive), so a chain it ranks below the peak
    may hold the real one (measured on the video UNet: 4.98 MB cutting only the chains on the
    estimated peak, 3.93 MB cutting all). Two kinds stay whole off the peak: chains that cut
    convolutions over their output channels (each slice reads the whole input again, with
    narrower GEMMs: on the video UNet, 93 convolution calls instead of 33, for the same measured
    peak, 3.76 MB), and, with ``spatial``, every chain of the first round: what the row bands of
    the second round cut (convolutions, and the pointwise ops between them) is cut there, inside
    fewer, larger first-round slices (a decoder's bands of 4 rows instead of 2).
    """
    budget = config.budget_bytes()
    cap = config.max_slices or (MAX_SLICES if budget is not None else DEFAULT_SLICES)
    for chain in chains:
        chain.slices = 1
    before, at, items = _estimate(graph, chains)
    peak = before
    while budget is None or peak > budget:
        key = items[at].key
        node = key[0] if isinstance(key, tuple) else key
        chain = next((c for c in chains if node in c.nodes), None)
        if chain is None or chain.slices >= min(cap, chain.most_slices()):
            break
        chain.slices += 1
        new_peak, new_at, new_items = _estimate(graph, chains)
        if new_peak > peak:
            chain.slices -= 1  # uneven slices: one more made the largest slice no smaller
            break
        peak, at, items = new_peak, new_at, new_items
    if budget is None:
        for chain in chains:
            if chain.slices > 1:
                chain.slices = min(cap, chain.most_slices())
        peak = _estimate(graph, chains)[0]
        # Every other chain is cut unless that raises the estimate. Bands of image rows cost only
        # their halo, and the estimate cannot tell which of several near-equal peaks Inductor's
        # fusion and layout copies make the real one.
        for chain in chains:
            if chain.slices > 1 or (config.spatial and not chain.spatial) or any(
                    n.target is aten.convolution.default and chain.nodes[n].dim == 1 for n in chain.nodes):
                continue
            chain.slices = min(cap, chain.most_slices())
            cut = _estimate(graph, chains)[0]
            if cut > peak:
                chain.slices = 1
            else:
                peak = cut
    return before, peak


# ---------------------------------------------------------------------------------------------
# rewrite


def _bounds(units: int, slices: int) -> list[tuple[int, int]]:
    step = math.ceil(units / slices)
    return [(start, min(start + step, units)) for start in range(0, units, step)]


def rewrite(graph: torch.fx.Graph, chain: Chain) -> None:
    members = list(chain.nodes)
    emit = _Emitter(graph, members[-1])
    per_slice: dict[torch.fx.Node, list[torch.fx.Node]] = {n: [] for n in members}

    entry_cache: dict[tuple[torch.fx.Node, Slicing, int], torch.fx.Node] = {}

    def entry(arg: torch.fx.Node, sliced: Slicing, k: int, start: int, stop: int) -> torch.fx.Node:
        key = (arg, sliced, k)
        if key not in entry_cache:
            entry_cache[key] = _part(emit, arg, sliced, chain.units, start, stop)
        return entry_cache[key]

    buffers = _exit_buffers(chain, emit)
    serial = next(_CHAIN_SERIALS)

    for k, (start, stop) in enumerate(_bounds(chain.units, chain.slices)):
        emit.slice_tag = (serial, k)
        for node in members:
            needs = _input_slicings(node, chain.nodes[node], chain.units)
            occurrence = iter(zip(_occurrences(node), needs))

            def replace(arg: torch.fx.Node) -> torch.fx.Node:
                original, need = next(occurrence)
                if original in chain.nodes:
                    return per_slice[original][k]
                if need is WHOLE:
                    return original
                return entry(original, need, k, start, stop)

            args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), replace)
            args = _resize_args(node, args, chain.nodes[node], stop - start)
            per_slice[node].append(emit(node.target, args, kwargs, like=node))
        for exit_node, buffer in buffers.items():
            _store_slice(chain, exit_node, buffer, per_slice[exit_node][k], start, stop, emit)
    emit.slice_tag = None

    _replace_exits(graph, chain, buffers, emit)


def _part(emit: Callable[..., torch.fx.Node], value: torch.fx.Node, sliced: Slicing, units: int,
          start: int, stop: int) -> torch.fx.Node:
    """The units ``[start, stop)`` of ``value`` (a view, or a reshaped copy for a factored dim)."""
    if (start, stop) == (0, units):
        return value
    shape, d = list(_shape(value)), sliced.dim
    if sliced.outer == 1 and sliced.inner == 1:
        return emit(aten.slice.Tensor, (value, d, start, stop))
    factored = emit(aten.reshape.default, (value, shape[:d] + [sliced.outer, units, sliced.inner] + shape[d + 1:]))
    part = emit(aten.slice.Tensor, (factored, d + 1, start, stop))
    return emit(aten.reshape.default, (part, shape[:d] + [sliced.outer * (stop - start) * sliced.inner] + shape[d + 1:]))


class _Emitter:
    """Adds calls before ``insert_before``, their fake values propagated. Each call made while
    ``slice_tag`` is set is tagged with it (``(chain serial, slice index)``): the Inductor
    fusion guard (:class:`_SlicesApart`) keeps kernels of different slices of a chain apart."""

    def __init__(self, graph: torch.fx.Graph, insert_before: torch.fx.Node):
        self.graph = graph
        self.insert_before = insert_before
        self.fake_mode = detect_fake_mode([n.meta.get("val") for n in graph.nodes if "val" in n.meta])
        self.slice_tag: tuple[int, int] | None = None

    def __call__(self, target: Any, args: tuple, kwargs: dict | None = None,
                 like: torch.fx.Node | None = None) -> torch.fx.Node:
        with self.graph.inserting_before(self.insert_before):
            node = self.graph.call_function(target, args, kwargs or {})
        fake_args, fake_kwargs = torch.fx.node.map_arg((args, kwargs or {}), lambda n: n.meta["val"])
        with self.fake_mode:
            node.meta["val"] = target(*fake_args, **fake_kwargs)
        if like is not None:
            for key in ("stack_trace", "nn_module_stack", "source_fn_stack", "original_aten"):
                if key in like.meta:
                    node.meta[key] = like.meta[key]
        if self.slice_tag is not None:
            node.meta[_SLICE_TAG] = self.slice_tag
        return node


def _buffer_strides(node: torch.fx.Node, channels_last: bool) -> list[int]:
    """Strides of a preallocated buffer holding ``node``'s value.

    A 4-d one is channels_last where Inductor lays convolutions out so (their inputs and
    outputs): a contiguous buffer read by a convolution would first be copied whole. (Inductor's
    lowering of ``empty`` ignores ``memory_format``: the strides are spelled out.)
    """
    shape = list(_shape(node))
    if any(u.target is aten.as_strided.default for u in node.users):
        # as_strided reads the storage as the graph laid it out (a group norm's statistics,
        # viewed [N, C] by its decomposition): channels_last scrambled it.
        return list(node.meta["val"].stride())
    if channels_last and len(shape) == 4:
        n, c, h, w = shape
        return [c * h * w, 1, w * c, c]
    return _contiguous_strides(shape)


def _exit_buffers(chain: Chain, emit: Callable[..., torch.fx.Node]) -> dict[torch.fx.Node, torch.fx.Node]:
    """One preallocated buffer per exit, in the factored shape ``(.., outer, units, inner, ..)``
    (the exit's own shape when the slices are ranges of a whole dim).

    Each slice of an exit is stored into it as soon as it is computed, the mutating form
    Inductor's own reinplacing gives a slice_scatter (copy_ into a slice view). A functional cat
    or slice_scatter chain after the loop would keep every slice's exit alive to the end:
    Inductor inlines it into one kernel that runs after all slices.
    """
    buffers = {}
    for exit_node in chain.exits:
        value, sliced = exit_node.meta["val"], chain.nodes[exit_node]
        shape, d = list(_shape(exit_node)), sliced.dim
        options = {"dtype": value.dtype, "device": value.device}
        if sliced.outer == sliced.inner == 1:
            # Slices are ranges of the dim itself: the buffer has the exit's shape.
            strides = _buffer_strides(exit_node, chain.channels_last)
            buffers[exit_node] = emit(aten.empty_strided.default, (shape, strides), options, like=exit_node)
        else:
            factored = shape[:d] + [sliced.outer, chain.units, sliced.inner] + shape[d + 1:]
            buffers[exit_node] = emit(aten.empty.memory_format, (factored,), options, like=exit_node)
    return buffers


def _dying_summands(entry: torch.fx.Node, order: dict[torch.fx.Node, int]) -> list[torch.fx.Node]:
    """The large stored tensors that a kernel reading ``entry`` reads when Inductor computes
    ``entry`` inside it (pointwise ops and views are not stored unless a reader forces it), and
    that nothing after ``entry`` reads otherwise: storing ``entry`` frees them."""
    threshold = _bytes(entry) // 2
    inlined, summands, stack = {entry}, [], [entry]
    while stack:
        for arg in _occurrences(stack.pop()):
            if arg in inlined or arg in summands or _bytes(arg) < threshold:
                continue
            if (arg.op == "call_function" and not arg.meta.get(_SLICED_EXIT)
                    and (_is_pointwise(arg) or arg.target in _ALIASES)):
                inlined.add(arg)
                stack.append(arg)
            else:
                summands.append(arg)
    return [s for s in summands if s.op == "call_function"
            and all(u in inlined or order[u] < order[entry] for u in s.users)]


def _store_summed_entries(graph: torch.fx.Graph, chain: Chain) -> None:
    """Store, before the chain, each entry Inductor would compute inside every slice's kernel
    from two or more large tensors that die once it is stored (a residual stream:
    ``x + attn1 + attn2``, a resnet's ``shortcut + conv2``).

    Inductor does not store a pointwise sum of stored tensors (it recomputes it in each reader),
    so every summand stays alive until the last slice has read its part: the measured peak of the
    video UNet had five such summands alive (1.3 MB) where their sums needed two. Stored, the
    summands die at the store, and every reader (in the chain or not) reads the sum.
    """
    entries = {arg for node in chain.nodes for arg in _occurrences(node) if arg not in chain.nodes}
    _store_sums(graph, entries, chain.channels_last)


def _store_sums(graph: torch.fx.Graph, candidates: set[torch.fx.Node], channels_last: bool) -> None:
    """Store each of ``candidates`` that is a pointwise sum of two or more large tensors dying
    with it (see :func:`_store_summed_entries`)."""
    order = {node: i for i, node in enumerate(graph.nodes)}
    # In graph order: an entry computed from another (a layout copy of a sum) then reads the
    # stored one, and is not stored itself.
    for entry in sorted(candidates, key=order.__getitem__):
        if not (entry.op == "call_function" and _is_pointwise(entry)
                and (entry.meta.get(_STORED_SUM) or len(_dying_summands(entry, order)) > 1)):
            continue
        value = entry.meta["val"]
        emit = _Emitter(graph, entry.next)
        buffer = emit(aten.empty_strided.default, (list(value.shape), _buffer_strides(entry, channels_last)),
                      {"dtype": value.dtype, "device": value.device}, like=entry)
        store = emit(aten.copy_.default, (buffer, entry))
        _read_from_buffer(entry, buffer, emit, keep=lambda user: user is store)
        order = {node: i for i, node in enumerate(graph.nodes)}


def _store_slice(chain: Chain, exit_node: torch.fx.Node, buffer: torch.fx.Node, part: torch.fx.Node,
                 start: int, stop: int, emit: Callable[..., torch.fx.Node]) -> None:
    sliced = chain.nodes[exit_node]
    shape, d = list(_shape(exit_node)), sliced.dim
    if len(_shape(buffer)) == len(shape):  # not factored (see _exit_buffers)
        emit(aten.copy_.default, (emit(aten.slice.Tensor, (buffer, d, start, stop)), part))
        return
    part = emit(aten.reshape.default, (part, shape[:d] + [sliced.outer, stop - start, sliced.inner] + shape[d + 1:]))
    emit(aten.copy_.default, (emit(aten.slice.Tensor, (buffer, d + 1, start, stop)), part))


def _read_from_buffer(node: torch.fx.Node, buffer: torch.fx.Node, emit: Callable[..., torch.fx.Node],
                      keep: Callable[[torch.fx.Node], bool]) -> None:
    """Every user of ``node`` but those ``keep`` names reads the full-size view of ``buffer``
    (preallocated, filled by ``copy_``) instead. The view is marked so that :func:`_users` and
    :func:`_inputs` see the hidden edges from the copies to it."""
    whole = emit(aten.reshape.default, (buffer, list(_shape(node))))
    whole.meta[_SLICED_EXIT] = True
    node.replace_all_uses_with(whole, delete_user_cb=lambda user: not keep(user))


def _replace_exits(graph: torch.fx.Graph, chain: Chain, buffers: dict[torch.fx.Node, torch.fx.Node],
                   emit: Callable[..., torch.fx.Node]) -> None:
    for exit_node, buffer in buffers.items():
        _read_from_buffer(exit_node, buffer, emit, keep=lambda user: user in chain.nodes)
    for node in reversed(list(chain.nodes)):
        graph.erase_node(node)


def _resize_args(node: torch.fx.Node, args: tuple, sliced: Slicing, length: int) -> tuple:
    """Shape arguments (reshape's size, expand's size, as_strided's size and stride) of a slice."""
    if node.target not in _VIEWS and node.target is not aten.expand.default:
        return args
    shape = list(_shape(node))
    shape[sliced.dim] = sliced.outer * length * sliced.inner
    if node.target is aten.as_strided.default:
        return (args[0], shape, _contiguous_strides(shape), *args[3:])
    return (args[0], shape, *args[2:])


# ---------------------------------------------------------------------------------------------
# Inductor's fusion of the slices


def _slice_tags(node: Any) -> dict[int, set[int]]:
    """For a scheduler node (possibly fused): chain serial -> the slices its kernels compute."""
    tags: dict[int, set[int]] = {}
    for part in node.get_nodes():
        for origin in getattr(getattr(part, "node", None), "origins", None) or ():
            tag = origin.meta.get(_SLICE_TAG)
            if tag is not None:
                tags.setdefault(tag[0], set()).add(tag[1])
    return tags


class _SlicesApart:
    """Inductor's fusion heuristics (``V.choices``), except that kernels computing different
    slices of one chain are never fused.

    The slices of a chain are independent and often read the same small tensors (a norm's
    statistics, a weight), so Inductor's horizontal fusion would compute the input band of many
    slices in one kernel; and the stores of all slices into an exit buffer would fuse with the
    kernel reading that buffer (a norm's statistics), keeping every slice's result alive until
    then. Either keeps all slices alive at once: the peak slicing was meant to cut. Everything
    else is delegated to the handler that was in place.
    """

    def __init__(self, inner: Any):
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def can_fuse(self, scheduler: Any, node1: Any, node2: Any, shared_data_score: int) -> bool:
        tags1, tags2 = _slice_tags(node1), _slice_tags(node2)
        if any(serial in tags2 and tags2[serial] != slices for serial, slices in tags1.items()):
            return False
        return self._inner.can_fuse(scheduler, node1, node2, shared_data_score)


def _keep_slices_apart() -> None:
    """Install :class:`_SlicesApart` for the Inductor compile of this graph (the backend puts
    the previous handler back when that compile ends: ``zc.codegen.inductor``)."""
    from torch._inductor.virtualized import V

    if not isinstance(V.choices, _SlicesApart):
        V.set_choices_handler(_SlicesApart(V.choices))


def _keep_slice_order() -> None:
    """Turn Inductor's reordering for peak memory off for the compile of this graph (the
    backend restores the flag when that compile ends: ``zc.codegen.inductor``).

    Its estimate of a reordered schedule misjudges the stores into exit buffers: on a VAE
    decoder it took a depth-first order for 0.5% less than the graph's own (estimated), which
    ran every band's convolution before any store and measured 20% more (43.4 vs 35.8 MB). The
    rewrite already orders the graph slice after slice.
    """
    from torch._inductor import config as inductor_config

    inductor_config.reorder_for_peak_memory = False


def _channels_last_convolutions(gm: torch.fx.GraphModule, stage: str) -> bool:
    """Whether Inductor will lay out this graph's convolutions' inputs and outputs channels_last."""
    from torch._inductor.graph import GraphLowering

    try:
        return bool(GraphLowering.decide_layout_opt(gm, is_inference=stage == "inference"))
    except Exception:  # noqa: BLE001 - a heuristic of Inductor's; contiguous buffers are always correct
        return False


# ---------------------------------------------------------------------------------------------
# entry point


def apply(gm: torch.fx.GraphModule, ctx: PassContext) -> PassReport:
    config: OpGroupingConfig = ctx.config.op_grouping
    report = PassReport("op_grouping")
    graph = gm.graph
    budget = config.budget_bytes()
    # Two rounds: chains along an independent dim (tokens, batch, frames), then chains over the
    # image rows of what is left, inside the slices of the first round (a decoder sliced over
    # its batch, each image then in bands of rows).
    described: list[dict[str, Any]] = []
    before = after = None
    for round_finder, round_rewrite in ((find_chains, rewrite), (find_row_chains, rewrite_rows)):
        if round_finder is find_row_chains and not config.spatial:
            continue
        chains = round_finder(graph, report)
        if not chains:
            continue
        channels_last = _channels_last_convolutions(gm, ctx.stage)
        for chain in chains:
            chain.channels_last = channels_last
        round_before, after = choose_slices(graph, chains, config)
        before = round_before if before is None else before
        described += _rewrite_chains(graph, chains, round_rewrite, report, budget)
        stable_topological_sort(graph)
        graph.eliminate_dead_code()
    if before is None:
        report.status = "skipped"
        report.skipped("graph", "no chain of ops whose intermediates dominate memory can be sliced"
                       + (f" ({len(report.skips)} large activations examined)" if report.skips else ""))
        return report
    report.metrics["estimated_peak_bytes_before"] = before
    report.metrics["estimated_peak_bytes_after"] = after
    if budget is not None:
        report.metrics["memory_budget_bytes"] = budget
        if after > budget:
            warnings.warn(
                f"zc: op_grouping cannot bring {ctx.graph_id} under the memory budget of "
                f"{_human(budget)}: the smallest estimated peak it reaches is {_human(after)} "
                f"(unsliced: {_human(before)}); compiling with that.",
                ZcWarning,
                stacklevel=2,
            )
            report.metrics["budget_reached"] = False
        else:
            report.metrics["budget_reached"] = True
    report.metrics["chains"] = described
    if not described:
        report.status = "unchanged"
        return report
    # The sums read by several ops outside the chains too (a resnet's output, read by the norm
    # and the residual add of the motion module after it, each of them computing it again).
    _store_sums(graph, {n for n in graph.nodes if len(n.users) > 1}, _channels_last_convolutions(gm, ctx.stage))
    _keep_slices_apart()
    _keep_slice_order()
    log.info("op_grouping %s: %d chains sliced, estimated peak %s -> %s", ctx.graph_id, len(described),
             _human(before), _human(after))
    return report


def _rewrite_chains(graph: torch.fx.Graph, chains: list[Chain], rewrite_one: Callable[[torch.fx.Graph, Chain], None],
                    report: PassReport, budget: int | None) -> list[dict[str, Any]]:
    described = []
    for chain in chains:
        if chain.slices < 2:
            report.skipped(chain.seed.name, f"{chain.describe()}: left whole, it does not hold the "
                           "estimated peak" + (" within the budget" if budget is not None else ""))
            continue
        entry = {
            "seed": chain.seed.name,
            "ops": [n.name for n in chain.nodes],
            "dim": chain.nodes[chain.seed].dim,
            "units": chain.units,
            "slices": chain.slices,
            "exits": [n.name for n in chain.exits],
            "kind": "image rows with halo" if chain.spatial else "independent dim" + (", cut at a conflict" if chain.needs else ""),
        }
        internal, boundary = _chain_gain(chain)
        entry["estimated_intermediates_bytes_before"] = internal
        entry["estimated_intermediates_bytes_after"] = internal * math.ceil(chain.units / chain.slices) // chain.units
        described.append(entry)
        report.rewrote(chain.seed.name, f"{chain.describe()} -> {chain.slices} slices")
        _store_summed_entries(graph, chain)
        (rewrite_rows if chain.needs is not None else rewrite_one)(graph, chain)
    return described


def _human(n: int) -> str:
    for unit, size in (("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"
