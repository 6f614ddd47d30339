"""Runs zc's passes on the ATen-level graph, in a fixed order, inside Inductor's compile.

zc hands its passes to Inductor as ``post_grad_custom_pre_pass``: they see the graph after
AOTAutograd (functional, decomposed ATen ops) and before Inductor's own post-grad passes and
lowering. Running through Inductor's hook, rather than beside it, keeps Inductor's FX graph
cache and AOTAutograd cache correct: :meth:`PassManager.uuid` covers zc's version and every
option that changes the graph, so a cache hit never skips a pass that should have run.

A pass is a module ``zc.fx_passes.<name>`` with ``apply(gm, ctx) -> PassReport``. A pass whose
result depends on more than the graph and its options (calibrated data, runtime wrappers that
a cache hit would not re-register) sets ``CACHEABLE = False`` in its module: the manager's uuid
is then ``None``, which makes Inductor bypass its caches for that compile. The order is
the field order of :class:`zc.ZcConfig` (see :func:`zc.config.pass_names`). A pass that raises
is rolled back and skipped with a warning, unless ``strict`` is set.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import time
import traceback
import warnings
from collections.abc import Callable, Sequence
from operator import attrgetter
from pathlib import Path
from typing import Any

import torch
import torch.fx
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

from zc.config import ZcConfig
from zc.dump import GraphDump

# Passes that are exact and may therefore also rewrite training (forward/backward) graphs.
# Every other pass only touches inference graphs: zc's approximations target inference.
TRAINING_SAFE_PASSES = frozenset({"cleanup"})


class ZcWarning(UserWarning):
    """A zc pass stepped aside, or zc could not honour an option as asked."""


@dataclasses.dataclass
class PassReport:
    """What one pass did to one graph: every rewrite, every skip with its reason, its metrics."""

    name: str
    status: str = "applied"  # applied | unchanged | skipped | failed
    rewrites: list[dict[str, str]] = dataclasses.field(default_factory=list)
    skips: list[dict[str, str]] = dataclasses.field(default_factory=list)
    metrics: dict[str, Any] = dataclasses.field(default_factory=dict)
    seconds: float = 0.0
    error: str | None = None

    def rewrote(self, where: str, what: str) -> None:
        self.rewrites.append({"where": where, "what": what})

    def skipped(self, where: str, reason: str) -> None:
        self.skips.append({"where": where, "reason": reason})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class PassContext:
    """What a pass may read about the graph it rewrites, and ask of the runtime.

    ``runtime_wrappers`` lets a pass that needs state across calls (calibration, step caches)
    wrap the compiled callable in a :mod:`zc.runtime` executor: each entry maps the compiled
    function (Dynamo's calling convention, flat positional args) to the callable zc returns.
    """

    config: ZcConfig
    graph_id: str
    stage: str  # inference | forward | backward
    dynamo_inputs: Sequence[Any]
    runtime_wrappers: list[Callable[[Callable[..., Any]], Callable[..., Any]]] = dataclasses.field(
        default_factory=list
    )

    def constant_value(self, gm: torch.fx.GraphModule, node: torch.fx.Node) -> torch.Tensor | None:
        """The real tensor behind ``node`` if it is a weight or buffer, else ``None``.

        Frozen constants are ``get_attr`` nodes. Unfrozen parameters are placeholders of the
        inference graph, which AOTAutograd keeps in Dynamo's argument order; the mapping is
        used only when every placeholder agrees with Dynamo's input in shape and dtype.
        """
        if node.op == "get_attr":
            value = attrgetter(node.target)(gm)
            return value if isinstance(value, torch.Tensor) else None
        if node.op != "placeholder" or self.stage != "inference":
            return None
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        if len(placeholders) != len(self.dynamo_inputs):
            return None
        for placeholder, real in zip(placeholders, self.dynamo_inputs):
            fake = placeholder.meta.get("val")
            if isinstance(real, torch.Tensor) != isinstance(fake, torch.Tensor):
                return None
            if isinstance(real, torch.Tensor) and (
                real.dtype != fake.dtype or real.dim() != fake.dim()
            ):
                return None
        real = self.dynamo_inputs[placeholders.index(node)]
        return real if is_weight_input(real) else None


def is_weight_input(value: Any) -> bool:
    """Whether a Dynamo input is a parameter or buffer (a constant across calls), not data."""
    return isinstance(value, torch.nn.Parameter) or bool(getattr(value, "_dynamo_static_input_type", None))


def pass_module(name: str):
    return importlib.import_module(f"zc.fx_passes.{name}")


def resolve_pass(name: str) -> Callable[[torch.fx.GraphModule, PassContext], PassReport]:
    return pass_module(name).apply


def is_cacheable(name: str) -> bool:
    return getattr(pass_module(name), "CACHEABLE", True)


def runs_on_dynamo_graph(name: str) -> bool:
    """Passes that need the model across calls rewrite Dynamo's graph before Inductor."""
    return getattr(pass_module(name), "GRAPH_LEVEL", "aten") == "dynamo"


class PassManager(CustomGraphPass):
    """zc's passes as one Inductor post-grad custom pass, with per-stage reports and dumps."""

    def __init__(self, config: ZcConfig, graph_id: str, dump: GraphDump, dynamo_inputs: Sequence[Any]):
        self.config = config
        self.graph_id = graph_id
        self.dump = dump
        self.dynamo_inputs = dynamo_inputs
        self.stage = "inference"
        self.stages: list[dict[str, Any]] = []
        self.runtime_wrappers: list[Callable[[Callable[..., Any]], Callable[..., Any]]] = []

    def uuid(self) -> str | None:
        from zc import __version__

        if not all(is_cacheable(name) for name in self.config.enabled_passes()):
            return None
        return f"zc-{__version__}-{_source_hash()}-{self.config.cache_key()}"

    def begin_stage(self, stage: str) -> dict[str, Any]:
        self.stage = stage
        record = {"stage": stage, "passes": [], "ran": False}
        self.stages.append(record)
        return record

    def __call__(self, graph: torch.fx.Graph) -> None:
        gm = graph.owning_module
        record = self.stages[-1] if self.stages else self.begin_stage(self.stage)
        record["ran"] = True
        record["nodes_before"] = len(graph.nodes)
        suffix = "" if self.stage == "inference" else f"_{self.stage}"
        self.dump.write_graph(f"aten{suffix}", gm)
        ctx = PassContext(self.config, self.graph_id, self.stage, self.dynamo_inputs)
        for name in self.config.enabled_passes():
            if runs_on_dynamo_graph(name):
                continue
            if self.stage != "inference" and name not in TRAINING_SAFE_PASSES:
                report = PassReport(name, status="skipped")
                report.skipped(
                    "graph",
                    f"{self.stage} graph: zc rewrites inference graphs only "
                    "(call the model under torch.no_grad() or torch.inference_mode())",
                )
            else:
                report = self._run_one(name, gm, ctx)
            record["passes"].append(report.to_dict())
            self.dump.write_graph(f"{name}{suffix}", gm)
        record["nodes_after"] = len(graph.nodes)
        self.runtime_wrappers.extend(ctx.runtime_wrappers)

    def _run_one(self, name: str, gm: torch.fx.GraphModule, ctx: PassContext) -> PassReport:
        backup = torch.fx.Graph()
        backup.output(backup.graph_copy(gm.graph, {}))
        start = time.perf_counter()
        try:
            report = resolve_pass(name)(gm, ctx)
            gm.graph.lint()
            gm.recompile()
        except Exception as error:
            if self.config.strict:
                raise
            _restore(gm, backup)
            report = PassReport(name, status="failed", error=f"{type(error).__name__}: {error}")
            report.metrics["traceback"] = traceback.format_exc(limit=8)
            warnings.warn(
                f"zc: pass '{name}' failed on {self.graph_id} ({self.stage}) and was skipped: "
                f"{report.error}. The rest of the compile goes on; options={{'strict': True}} "
                "re-raises.",
                ZcWarning,
                stacklevel=2,
            )
        report.seconds = time.perf_counter() - start
        return report


@functools.cache
def _source_hash() -> str:
    """Digest of zc's sources, so an edited pass never reuses code cached by the old one."""
    package = Path(__file__).resolve().parent.parent
    return get_hash_for_files(tuple(sorted(str(p) for p in package.rglob("*.py")))).hex()


def _restore(gm: torch.fx.GraphModule, backup: torch.fx.Graph) -> None:
    """Put ``backup``'s nodes back into ``gm.graph`` in place: Inductor holds that Graph object."""
    graph = gm.graph
    for node in reversed(list(graph.nodes)):
        graph.erase_node(node)
    graph.output(graph.graph_copy(backup, {}))
    gm.recompile()
