"""Split a graph into partitions, compile each, and sequence them with a :class:`PartitionedExecutor`.

The example inputs of every partition are found by running the split graph on fake tensors in
Dynamo's fake mode (the way Dynamo's DDPOptimizer compiles its buckets), so dynamic shapes stay
symbolic and nothing runs on real data at compile time.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import torch
import torch.fx
from torch._guards import TracingContext, detect_fake_mode
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.fx.passes.split_module import split_module

from zc.runtime.executor import PartitionedExecutor, PartitionPolicy, _Step


def _fake_inputs(gm: torch.fx.GraphModule, example_inputs: Sequence[Any]):
    """Fake versions of ``example_inputs`` in Dynamo's fake mode (symbolic where Dynamo was)."""
    tensors = [x for x in example_inputs if isinstance(x, torch.Tensor)]
    if tensors and all(isinstance(x, FakeTensor) for x in tensors):
        return detect_fake_mode(tensors), list(example_inputs)
    context = TracingContext.try_get()
    fake_mode = context.fake_mode if context is not None else None
    if fake_mode is None:
        fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    fakes = []
    for node, real in zip(placeholders, example_inputs, strict=True):
        traced = node.meta.get("example_value")
        if isinstance(traced, FakeTensor) and traced.fake_mode is fake_mode:
            fakes.append(traced)
        elif isinstance(real, torch.Tensor):
            fakes.append(fake_mode.from_tensor(real))
        else:
            fakes.append(real)
    return fake_mode, fakes


def split_and_compile(
    gm: torch.fx.GraphModule,
    example_inputs: Sequence[Any],
    assign: Callable[[torch.fx.Node], Hashable],
    compile_partition: Callable[[torch.fx.GraphModule, list[Any]], Callable[..., Any]],
    policy: PartitionPolicy | None = None,
) -> PartitionedExecutor:
    """Split ``gm`` by ``assign(node)`` (a partition key per op), compile each partition.

    Partition names are ``"submod_<key>"``. ``compile_partition(submodule, example_inputs)``
    compiles one partition (e.g. ``torch._inductor.compile_fx.compile_fx``).
    """
    split = split_module(gm, None, assign, keep_original_order=True)
    fake_mode, fake_args = _fake_inputs(gm, example_inputs)

    slot_of: dict[torch.fx.Node, tuple[int, int | None]] = {}
    plan: list[_Step] = []
    compiled: dict[str, Callable[..., Any]] = {}
    env: dict[torch.fx.Node, Any] = {}
    placeholders = [n for n in split.graph.nodes if n.op == "placeholder"]
    for index, (node, value) in enumerate(zip(placeholders, fake_args, strict=True)):
        slot_of[node] = (index, None)
        env[node] = value
    next_slot = len(placeholders)
    outputs: list[tuple[int, int | None]] = []

    def ref(arg: Any) -> tuple[int, int | None]:
        if not isinstance(arg, torch.fx.Node):
            raise ValueError(f"split graph passes a constant between partitions: {arg!r}")
        return slot_of[arg]

    with fake_mode:
        for node in split.graph.nodes:
            if node.op == "call_module":
                submodule = getattr(split, node.target)
                args = [env[a] for a in node.args]
                env[node] = submodule(*args)  # before compiling: Inductor may box its calls
                compiled[node.target] = compile_partition(submodule, args)
                plan.append(_Step(node.target, tuple(ref(a) for a in node.args), next_slot))
                slot_of[node] = (next_slot, None)
                next_slot += 1
            elif node.op == "call_function" and node.target is operator.getitem:
                source, item = node.args
                slot, nested = slot_of[source]
                if nested is not None:
                    raise ValueError(f"nested tuple output in split graph at {node.name}")
                slot_of[node] = (slot, item)
                env[node] = env[source][item]
            elif node.op == "output":
                outputs = [ref(a) for a in node.args[0]]
            elif node.op != "placeholder":
                raise ValueError(f"unexpected node in split graph: {node.format_node()}")
    return PartitionedExecutor(compiled, plan, outputs, len(placeholders), policy)
