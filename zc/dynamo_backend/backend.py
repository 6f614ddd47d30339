"""``zc(gm, example_inputs, mode=None, options=None)``: options -> config -> passes -> Inductor.

Dynamo guards on the backend's identity, so this is one module-level function; the options
travel in ``torch.compile``'s wrapper, not in a fresh backend object per call.
"""

from __future__ import annotations

import itertools
import logging
import time
import warnings
from collections.abc import Sequence
from typing import Any

import torch
import torch._guards
import torch._inductor
from torch._logging import trace_structured

from zc.codegen.inductor import compile_with_inductor
from zc.config import ZcConfig
from zc.dump import GraphDump
from zc.fx_passes.pass_manager import PassManager, ZcWarning

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
    compiled = compile_with_inductor(gm, example_inputs, manager, patches, dump.write_code)
    for wrap in manager.runtime_wrappers:
        compiled = wrap(compiled)
    seconds = time.perf_counter() - start

    report = {
        "graph_id": graph_id,
        "dynamo_compile_id": str(torch._guards.CompileContext.current_compile_id()),
        "device": _device_of(example_inputs),
        "zc_version": _version(),
        "torch_version": torch.__version__,
        "enabled_passes": config.enabled_passes(),
        "options": config.to_dict(),
        "compile_seconds": seconds,
        "stages": manager.stages,
    }
    dump.write_report(report)
    trace_structured(
        "artifact",
        metadata_fn=lambda: {"name": f"zc_report_{graph_id}", "encoding": "json"},
        payload_fn=lambda: report,
    )
    _warn_if_training(manager, config)
    log.info(_summary(report, dump))
    return compiled


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
