"""window_attention: dense attention under a sliding-window mask -> banded FlexAttention.

Exact mode. ``transformers`` builds a sliding-window mask from index arithmetic: aranges for the
batch, query and key positions, broadcast against each other, compared (``kv > q - window``,
``kv <= q``) and AND-ed with a padding mask read at ``[batch, kv]``. The pass re-evaluates that
subgraph element by element: every tensor of it is described by a function of its own
coordinates (an arange's element ``i`` is ``start + i * step``, broadcasting and indexing remap
coordinates, pointwise ops apply to the elements). A tensor the pass does not model (a padding
mask, a cumsum over positions) becomes a *leaf* that the element function reads at the computed
coordinates, exactly as the dense code would. The mask's value at ``(b, h, q, kv)`` is then a
conjunction of terms; this conjunction is FlexAttention's ``mask_mod`` (so the output equals the
dense masked attention), and the terms that read no leaf, i.e. depend only on indices and
sizes, form the *structure*: every pair the mask admits, the structure admits too. The block
mask comes from the structure alone, so it depends only on the input shapes: an executor builds
it once per shape (a band of query rows at a time) and passes its tensors to the compiled graph, whose
FlexAttention call Inductor compiles to its flex template (C++ on CPU, Triton on GPU). Blocks
the structure fills entirely are marked full (no mask evaluated) only when the mask has no leaf
terms; otherwise every computed block applies the whole mask.

Attention written out as matmul -> (scale) -> (tanh / x op number: logit softcapping, flex's
score_mod) -> + where(mask, 0, -big) -> softmax -> matmul (transformers' eager implementation)
is read as SDPA with that boolean mask; it differs only in rows where every key is masked (eager
averages all values, flex returns zeros).

A mask whose structure admits every block at the compiled shape (window >= sequence length)
keeps the dense SDPA call, exactly; so does a mask with no index-only term (a dense mask passed
in as an input), reported with the node it depends on.

Approximate mode (``window`` set) keeps each attention call's own mask (causal, padding) and
adds a window, per layer and optionally per head group, with ``sink`` leading keys always
visible. Queries are the last ``Q`` of the ``KV`` positions (a KV cache's decode alignment).
"""

from __future__ import annotations

import collections
import contextlib
import copy
import dataclasses
import logging
import math
import operator
from collections.abc import Callable, Sequence
from typing import Any

import sympy
import torch
import torch.fx
import torch.nn.functional as F
from torch._subclasses.fake_tensor import unset_fake_temporarily
from torch.nn.attention.flex_attention import (
    _DEFAULT_SPARSE_BLOCK_SIZE,
    _apply_kernel_options,
    _convert_mask_to_block_mask,
    _create_sparse_block_from_block_mask,
    create_mask,
)

from zc.config import WindowAttentionConfig
from zc.fx_passes.pass_manager import PassReport
from zc.runtime.executor import Executor

log = logging.getLogger("zc")

# Runs on Dynamo's graph (see zc.dynamo_backend.backend): the block masks are built per input
# shape by an executor, outside the compiled graph.
GRAPH_LEVEL = "dynamo"

SDPA_TARGETS = (torch._C._nn.scaled_dot_product_attention, F.scaled_dot_product_attention)
# Inductor's C++ flex template ran a 256-token window ~10% faster with 64-token blocks than
# with 128 (benchmarks/window_attention.py); smaller blocks waste less of the band's edges.
CPU_BLOCK_SIZE = 64
# Booleans of the structure evaluated at once when a block mask is built (16 MiB).
MASK_ELEMENTS_PER_CHUNK = 1 << 24
# Block masks kept per executor (one per distinct input shape).
MAX_CACHED_SHAPES = 64

_BINARY = {
    operator.add: operator.add, torch.add: operator.add, "add": operator.add, "__add__": operator.add,
    operator.sub: operator.sub, torch.sub: operator.sub, "sub": operator.sub, "__sub__": operator.sub,
    operator.mul: operator.mul, torch.mul: operator.mul, "mul": operator.mul,
    operator.floordiv: operator.floordiv, operator.mod: operator.mod,
    operator.gt: operator.gt, torch.gt: operator.gt, "gt": operator.gt,
    operator.ge: operator.ge, torch.ge: operator.ge, "ge": operator.ge,
    operator.lt: operator.lt, torch.lt: operator.lt, "lt": operator.lt,
    operator.le: operator.le, torch.le: operator.le, "le": operator.le,
    operator.eq: operator.eq, torch.eq: operator.eq, "eq": operator.eq,
    operator.ne: operator.ne, torch.ne: operator.ne, "ne": operator.ne,
    operator.and_: operator.and_, torch.logical_and: operator.and_, torch.bitwise_and: operator.and_,
    "logical_and": operator.and_, "bitwise_and": operator.and_, "__and__": operator.and_,
    operator.or_: operator.or_, torch.logical_or: operator.or_, torch.bitwise_or: operator.or_,
    "logical_or": operator.or_, "bitwise_or": operator.or_, "__or__": operator.or_,
    operator.xor: operator.xor,
}
_UNARY = {
    operator.invert: operator.invert, torch.logical_not: operator.invert, "logical_not": operator.invert,
    operator.neg: operator.neg, torch.neg: operator.neg, "neg": operator.neg,
    operator.abs: torch.abs, abs: torch.abs, torch.abs: torch.abs, "abs": torch.abs,
}
# Casts that keep every value a mask's index arithmetic produces (positions fit in int32).
_VALUE_CASTS = {"to", "bool", "long", "int", "contiguous", "clone"}


class Unprovable(Exception):
    """The mask cannot be re-evaluated per element; the message says at which node and why."""


@dataclasses.dataclass(frozen=True)
class Term:
    """One factor of a conjunction: ``fn(coords, env)`` is the element at ``coords``.

    ``leaves`` are the graph nodes ``fn`` reads through ``env`` (tensors the pass does not model,
    and symbolic sizes); ``pure`` is true when none of them is a tensor, i.e. the term depends on
    indices and sizes only.
    """

    fn: Callable[[tuple, dict], Any]
    leaves: tuple[torch.fx.Node, ...] = ()
    pure: bool = True
    constant: Any = None  # set when the term is this Python constant everywhere


@dataclasses.dataclass(frozen=True)
class Elem:
    """A tensor of the mask subgraph known element by element: the AND of ``terms`` (one term
    for a tensor that is not a conjunction)."""

    shape: tuple
    terms: tuple[Term, ...]
    is_bool: bool

    def value_term(self) -> Term:
        """The element as one term (the conjunction folded)."""
        if len(self.terms) == 1:
            return self.terms[0]
        terms = self.terms

        def fn(c, env):
            out = terms[0].fn(c, env)
            for t in terms[1:]:
                out = out & t.fn(c, env)
            return out

        return Term(fn, _merge_leaves(terms), all(t.pure for t in terms))


def _merge_leaves(terms) -> tuple[torch.fx.Node, ...]:
    return tuple(dict.fromkeys(leaf for t in terms for leaf in t.leaves))


def _is_int(value: Any, constant: int) -> bool:
    return type(value) is int and value == constant


def _apply(op: Callable, *values: Any) -> Any:
    """``op(*values)`` without the identities index arithmetic is full of (``x + 0``, ``x * 1``),
    so the mask_mod Inductor compiles into every partial block stays short."""
    if len(values) == 2:
        a, b = values
        if op is operator.add and _is_int(a, 0) or op is operator.mul and _is_int(a, 1):
            return b
        if op in (operator.add, operator.sub) and _is_int(b, 0) or op is operator.mul and _is_int(b, 1):
            return a
    return op(*values)


def _example(node: Any) -> Any:
    if isinstance(node, _SizeLeaf):
        return node.value
    if isinstance(node, torch.fx.Node):
        return node.meta.get("example_value", node.meta.get("val"))
    return node


def _is_one(size: Any) -> bool:
    return isinstance(size, int) and size == 1


def _broadcast_map(in_shape: tuple, out_rank: int) -> Callable[[tuple], tuple]:
    """Output coordinates -> coordinates of an operand of ``in_shape`` broadcast to the output."""
    offset = out_rank - len(in_shape)
    ones = [_is_one(s) for s in in_shape]
    return lambda c: tuple(0 if one else c[offset + i] for i, one in enumerate(ones))


def _remap(elem: Elem, shape: tuple, coord_map: Callable[[tuple], tuple]) -> Elem:
    def moved(t: Term) -> Term:
        if t.constant is not None:
            return t
        return Term(lambda c, env, f=t.fn: f(coord_map(c), env), t.leaves, t.pure)

    return Elem(shape, tuple(moved(t) for t in elem.terms), elem.is_bool)


def _constant_elem(value: Any, shape: tuple = ()) -> Elem:
    return Elem(shape, (Term(lambda c, env: value, constant=value),), isinstance(value, bool))


class MaskAnalysis:
    """Describes every node of a mask's subgraph as an :class:`Elem` (memoised per graph)."""

    def __init__(self) -> None:
        self._elems: dict[torch.fx.Node, Elem] = {}

    def elem(self, node: Any) -> Elem:
        if not isinstance(node, torch.fx.Node):
            if isinstance(node, (bool, int, float)):
                return _constant_elem(node)
            raise Unprovable(f"argument {node!r} is not a number or a graph value")
        if node not in self._elems:
            self._elems[node] = self._describe(node)
        return self._elems[node]

    def _describe(self, node: torch.fx.Node) -> Elem:
        value = _example(node)
        if isinstance(value, (torch.SymInt, torch.SymBool)):
            return Elem((), (Term(lambda c, env: env[node], (node,), pure=True),), isinstance(value, torch.SymBool))
        if isinstance(value, (bool, int)):
            return _constant_elem(value)
        if not isinstance(value, torch.Tensor):
            raise Unprovable(f"{node.name} ({node.target}) is not a tensor or a size")
        described = self._describe_op(node, value) if node.op in ("call_function", "call_method") else None
        return described if described is not None else self._leaf(node, value)

    def _leaf(self, node: torch.fx.Node, value: torch.Tensor) -> Elem:
        if value.dim() == 0:
            fn = lambda c, env: env[node]  # noqa: E731
        else:
            fn = lambda c, env: env[node][tuple(c)]  # noqa: E731
        return Elem(tuple(value.shape), (Term(fn, (node,), pure=False),), value.dtype == torch.bool)

    def _describe_op(self, node: torch.fx.Node, value: torch.Tensor) -> Elem | None:
        target = node.target
        args, kwargs = node.args, node.kwargs
        shape = tuple(value.shape)
        is_bool = value.dtype == torch.bool
        if target is torch.arange:
            return self._arange(node, shape)
        if target in _BINARY and len(args) == 2 and not kwargs.get("out"):
            return self._binary(_BINARY[target], args[0], args[1], shape, is_bool)
        if target in _UNARY and len(args) == 1:
            return self._pointwise(lambda a: _UNARY[target](a), [args[0]], shape, is_bool)
        if target is torch.where and len(args) == 3:
            return self._pointwise(torch.where, list(args), shape, is_bool)
        if node.op == "call_method" and target in _VALUE_CASTS:
            return self._cast(node, value)
        if node.op == "call_method" and target in ("expand", "expand_as", "unsqueeze", "view_as"):
            source = args[0]
            if target == "unsqueeze":
                dim = args[1] if len(args) > 1 else kwargs["dim"]
                return self._unsqueeze(source, dim, shape)
            if target == "view_as" and tuple(_example(source).shape) != shape:
                return None
            return _remap(self.elem(source), shape, _broadcast_map(tuple(_example(source).shape), len(shape)))
        if node.op == "call_method" and target in ("new_ones", "new_zeros") and shape == ():
            return _constant_elem(target == "new_ones" if is_bool else int(target == "new_ones"))
        if target is operator.getitem:
            return self._getitem(args[0], args[1], shape)
        return None

    def _arange(self, node: torch.fx.Node, shape: tuple) -> Elem | None:
        positional = [a for a in node.args]
        if node.kwargs.get("dtype") not in (None, torch.int64, torch.int32) or len(positional) > 3:
            return None
        start, step = (0, 1) if len(positional) <= 1 else (positional[0], positional[2] if len(positional) == 3 else 1)
        parts = [self.elem(start), self.elem(step)]
        if any(len(p.terms) != 1 or p.shape != () for p in parts):
            return None
        s, t = parts[0].terms[0], parts[1].terms[0]
        def fn(c, env):
            return _apply(operator.add, s.fn((), env), _apply(operator.mul, c[0], t.fn((), env)))

        return Elem(shape, (Term(fn, _merge_leaves((s, t)), True),), False)

    def _binary(self, op, a, b, shape, is_bool) -> Elem:
        if op is operator.and_ and is_bool:
            terms = []
            for operand in (a, b):
                e = self.elem(operand)
                if not e.is_bool:
                    return self._pointwise(op, [a, b], shape, is_bool)
                moved = _remap(e, shape, _broadcast_map(e.shape, len(shape)))
                terms.extend(t for t in moved.terms if t.constant is not True)
            return Elem(shape, tuple(terms) or (Term(lambda c, env: True, constant=True),), True)
        return self._pointwise(op, [a, b], shape, is_bool)

    def _pointwise(self, op, operands, shape, is_bool) -> Elem:
        parts = []
        for operand in operands:
            e = self.elem(operand)
            term = e.value_term()
            coord_map = _broadcast_map(e.shape, len(shape))
            parts.append((term, coord_map))

        def fn(c, env):
            return _apply(op, *(t.fn(m(c), env) for t, m in parts))

        terms = [t for t, _ in parts]
        return Elem(shape, (Term(fn, _merge_leaves(terms), all(t.pure for t in terms)),), is_bool)

    def _cast(self, node: torch.fx.Node, value: torch.Tensor) -> Elem | None:
        source = node.args[0]
        before = _example(source)
        if not isinstance(before, torch.Tensor) or tuple(before.shape) != tuple(value.shape):
            return None
        kinds = {torch.bool: "bool"}
        kind = lambda dt: kinds.get(dt, "int" if not dt.is_floating_point and not dt.is_complex else "float")  # noqa: E731
        if kind(before.dtype) == "int" and kind(value.dtype) == "bool":
            # Reading the integer tensor itself matters for a padding mask: Inductor's C++ flex
            # template finds no kernel when a mask_mod buffer is an unmaterialised pointwise
            # result such as this cast; a graph input (or a reduction's output) is materialised.
            return self._pointwise(lambda a: a != 0, [source], tuple(value.shape), True)
        if kind(before.dtype) != kind(value.dtype) or kind(value.dtype) == "float":
            return None  # another cast that changes values (bool -> int, int -> float) is not modelled
        return self.elem(source)

    def _unsqueeze(self, source, dim: int, shape: tuple) -> Elem:
        rank = len(shape)
        dim = dim % rank
        return _remap(self.elem(source), shape, lambda c: c[:dim] + c[dim + 1:])

    def _getitem(self, source, index, shape) -> Elem | None:
        src_value = _example(source)
        if not isinstance(src_value, torch.Tensor):
            return None
        index = index if isinstance(index, tuple) else (index,)
        if any(isinstance(i, torch.fx.Node) for i in index):
            return self._advanced_index(source, index, shape)
        return self._basic_index(source, index, shape)

    def _basic_index(self, source, index, shape) -> Elem | None:
        src_rank = _example(source).dim()
        explicit = sum(1 for i in index if i is not None and i is not Ellipsis)
        expanded = []
        for i in index:
            if i is Ellipsis:
                expanded.extend([slice(None)] * (src_rank - explicit))
            else:
                expanded.append(i)
        expanded.extend([slice(None)] * (src_rank - sum(1 for i in expanded if i is not None)))
        # Per source dim: ("out", output dim, start, step) or ("fixed", index).
        plan, out_dim = [], 0
        for i in expanded:
            if i is None:
                out_dim += 1
            elif isinstance(i, int) and not isinstance(i, bool):
                if i < 0:
                    return None
                plan.append(("fixed", i))
            elif isinstance(i, slice):
                start, step = i.start or 0, i.step or 1
                if not isinstance(start, int) or not isinstance(step, int) or start < 0 or step < 1:
                    return None
                plan.append(("out", out_dim, start, step))
                out_dim += 1
            else:
                return None
        if out_dim != len(shape):
            return None

        def coord_map(c):
            return tuple(p[1] if p[0] == "fixed" else _apply(operator.add, p[2], _apply(operator.mul, c[p[1]], p[3]))
                         for p in plan)

        return _remap(self.elem(source), shape, coord_map)

    def _advanced_index(self, source, index, shape) -> Elem | None:
        src = _example(source)
        if len(index) != src.dim() or not all(isinstance(i, torch.fx.Node) for i in index):
            return None  # only data[i0, i1, ...] with one index tensor per dim
        if any(_example(i).dtype not in (torch.int64, torch.int32) for i in index):
            return None  # boolean mask indexing selects, it does not map coordinates
        indices = [(self.elem(i).value_term(), _broadcast_map(tuple(_example(i).shape), len(shape))) for i in index]
        src_elem = self.elem(source)

        def moved(t: Term) -> Term:
            if t.constant is not None:
                return t

            def fn(c, env, f=t.fn):
                return f(tuple(it.fn(m(c), env) for it, m in indices), env)

            parts = [t] + [it for it, _ in indices]
            return Term(fn, _merge_leaves(parts), all(p.pure for p in parts))

        return Elem(shape, tuple(moved(t) for t in src_elem.terms), src_elem.is_bool)


# --------------------------------------------------------------------------------------------
# Mask functions as FX graphs


def trace_mask(terms: Sequence[Term], leaves: Sequence[torch.fx.Node], frame: tuple) -> torch.fx.GraphModule:
    """``mask_mod(b, h, q_idx, kv_idx, *leaves)``: the AND of ``terms`` at the mask element
    that attention position (b, h, q, kv) reads; ``frame`` maps (b, h, q, kv) to the mask's
    coordinates (broadcast dims read index 0)."""
    graph = torch.fx.Graph()
    tracer = torch.fx.proxy.GraphAppendingTracer(graph)
    coords = tuple(torch.fx.Proxy(graph.placeholder(name), tracer) for name in ("b", "h", "q_idx", "kv_idx"))
    env = {leaf: torch.fx.Proxy(graph.placeholder(f"leaf_{i}_{leaf.name}"), tracer) for i, leaf in enumerate(leaves)}
    mask_coords = frame(coords)
    out = None
    for t in terms:
        value = t.fn(mask_coords, env)
        out = value if out is None else out & value
    if not isinstance(out, torch.fx.Proxy):  # a constant: make it a boolean tensor of the graph
        out = coords[2] >= 0 if out else coords[2] < 0
    graph.output(out.node)
    return torch.fx.GraphModule(torch.nn.Module(), graph)


# --------------------------------------------------------------------------------------------
# Sizes known at run time


class SizeBinder:
    """Evaluates symbolic sizes from Dynamo's positional arguments."""

    def __init__(self, gm: torch.fx.GraphModule):
        self.where: dict[sympy.Symbol, tuple[int, int | None]] = {}
        for position, node in enumerate(gm.graph.find_nodes(op="placeholder")):
            value = _example(node)
            if isinstance(value, torch.SymInt) and isinstance(value.node.expr, sympy.Symbol):
                self.where.setdefault(value.node.expr, (position, None))
            elif isinstance(value, torch.Tensor):
                for dim, size in enumerate(value.shape):
                    if isinstance(size, torch.SymInt) and isinstance(size.node.expr, sympy.Symbol):
                        self.where.setdefault(size.node.expr, (position, dim))

    def symbols(self, values: Sequence[Any]) -> list[sympy.Symbol]:
        needed = set()
        for v in values:
            expr = _size_expr(v)
            if isinstance(expr, sympy.Expr):
                needed |= expr.free_symbols
        missing = needed - set(self.where)
        if missing:
            raise Unprovable(f"sizes {sorted(map(str, missing))} are not sizes of the graph's inputs")
        return sorted(needed, key=str)

    def reader(self, symbols: Sequence[sympy.Symbol]) -> Callable[[Sequence[Any]], tuple[int, ...]]:
        spots = [self.where[s] for s in symbols]
        return lambda args: tuple(int(args[p]) if d is None else args[p].shape[d] for p, d in spots)


def _size_expr(value: Any) -> Any:
    return value.node.expr if isinstance(value, torch.SymInt) else value


def _evaluate(expr: Any, bindings: dict) -> int:
    return int(expr.xreplace(bindings)) if isinstance(expr, sympy.Expr) else int(expr)


# --------------------------------------------------------------------------------------------
# Plans


@dataclasses.dataclass
class BlockSpec:
    """One block mask: the structure's mask_mod over (B, H, Q, KV) sizes, built per shape."""

    structure: torch.fx.GraphModule
    size_leaves: list[torch.fx.Node]  # SymInt leaves of ``structure``, after (b, h, q, kv)
    sizes: tuple  # (B, H, Q, KV) as ints / sympy expressions (B or H is 1 when unused)
    full_blocks: bool  # the mask is the structure: blocks it fills need no mask evaluation
    fake_sizes: tuple  # the same sizes as the graph's ints / SymInts
    device: torch.device
    block_size: int

    def build(self, bindings: dict) -> list[torch.Tensor]:
        scalars = [_evaluate(_size_expr(_example(n)), bindings) for n in self.size_leaves]
        b, h, q, kv = (_evaluate(s, bindings) for s in self.sizes)
        structure = self.structure

        # The structure is evaluated densely, a band of query rows at a time, so the memory
        # stays ~MASK_ELEMENTS_PER_CHUNK booleans whatever the sequence length.
        rows = max(1, MASK_ELEMENTS_PER_CHUNK // max(b * h * kv, 1) // self.block_size) * self.block_size
        partial, full = [], []
        for start in range(0, q, rows):
            def rows_mod(b_, h_, q_, kv_, start=start):
                return structure(b_, h_, q_ + start, kv_, *scalars)

            dense = create_mask(rows_mod, b, h, min(rows, q - start), kv, self.device)
            blocks = _convert_mask_to_block_mask(dense, self.block_size, self.block_size, self.full_blocks)
            partial.append(blocks[0])
            full.append(blocks[1])
        mask = _create_sparse_block_from_block_mask(
            (torch.cat(partial, 2), torch.cat(full, 2) if self.full_blocks else None),
            None, (q, kv), self.block_size, self.block_size,
        )
        tensors = [mask.kv_num_blocks, mask.kv_indices]
        if self.full_blocks:
            tensors += [mask.full_kv_num_blocks, mask.full_kv_indices]
        tensors += [mask.q_num_blocks, mask.q_indices]
        if self.full_blocks:
            tensors += [mask.full_q_num_blocks, mask.full_q_indices]
        return [t.contiguous() for t in tensors]

    def fake_inputs(self, fake_mode) -> list[torch.Tensor]:
        b, h, q, kv = self.fake_sizes
        nq = (q + self.block_size - 1) // self.block_size
        nkv = (kv + self.block_size - 1) // self.block_size
        shapes = [(b, h, nq), (b, h, nq, nkv)]
        if self.full_blocks:
            shapes *= 2
        transposed = [(b, h, nkv), (b, h, nkv, nq)]
        if self.full_blocks:
            transposed *= 2
        with fake_mode or contextlib.nullcontext():  # no fake mode: a graph run outside Dynamo
            return [torch.empty(s, dtype=torch.int32, device=self.device) for s in shapes + transposed]


class BandedAttentionExecutor(Executor):
    """Runs the compiled graph with each block mask's tensors for this call's shape appended;
    a block mask is built once per distinct shape and kept (up to ``MAX_CACHED_SHAPES``)."""

    def __init__(self, compiled, specs: list[BlockSpec], symbols: list[sympy.Symbol], read_sizes):
        super().__init__()
        self.compiled = compiled
        self.specs = specs
        self.symbols = symbols
        self.read_sizes = read_sizes
        self.block_masks: collections.OrderedDict[tuple, list[torch.Tensor]] = collections.OrderedDict()

    def __call__(self, *args: Any) -> Any:
        key = self.read_sizes(args)
        tensors = self.block_masks.get(key)
        if tensors is None:
            tensors = self._build(key)
        else:
            self.block_masks.move_to_end(key)
        self.state.counters["calls"] += 1
        return self.compiled(*args, *tensors)

    def _build(self, key: tuple) -> list[torch.Tensor]:
        bindings = dict(zip(self.symbols, (sympy.Integer(v) for v in key)))
        with torch.no_grad():
            tensors = [t for spec in self.specs for t in spec.build(bindings)]
        self.block_masks[key] = tensors
        if len(self.block_masks) > MAX_CACHED_SHAPES:
            self.block_masks.popitem(last=False)
        self.state.counters["block_mask_builds"] += 1
        return tensors

    def reset(self) -> None:
        super().reset()
        self.block_masks.clear()


@dataclasses.dataclass
class Attention:
    """One attention of the graph: an SDPA call, or the final matmul of matmul-softmax-matmul."""

    node: torch.fx.Node
    query: torch.fx.Node
    key: torch.fx.Node
    value: torch.fx.Node
    mask: Any
    is_causal: bool
    scale: float | None
    # Pointwise ops on the scaled score before the mask (Gemma2's logit softcapping): flex's score_mod.
    score_ops: tuple[tuple[Callable, Any], ...] = ()

    @classmethod
    def parse(cls, node: torch.fx.Node) -> Attention | str:
        names = ["query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa"]
        bound = dict(zip(names, node.args))
        bound.update(node.kwargs)
        if bound.get("dropout_p", 0.0) not in (0, 0.0):
            return "dropout_p is not 0"
        if any(isinstance(bound.get(k), torch.fx.Node) for k in ("is_causal", "scale", "dropout_p", "enable_gqa")):
            return "is_causal / scale / dropout_p is a graph value"
        q, k = _example(bound["query"]), _example(bound["key"])
        if q is None or k is None or q.dim() != 4 or k.dim() != 4:
            return "query and key are not 4-D (batch, heads, sequence, head_dim)"
        static_heads = isinstance(q.shape[1], int) and isinstance(k.shape[1], int)
        if static_heads and q.shape[1] % k.shape[1]:
            return "query heads are not a multiple of key heads"
        return cls(node, bound["query"], bound["key"], bound["value"], bound.get("attn_mask"),
                   bool(bound.get("is_causal", False)), bound.get("scale"))

    @classmethod
    def parse_eager(cls, node: torch.fx.Node) -> Attention | str:
        """Attention written out as ``matmul(softmax(matmul(q, k^T) [* scale] [+ mask]), v)``
        (transformers' eager attention), the additive mask being ``where(allowed, 0, -big)``.

        Adding a large negative number before the softmax is masking, except in a row where
        every key is masked: there eager attention averages all values and flex returns zeros.
        """
        weights, value = node.args
        chain = []
        if _is_call(weights, "dropout"):
            if weights.kwargs.get("p", weights.args[1] if len(weights.args) > 1 else 0.5) not in (0, 0.0) and \
                    weights.kwargs.get("training", weights.args[2] if len(weights.args) > 2 else True):
                return "dropout is active"
            chain.append(weights)
            weights = weights.args[0]
        if _is_call(weights, "to"):
            chain.append(weights)
            weights = weights.args[0]
        softmax = weights
        dim = softmax.kwargs.get("dim", softmax.args[1] if len(softmax.args) > 1 else None)
        if dim not in (-1, 3):
            return "softmax is not over the last dim"
        chain.append(softmax)
        scores = softmax.args[0]
        mask = None
        if _is_call(scores, "add"):
            chain.append(scores)
            scores, additive = scores.args
            mask = _boolean_of_additive_mask(additive)
            if mask is None:
                return f"additive mask {getattr(additive, 'name', additive)} is not where(allowed, 0, -big)"
        score_ops = []
        while not (_is_call(scores, "mul") and _is_call(scores.args[0], "matmul")) and (op := _score_op(scores)):
            chain.append(scores)
            score_ops.append(op)
            scores = scores.args[0]
        scale = 1.0
        if _is_call(scores, "mul") and isinstance(scores.args[1], (int, float)):
            chain.append(scores)
            scores, scale = scores.args[0], float(scores.args[1])
        if not _is_call(scores, "matmul"):
            return "no matmul(query, key^T) before the softmax (score modifications are not handled)"
        chain.append(scores)
        query, key_t = scores.args
        if not (_is_call(key_t, "transpose") and tuple(d % 4 for d in key_t.args[1:3]) in ((2, 3), (3, 2))):
            return "the key of matmul(query, key^T) is not a transpose of its last two dims"
        if any(len(n.users) != 1 for n in chain):
            return "the attention weights are used elsewhere (e.g. returned)"
        return cls(node, query, key_t.args[0], value, mask, False, scale, tuple(reversed(score_ops)))

    @property
    def sizes(self) -> tuple:
        q, k = _example(self.query), _example(self.key)
        return (q.shape[0], q.shape[1], q.shape[2], k.shape[2])


_CALLS = {
    "matmul": (torch.matmul, operator.matmul),
    "softmax": (F.softmax, torch.softmax),
    "dropout": (F.dropout,),
    "add": (operator.add, torch.add),
    "mul": (operator.mul, torch.mul),
    "transpose": (torch.transpose,),
    "tanh": (torch.tanh,),
    "to": (),
}


def _is_call(node: Any, name: str) -> bool:
    """``node`` calls ``name`` as a function (torch / operator) or as a tensor method."""
    if not isinstance(node, torch.fx.Node):
        return False
    if node.op == "call_method":
        return node.target == name
    return node.op == "call_function" and node.target in _CALLS[name]


_SCORE_OPS = {operator.truediv: operator.truediv, operator.mul: operator.mul, operator.add: operator.add,
              operator.sub: operator.sub, torch.tanh: torch.tanh, "tanh": torch.tanh}


def _score_op(node: Any) -> tuple[Callable, Any] | None:
    """(op, constant) for ``tanh(x)`` or ``x <op> number``; None for anything else."""
    if not isinstance(node, torch.fx.Node) or node.op not in ("call_function", "call_method"):
        return None
    op = _SCORE_OPS.get(node.target)
    if op is torch.tanh and len(node.args) == 1:
        return op, None
    if op is not None and op is not torch.tanh and len(node.args) == 2 and isinstance(node.args[1], (int, float)):
        return op, node.args[1]
    return None


def _boolean_of_additive_mask(additive: Any) -> torch.fx.Node | None:
    """``allowed`` when ``additive`` is ``where(allowed, 0, v)`` with ``v`` at most -1e30."""
    if not (isinstance(additive, torch.fx.Node) and additive.op == "call_function" and additive.target is torch.where):
        return None
    allowed, zero, negative = additive.args
    zero_value = _example(zero)
    if isinstance(zero, torch.fx.Node):
        if zero.target is not torch.zeros or zero_value.dim() != 0:
            return None
    elif zero != 0:
        return None
    if not isinstance(negative, (int, float)) or negative > -1e30:
        return None
    return allowed if _example(allowed).dtype == torch.bool else None


def _attention_calls(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    """SDPA calls and the final matmul of every matmul-softmax-matmul, in graph order."""
    calls = []
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target in SDPA_TARGETS:
            calls.append(n)
        elif _is_call(n, "matmul") and len(n.args) == 2 and _reads_softmax(n.args[0]):
            calls.append(n)
    return calls


def _reads_softmax(node: Any) -> bool:
    for _ in range(3):  # through dropout and a dtype cast
        if _is_call(node, "softmax"):
            return True
        if not (_is_call(node, "dropout") or _is_call(node, "to")):
            return False
        node = node.args[0]
    return False


def _attention_frame(mask_shape: tuple) -> Callable[[tuple], tuple]:
    """(b, h, q, kv) -> the coordinates of a mask of ``mask_shape`` broadcast over attention."""
    return _broadcast_map(mask_shape, 4)


def _mask_terms(attention: Attention, analysis: MaskAnalysis) -> tuple[list[Term], Callable]:
    """The mask's conjunction in attention coordinates: (terms, frame map)."""
    mask = attention.mask
    value = _example(mask)
    if not isinstance(value, torch.Tensor) or value.dtype != torch.bool:
        raise Unprovable(f"{getattr(mask, 'name', mask)} is not a boolean mask (an additive float mask is not handled)")
    if value.dim() > 4:
        raise Unprovable(f"{mask.name} has rank {value.dim()} > 4")
    elem = analysis.elem(mask)
    terms = [t for t in elem.terms if t.constant is not True]
    if any(t.constant is False for t in terms):
        raise Unprovable(f"{mask.name} masks out everything")
    return terms, _attention_frame(tuple(value.shape))


def _uses(gm: torch.fx.GraphModule, name: str) -> bool:
    return any(bool(n.users) for n in gm.graph.find_nodes(op="placeholder") if n.name == name)


def _window_term(window: int, head_groups: int, heads: int, sink: int, aligned_to_end: bool,
                 q_len: Any, kv_len: Any) -> tuple[Term, list[int]]:
    """Approximate mode's term on attention coordinates (b, h, q, kv): key within the query's
    window (or among the ``sink`` first keys). ``aligned_to_end``: the queries are the last
    ``Q`` of the ``KV`` positions and see only earlier keys; otherwise the band is symmetric.
    ``q_len`` / ``kv_len``: ints or :class:`_SizeLeaf` read through the mask's leaves."""
    per_head = heads // head_groups
    group_windows = [max(1, int(window * 2.0 ** (g - head_groups // 2))) for g in range(head_groups)]
    leaves = tuple(v for v in (q_len, kv_len) if isinstance(v, _SizeLeaf))

    def fn(c, env):
        b, h, q, kv = c
        read = lambda v: env[v] if isinstance(v, _SizeLeaf) else v  # noqa: E731
        w = group_windows[-1]
        for g in range(head_groups - 2, -1, -1):
            w = torch.where(h < (g + 1) * per_head, group_windows[g], w)
        if aligned_to_end:
            offset = read(kv_len) - read(q_len)
            inside = kv > q + offset - w
        else:
            inside = (kv > q - w) & (kv < q + w)
        return inside | (kv < sink) if sink else inside

    return Term(fn, leaves, True), group_windows


# --------------------------------------------------------------------------------------------
# The pass


def prepare(
    gm: torch.fx.GraphModule,
    example_inputs: Sequence[Any],
    config: WindowAttentionConfig,
    compile_rest: Callable[..., Callable[..., Any]],
    report: PassReport,
    on_rewritten: Callable[[torch.fx.GraphModule], None],
) -> Callable[..., Any] | None:
    """The executor for ``gm`` with banded attention, or ``None`` when nothing is rewritten."""
    if not _attention_calls(gm):
        report.status = "skipped"
        report.skipped("graph", "no attention (scaled_dot_product_attention or matmul-softmax-matmul)")
        return None
    # Dynamo keeps reading its own graph after the backend returns: rewrite a copy.
    gm = torch.fx.GraphModule(gm, copy.deepcopy(gm.graph))
    calls = _attention_calls(gm)
    windows = config.windows(len(calls)) if config.mode == "approximate" else [None] * len(calls)
    binder = SizeBinder(gm)
    analysis = MaskAnalysis()
    fake_mode = torch._guards.detect_fake_mode(example_inputs)
    specs: dict[Any, BlockSpec] = {}
    plans = []
    for node, window in zip(calls, windows):
        attention = Attention.parse(node) if node.target in SDPA_TARGETS else Attention.parse_eager(node)
        if isinstance(attention, str):
            report.skipped(node.name, attention)
            continue
        try:
            plan = _plan(attention, window, config, analysis, binder, specs, report)
        except Unprovable as why:
            report.skipped(node.name, f"mask not provably banded: {why}")
            continue
        if plan is not None:
            plans.append(plan)
    if not plans:
        report.status = "skipped" if report.skips else "unchanged"
        return None

    used_specs = list(dict.fromkeys(spec_key for _, spec_key, _ in plans))
    spec_list = [specs[k] for k in used_specs]
    symbols = binder.symbols([s for spec in spec_list for s in spec.sizes]
                             + [_example(n) for spec in spec_list for n in spec.size_leaves])
    extra = _rewrite(gm, plans, specs, used_specs, fake_mode)
    report.status = "applied"
    report.metrics["rewritten_calls"] = len(plans)
    report.metrics["block_masks_per_shape"] = len(spec_list)
    on_rewritten(gm)
    compiled = compile_rest(gm, [*example_inputs, *extra])
    return BandedAttentionExecutor(compiled, spec_list, symbols, binder.reader(symbols))


def _plan(attention, window, config, analysis, binder, specs, report):
    """(attention, spec key, mask) for a call to rewrite, or None (reported) to keep it dense."""
    B, H, Q, KV = attention.sizes
    if attention.mask is not None:
        terms, frame = _mask_terms(attention, analysis)
    else:
        terms, frame = [], (lambda c: c)
        if attention.is_causal:
            terms = [Term(lambda c, env: c[3] <= c[2])]
    group_windows = None
    extra = None
    if window is not None:
        if isinstance(H, int) and H % config.head_groups:
            raise ValueError(
                f"zc: option 'window_attention.head_groups' ({config.head_groups}) must divide the "
                f"number of heads ({H}) of {attention.node.name}"
            )
        q_len = Q if isinstance(Q, int) else _SizeLeaf("q_len", Q, attention.query, 2)
        kv_len = KV if isinstance(KV, int) else _SizeLeaf("kv_len", KV, _unrepeated_kv(attention.key), 2)
        extra, group_windows = _window_term(window, config.head_groups, H, config.sink,
                                            attention.is_causal or attention.mask is not None, q_len, kv_len)
    elif attention.mask is None:
        report.skipped(attention.node.name, "no attention mask (full or is_causal attention): nothing to band in exact mode")
        return None

    leaves = _merge_leaves(terms)
    pure = [t for t in terms if t.pure]
    if window is None and not pure:
        tensors = [n.name for n in leaves if isinstance(_example(n), torch.Tensor)]
        raise Unprovable(f"every term reads a tensor the pass cannot evaluate per index ({', '.join(tensors)})")

    # Mask functions on attention coordinates; approximate mode's term reads Q and KV.
    def in_frame(t: Term) -> Term:
        return Term(lambda c, env, f=t.fn: f(frame(c), env), t.leaves, t.pure, t.constant)

    attention_terms = [in_frame(t) for t in terms]
    if extra is not None:
        attention_terms.append(extra)
    all_leaves = _merge_leaves(attention_terms)
    device = _example(attention.query).device
    dynamic = [n.name for n in all_leaves if isinstance(_example(n), torch.Tensor)
               and any(isinstance(d, torch.SymInt) for d in _example(n).shape)]
    if dynamic and device.type == "cpu":
        # Measured with torch 2.13: the C++ flex template declares no variables for the sizes of
        # a dynamic-shape mask_mod buffer and fails to compile ('ks2' was not declared).
        report.skipped(attention.node.name, f"the mask reads {', '.join(dynamic)} whose shape is dynamic, which "
                       "Inductor's C++ flex template cannot compile: dense SDPA kept (exact)")
        return None
    structure_terms = [t for t in attention_terms if t.pure]
    structure_leaves = _merge_leaves(structure_terms)
    identity = lambda c: c  # noqa: E731
    mask_gm = trace_mask(attention_terms, all_leaves, identity)
    structure_gm = trace_mask(structure_terms, structure_leaves, identity)
    uses_b, uses_h = _uses(structure_gm, "b"), _uses(structure_gm, "h")
    spec_sizes = (B if uses_b else 1, H if uses_h else 1, Q, KV)
    full_blocks = len(structure_terms) == len(attention_terms)
    block_size = config.block_size or (CPU_BLOCK_SIZE if device.type == "cpu" else _DEFAULT_SPARSE_BLOCK_SIZE)
    spec = BlockSpec(structure_gm, list(structure_leaves), tuple(_size_expr(s) for s in spec_sizes),
                     full_blocks, spec_sizes, device, block_size)
    key = (structure_gm.code, tuple(n.name for n in structure_leaves), spec.sizes, full_blocks)

    # At the compiled shape: a structure that admits every block gains nothing; keep SDPA.
    hints = _hint_bindings(binder, spec, attention)
    with unset_fake_temporarily():
        tensors = spec.build(hints)
    kv_blocks = tensors[0].sum() + (tensors[2].sum() if full_blocks else 0)
    total = tensors[0].numel() * tensors[1].shape[-1]
    if window is None and int(kv_blocks) == int(total):
        report.skipped(attention.node.name, "the window covers every key block at the compiled shape "
                       f"(Q={_evaluate(spec.sizes[2], hints)}, KV={_evaluate(spec.sizes[3], hints)}): dense SDPA kept (exact)")
        return None
    specs.setdefault(key, spec)
    what = ("exact: sliding-window mask" if window is None else
            f"approximate: window {group_windows if len(group_windows) > 1 else group_windows[0]}"
            + (f", sink {config.sink}" if config.sink else ""))
    report.rewrote(attention.node.name, f"{what} -> flex_attention; {int(kv_blocks)}/{int(total)} key blocks "
                   f"computed at the compiled shape; mask reads {[n.name for n in all_leaves]}")
    return attention, key, (mask_gm, all_leaves)


@dataclasses.dataclass(eq=False)
class _SizeLeaf:
    """A symbolic size approximate mode's term reads: ``source.size(dim)`` (a node added to the
    graph when the call is rewritten)."""

    name: str
    value: torch.SymInt
    source: torch.fx.Node
    dim: int


def _hint_bindings(binder: SizeBinder, spec: BlockSpec, attention: Attention) -> dict:
    shape_env = getattr(torch._guards.detect_fake_mode([_example(attention.query)]), "shape_env", None)
    if shape_env is None:
        return {}
    values = shape_env.backed_var_to_val if hasattr(shape_env, "backed_var_to_val") else shape_env.var_to_val
    return {s: sympy.Integer(v) for s, v in values.items()}


def _unrepeated_kv(node: torch.fx.Node) -> torch.fx.Node:
    """``x`` when ``node`` is transformers' ``repeat_kv(x)`` (each key/value head repeated for
    its group of query heads: ``x[:, :, None].expand(B, Hkv, n, S, D).reshape(B, Hkv * n, S, D)``).
    FlexAttention maps query head h to key head h // n itself, so the copy is not needed."""
    if node.op != "call_method" or node.target != "reshape" or not isinstance(node.args[0], torch.fx.Node):
        return node
    expand = node.args[0]
    if expand.op != "call_method" or expand.target != "expand" or not isinstance(expand.args[0], torch.fx.Node):
        return node
    unsqueezed = expand.args[0]
    full = slice(None)
    if (unsqueezed.target is not operator.getitem
            or unsqueezed.args[1] != (full, full, None, full, full)):
        return node
    source = unsqueezed.args[0]
    before, after = _example(source), _example(node)
    if not isinstance(before, torch.Tensor) or before.dim() != 4 or after.dim() != 4:
        return node
    if before.shape[0] != after.shape[0] or before.shape[2:] != after.shape[2:]:
        return node
    return source


def _score_mod(ops: Sequence[tuple[Callable, Any]]) -> torch.fx.GraphModule:
    """``score_mod(score, b, h, q_idx, kv_idx)`` applying ``ops`` in order (identity if none)."""
    graph = torch.fx.Graph()
    score = graph.placeholder("score")
    for name in ("b", "h", "q_idx", "kv_idx"):
        graph.placeholder(name)
    for op, constant in ops:
        score = graph.call_function(op, (score,) if constant is None else (score, constant))
    graph.output(score)
    return torch.fx.GraphModule(torch.nn.Module(), graph)


def _rewrite(gm: torch.fx.GraphModule, plans, specs, used_specs, fake_mode) -> list[torch.Tensor]:
    """Replace each planned SDPA call by the flex_attention higher-order op, reading its block
    mask from new graph inputs (appended after Dynamo's); returns their fake example values."""
    graph = gm.graph
    last_input = list(graph.find_nodes(op="placeholder"))[-1]
    block_inputs: dict[Any, list[torch.fx.Node]] = {}
    fakes = []
    for index, key in enumerate(used_specs):
        spec = specs[key]
        spec_fakes = spec.fake_inputs(fake_mode)
        nodes = []
        for j, fake in enumerate(spec_fakes):
            with graph.inserting_after(last_input):
                node = graph.placeholder(f"zc_block_mask_{index}_{j}")
            node.meta["example_value"] = fake
            node._dynamo_source = None  # not from user code: AOTAutograd guards nothing on it
            last_input = node
            nodes.append(node)
        block_inputs[key] = nodes
        fakes.extend(spec_fakes)

    gm.add_submodule("zc_window_score_mod", _score_mod(()))
    for index, (attention, key, (mask_gm, leaves)) in enumerate(plans):
        sdpa = attention.node
        gm.add_submodule(f"zc_window_mask_{index}", mask_gm)
        spec = specs[key]
        tensors = block_inputs[key]
        if spec.full_blocks:
            kv_nb, kv_idx, full_kv_nb, full_kv_idx, q_nb, q_idx, full_q_nb, full_q_idx = tensors
        else:
            (kv_nb, kv_idx, q_nb, q_idx), full_kv_nb, full_kv_idx, full_q_nb, full_q_idx = tensors, None, None, None, None
        key, value = _unrepeated_kv(attention.key), _unrepeated_kv(attention.value)
        if _example(key).shape[1] != _example(value).shape[1]:
            key, value = attention.key, attention.value
        q_value, k_value, v_value = (_example(n) for n in (attention.query, key, value))
        scale = attention.scale
        if scale is None:
            scale = 1.0 / math.sqrt(q_value.shape[-1])
        with graph.inserting_before(sdpa):
            sizes = {}

            def size_node(source: torch.fx.Node, dim: int, value: Any) -> Any:
                if not isinstance(value, torch.SymInt):
                    return value
                if (source, dim) not in sizes:
                    node = graph.call_method("size", (source, dim))
                    node.meta["example_value"] = value
                    sizes[source, dim] = node
                return sizes[source, dim]

            q_len = size_node(attention.query, 2, q_value.shape[2])
            kv_len = size_node(key, 2, k_value.shape[2])
            buffers = tuple(size_node(leaf.source, leaf.dim, leaf.value) if isinstance(leaf, _SizeLeaf) else leaf
                            for leaf in leaves)
            score_mod_name = "zc_window_score_mod"
            if attention.score_ops:
                score_mod_name = f"zc_window_score_mod_{index}"
                gm.add_submodule(score_mod_name, _score_mod(attention.score_ops))
            score_mod = graph.get_attr(score_mod_name)
            mask_mod = graph.get_attr(f"zc_window_mask_{index}")
            block_mask = (q_len, kv_len, kv_nb, kv_idx, full_kv_nb, full_kv_idx, q_nb, q_idx, full_q_nb, full_q_idx,
                          None, None, None, None, spec.block_size, spec.block_size, mask_mod)
            options = _apply_kernel_options(q_value, k_value, v_value, False, None)
            flex = graph.call_function(
                torch.ops.higher_order.flex_attention,
                (attention.query, key, value, score_mod, block_mask, scale, options, (), buffers),
            )
            out = graph.call_function(operator.getitem, (flex, 0))
        out.meta.update(sdpa.meta)
        sdpa.replace_all_uses_with(out)
        graph.erase_node(sdpa)
    graph.eliminate_dead_code()
    graph.lint()
    gm.recompile()
    return fakes
