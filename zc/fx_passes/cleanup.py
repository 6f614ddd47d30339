"""cleanup: remove ATen ops that return their input unchanged (exact).

Models leave many such ops in the graph: ``.contiguous()`` on a tensor that already is,
``.to(dtype)`` to its own dtype, ``x[:, :n]`` with ``n`` the full length, ``view``/``expand`` to the
same shape, ``x * 1.0``. They cost nothing in Inductor's generated code, but they hide patterns
from zc's rewriting passes (a norm feeding a linear through a ``clone``), so this pass runs first.

An op is removed only when its output provably has the same shape, strides, dtype and device as
its input (checked on the fake tensors, without adding shape guards) and when removing it cannot
change aliasing that AOTAutograd already accounted for (a graph output becoming an alias of a
graph input or of another output) or feed a mutating op.
"""

from __future__ import annotations

import numbers
from collections import Counter
from collections.abc import Callable

import torch
import torch.fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from zc.fx_passes.pass_manager import PassContext, PassReport

aten = torch.ops.aten
prims = torch.ops.prims


def _always(node: torch.fx.Node) -> bool:
    return True


def _scalar_other_is(value: int) -> Callable[[torch.fx.Node], bool]:
    def rule(node: torch.fx.Node) -> bool:
        other = node.args[1] if len(node.args) > 1 else None
        alpha = node.kwargs.get("alpha", 1)
        return (
            isinstance(other, numbers.Number)
            and not isinstance(other, bool)
            and other == value
            and alpha == 1
        )

    return rule


def _not_pinned(node: torch.fx.Node) -> bool:
    return not node.kwargs.get("pin_memory")


# op -> extra condition; the shared meta check (same shape/strides/dtype/device) comes on top.
# add(x, 0) is left alone on purpose: -0.0 + 0 is +0.0, so it is not an identity.
_NOOP_RULES: dict[torch._ops.OpOverload, Callable[[torch.fx.Node], bool]] = {
    aten.clone.default: _always,
    aten.alias.default: _always,
    aten._to_copy.default: _not_pinned,
    prims.convert_element_type.default: _always,
    aten.view.default: _always,
    aten.reshape.default: _always,
    aten._unsafe_view.default: _always,
    aten.expand.default: _always,
    aten.permute.default: _always,
    aten.slice.Tensor: _always,
    aten.repeat.default: _always,
    aten.squeeze.dim: _always,
    aten.squeeze.dims: _always,
    aten.mul.Tensor: _scalar_other_is(1),
    aten.mul.Scalar: _scalar_other_is(1),
    aten.div.Tensor: _scalar_other_is(1),
    aten.div.Scalar: _scalar_other_is(1),
    aten.sub.Tensor: _scalar_other_is(0),
    aten.sub.Scalar: _scalar_other_is(0),
    aten.cat.default: lambda node: len(node.args[0]) == 1,
}


def _source(node: torch.fx.Node) -> torch.fx.Node | None:
    first = node.args[0]
    if node.target is aten.cat.default:
        first = first[0]
    return first if isinstance(first, torch.fx.Node) else None


def _same(a, b) -> bool:
    return len(a) == len(b) and all(statically_known_true(x == y) for x, y in zip(a, b))


def _same_meta(node: torch.fx.Node, source: torch.fx.Node) -> bool:
    out, inp = node.meta.get("val"), source.meta.get("val")
    if not isinstance(out, torch.Tensor) or not isinstance(inp, torch.Tensor):
        return False
    if out.dtype != inp.dtype or out.device != inp.device or out.layout != inp.layout:
        return False
    if out.layout != torch.strided:
        return False
    return (
        _same(out.shape, inp.shape)
        and _same(out.stride(), inp.stride())
        and statically_known_true(out.storage_offset() == inp.storage_offset())
    )


def _alias_root(node: torch.fx.Node) -> torch.fx.Node:
    """Follow view ops back to the tensor whose storage ``node`` shares."""
    while (
        node.op == "call_function"
        and isinstance(node.target, torch._ops.OpOverload)
        and node.target.is_view
        and isinstance(node.args[0], torch.fx.Node)
    ):
        node = node.args[0]
    return node


def _aliasing_hazard(node: torch.fx.Node, source: torch.fx.Node) -> str | None:
    if any(
        isinstance(user.target, torch._ops.OpOverload) and user.target._schema.is_mutable
        for user in node.users
    ):
        return "feeds an op that mutates its input"
    output = next(iter(n for n in node.graph.nodes if n.op == "output"))
    if node not in output.all_input_nodes:
        return None
    root = _alias_root(source)
    if root.op == "placeholder":
        return "graph output would become an alias of a graph input"
    if any(_alias_root(n) is root for n in output.all_input_nodes if n is not node):
        return "graph output would alias another graph output"
    return None


def apply(gm: torch.fx.GraphModule, ctx: PassContext) -> PassReport:
    report = PassReport("cleanup")
    removed: Counter[str] = Counter()
    for node in list(gm.graph.nodes):
        rule = _NOOP_RULES.get(node.target) if node.op == "call_function" else None
        if rule is None or not rule(node):
            continue
        source = _source(node)
        if source is None or not _same_meta(node, source):
            continue
        hazard = _aliasing_hazard(node, source)
        if hazard is not None:
            report.skipped(node.name, f"{node.target} is a no-op but kept: {hazard}")
            continue
        node.replace_all_uses_with(source)
        gm.graph.erase_node(node)
        removed[str(node.target)] += 1
        report.rewrote(node.name, f"removed no-op {node.target} (uses {source.name})")
    report.status = "applied" if removed else "unchanged"
    report.metrics["removed"] = dict(removed)
    return report
