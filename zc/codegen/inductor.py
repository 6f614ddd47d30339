"""Hand a Dynamo graph to Inductor with zc's passes installed as its post-grad hook."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch._inductor.config as inductor_config
from torch._inductor.compile_fx import compile_fx, compile_fx_inner

try:
    from torch._inductor.custom_graph_pass import get_custom_graph_passes
except ImportError:  # torch < 2.13 (the GPU machines' image has 2.11): one custom pre-pass, no list
    get_custom_graph_passes = None
from torch._inductor.virtualized import V

from zc.fx_passes.pass_manager import PassManager


def _stage(kwargs: Mapping[str, Any]) -> str:
    if kwargs.get("is_inference"):
        return "inference"
    return "backward" if kwargs.get("is_backward") else "forward"


def compile_with_inductor(
    gm: torch.fx.GraphModule,
    example_inputs: Sequence[Any],
    manager: PassManager,
    inductor_patches: Mapping[str, Any],
    on_code: Callable[[str, str], None],
) -> Callable[..., Any]:
    """Compile ``gm`` with Inductor; ``manager`` rewrites each ATen graph before lowering.

    ``on_code(stage, source)`` receives Inductor's generated wrapper source (which embeds the
    C++ / Triton kernels) for every graph compiled, including graphs served from the cache.
    """
    patches = dict(inductor_patches)
    existing = patches.get("post_grad_custom_pre_pass", inductor_config.post_grad_custom_pre_pass)
    if get_custom_graph_passes is not None:
        patches["post_grad_custom_pre_pass"] = [*get_custom_graph_passes(existing), manager]
    elif existing is None:
        patches["post_grad_custom_pre_pass"] = manager
    else:
        raise RuntimeError(f"zc runs beside another post_grad_custom_pre_pass ({existing!r}) only on torch >= 2.13 "
                           f"(this is {torch.__version__})")

    def inner_compile(graph_module, inputs, **kwargs):
        stage = _stage(kwargs)
        manager.begin_stage(stage)
        # A pass may adjust Inductor's choices for the graph it rewrote (op_grouping keeps its
        # slices apart): the fusion heuristics and the peak-memory reordering it may change are
        # put back when this graph's compile ends, however it ends.
        with V.set_choices_handler(V.choices), inductor_config.patch(
            reorder_for_peak_memory=inductor_config.reorder_for_peak_memory
        ):
            compiled = compile_fx_inner(graph_module, inputs, **kwargs)
        source = getattr(compiled, "source_code", None)
        if source:
            on_code(stage, source)
        return compiled

    return compile_fx(gm, example_inputs, inner_compile=inner_compile, config_patches=patches)
