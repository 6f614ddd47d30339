"""``zc(gm, example_inputs, mode=None, options=None)``: options -> config -> passes -> Inductor.

Dynamo guards on the backend's identity, so this is one module-level function; the options
travel in ``torch.compile``'s wrapper, not in a fresh backend object per call.
"""

from __future__ import annotations

import itertools
import logging
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch._guards
import torch._inductor
from torch._logging import trace_structured

from zc.codegen.inductor import compile_with_inductor
from zc.config import ZcConfig
from zc.dump import GraphDump
from zc.fx_passes.pass_manager import PassManager, PassReport, ZcWarning, pass_module, runs_on_dynamo_graph

GraphCompiler = Callable[..., Callable[..., Any]]

log = logging.getLogger("zc")

_graph_ids = itertools.count()


def zc(
    gm: torch.fx.GraphModule,
    example_inputs: Sequence[Any],
    *,
    mode: str | None = None,
    options: dict[str, Any] | ZcConfig | None = None,
):
    config = ZcConfig.from_options(options)
    graph_id = f"graph_{next(_graph_ids):03d}"
    dump = GraphDump(config.dump, graph_id)
    dump.write_graph("captured", gm)
    manager = PassManager(config, graph_id, dump, example_inputs)

    patches = {**_mode_options(mode), **config.inductor}
    if dump.enabled:
        # A cache hit would skip the passes and leave the dump without per-pass graphs.
        patches["force_disable_caches"] = True

    start = time.perf_counter()
    seconds = 0.0
    graph_passes: list[dict[str, Any]] = []
    report: dict[str, Any] = {}

    def write_report() -> None:
        report.update({
            "graph_id": graph_id,
            "dynamo_compile_id": dynamo_compile_id,
            "device": _device_of(example_inputs),
            "zc_version": _version(),
            "torch_version": torch.__version__,
            "enabled_passes": config.enabled_passes(),
            "options": config.to_dict(),
            "compile_seconds": seconds,
            "graph_passes": graph_passes,
            "stages": manager.stages,
        })
        dump.write_report(report)

    dynamo_compile_id = str(torch._guards.CompileContext.current_compile_id())
    compile_graph = _graph_compiler(example_inputs, manager, patches, dump)
    for name in reversed([n for n in config.enabled_passes() if runs_on_dynamo_graph(n)]):
        compile_graph = _dynamo_level_pass(name, example_inputs, config, compile_graph, dump, graph_passes, write_report)
    compiled = compile_graph(gm)
    seconds = time.perf_counter() - start

    write_report()
    trace_structured(
        "artifact",
        metadata_fn=lambda: {"name": f"zc_report_{graph_id}", "encoding": "json"},
        payload_fn=lambda: report,
    )
    _warn_if_training(manager, config)
    log.info(_summary(report, dump))
    return compiled


def _graph_compiler(example_inputs, manager, patches, dump) -> GraphCompiler:
    """Compile a Dynamo-level graph through Inductor, now or after Dynamo has returned.

    ``compile_graph(graph, inputs=None)``: ``inputs`` are the graph's example inputs when they
    are not Dynamo's (a partition of the graph, for instance). A pass that calibrates compiles
    its final graph calls later, outside Dynamo's compile; the tracing context (its fake mode
    and shape environment, so symbolic sizes keep their meaning) is re-entered for that
    compile. Guards cannot be added after Dynamo has installed its own, so a deferred compile
    that would add one is an error instead of silently specialising.
    """
    context = torch._guards.TracingContext.try_get()

    def compile_graph(graph: torch.fx.GraphModule, inputs: Sequence[Any] | None = None) -> Callable[..., Any]:
        wrappers_before = len(manager.runtime_wrappers)
        if context is None or torch._guards.TracingContext.try_get() is context:
            compiled = compile_with_inductor(
                graph, example_inputs if inputs is None else inputs, manager, patches, dump.write_code
            )
        else:
            compiled = _compile_later(graph, inputs)
        for wrap in manager.runtime_wrappers[wrappers_before:]:
            compiled = wrap(compiled)
        return compiled

    def _compile_later(graph: torch.fx.GraphModule, inputs: Sequence[Any] | None) -> Callable[..., Any]:
        shape_env = context.fake_mode.shape_env
        guards_before = len(shape_env.guards) if shape_env is not None else 0
        if inputs is None:
            inputs = [n.meta["example_value"] for n in graph.graph.find_nodes(op="placeholder")]
        with torch._guards.tracing(torch._guards.TracingContext(context.fake_mode)):
            compiled = compile_with_inductor(graph, inputs, manager, patches, dump.write_code)
        if shape_env is not None and len(shape_env.guards) > guards_before:
            new = [str(g.expr) for g in shape_env.guards[guards_before:]]
            raise RuntimeError(
                f"zc: the graph compiled after calibration needs shape guards Dynamo did not install: {new}"
            )
        return compiled

    return compile_graph


def _dynamo_level_pass(name, example_inputs, config, compile_rest, dump, graph_passes, write_report) -> GraphCompiler:
    """Wrap ``compile_rest`` with the Dynamo-level pass ``name`` (see ``runs_on_dynamo_graph``).

    Such a pass module provides ``prepare(gm, example_inputs, pass_config, compile_rest,
    report, on_rewritten)``: it returns the callable zc hands Dynamo for ``gm`` (usually a
    :mod:`zc.runtime` executor around graphs it compiled with ``compile_rest(graph, inputs)``,
    which runs the later Dynamo-level passes and then Inductor), or ``None`` to step aside, in
    which case ``gm`` goes on unchanged. ``on_rewritten(graph)`` dumps a graph it built. A pass
    that raises anything but ``ValueError`` (the user's option or file is wrong) is skipped
    with a ``ZcWarning`` unless ``strict`` is set. Each call records its own report.
    """
    module = pass_module(name)
    pass_config = getattr(config, name)

    def compile_graph(gm: torch.fx.GraphModule, inputs: Sequence[Any] | None = None) -> Callable[..., Any]:
        report = PassReport(name)
        index = len(graph_passes)
        graph_passes.append(report.to_dict())
        start = time.perf_counter()

        def record() -> None:
            report.seconds = time.perf_counter() - start
            graph_passes[index] = report.to_dict()

        def on_rewritten(graph: torch.fx.GraphModule) -> None:
            dump.write_graph(name, graph)
            record()
            write_report()

        graph_inputs = example_inputs if inputs is None else inputs
        try:
            if _autograd_on(graph_inputs):
                report.status = "skipped"
                report.skipped("graph", f"autograd is on: {name} rewrites inference graphs only "
                               "(call the model under torch.no_grad() or torch.inference_mode())")
                compiled = None
            else:
                compiled = module.prepare(gm, graph_inputs, pass_config, compile_rest, report, on_rewritten)
        except ValueError:
            raise
        except Exception as error:
            if config.strict:
                raise
            report.status = "failed"
            report.error = f"{type(error).__name__}: {error}"
            warnings.warn(
                f"zc: pass '{name}' failed and was skipped: {report.error}. The rest of the "
                "compile goes on; options={'strict': True} re-raises.",
                ZcWarning,
                stacklevel=3,
            )
            compiled = None
        record()
        return compile_rest(gm, inputs) if compiled is None else compiled

    return compile_graph


def _autograd_on(inputs: Sequence[Any]) -> bool:
    """Dynamo-level passes rewrite inference graphs only (see pass_manager.TRAINING_SAFE_PASSES)."""
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in inputs)


def _mode_options(mode: str | None) -> dict[str, Any]:
    if mode is None or mode == "default":
        return {}
    modes = torch._inductor.list_mode_options()
    if mode not in modes:
        raise ValueError(f"zc: unknown mode '{mode}'. Valid: {', '.join(modes)}")
    return dict(modes[mode])


def _device_of(example_inputs: Sequence[Any]) -> str:
    devices = {str(x.device) for x in example_inputs if isinstance(x, torch.Tensor)}
    return ",".join(sorted(devices)) or "none"


def _version() -> str:
    from zc import __version__

    return __version__


def _warn_if_training(manager: PassManager, config: ZcConfig) -> None:
    approximate = [p for p in config.enabled_passes() if p != "cleanup"]
    if approximate and any(s["stage"] == "forward" for s in manager.stages):
        warnings.warn(
            f"zc: {manager.graph_id} was compiled as a training graph (autograd is on), so "
            f"{', '.join(approximate)} did not run. Call the model under torch.no_grad() or "
            "torch.inference_mode() to apply zc's passes.",
            ZcWarning,
            stacklevel=3,
        )


def _summary(report: dict[str, Any], dump: GraphDump) -> str:
    parts = []
    for stage in report["stages"]:
        if not stage["ran"]:
            parts.append(f"{stage['stage']}: from cache")
            continue
        passes = ", ".join(f"{p['name']}={p['status']}" for p in stage["passes"]) or "no passes"
        parts.append(f"{stage['stage']}: {stage['nodes_before']}->{stage['nodes_after']} nodes, {passes}")
    where = f", dump {dump.directory}" if dump.enabled else ""
    return (
        f"zc {report['graph_id']} (dynamo {report['dynamo_compile_id']}) on {report['device']}: "
        f"{'; '.join(parts)}; compiled in {report['compile_seconds']:.1f}s{where}"
    )
