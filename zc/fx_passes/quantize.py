"""quantize: post-training static W8A8 (and weight-only int8/int4) with merged scales.

This pass runs on Dynamo's graph, before Inductor, because W8A8 needs calls: the first
``calibration_steps`` calls run the float graph with observers on every quantized linear's
input (zc.runtime.calibration), then the quantized graph is built from what they saw and
compiled once. With ``scales=path`` the calibration is loaded and the quantized graph is
compiled at once.

The arithmetic of one group of linears that read the same activation ``x`` (Q/K/V after one
norm share one group)::

    s_j   = amax(x_j)^a / amax(W_j)^(1-a)        smoothing (SmoothQuant), a per group
    d     = max_j(amax(x_j) / s_j) / 127          the static activation step
    q     = clamp(round(x * m), -127, 127)        m_j = 1 / (s_j d): smoothing and step in one
    W'    = W diag(s),  Wq = round(W' / w), w_i = amax(W'_i) / 127
    y     = (q @ Wq^T) * (d w) + b                int32 GEMM, dequantized in its epilogue

Where smoothing cannot tame an outlier channel (BERT's FFN input has one channel 30x above
the rest on [CLS] tokens), the few input channels with the largest range after smoothing
(``outlier_channels``) are split, as in MergeQuant's dimension reconstruction: channel j is
quantized as c_j copies of x_j / c_j, each multiplied by a copy of W's column j, so no channel
sets a step coarser than the (k+1)-th largest range. The copies are extra columns of the int8
operand, written by the same fused kernel that quantizes the rest. Splitting is used only for
inputs not produced by a norm (a norm's kernel writes the int8 tensor of its own width) and only
when it lowers the measured error.

``x * m`` is merged into the op that produces ``x``: a LayerNorm / RMSNorm gets ``m`` folded
into its weight and bias (a second norm node with the folded constants, which Inductor
computes in the same kernel as the float one, so the norm kernel writes the int8 tensor);
any other producer gets the multiply, round and cast fused into its kernel by Inductor.
The epilogue ``* (d w) + b`` is pointwise on the int32 result, and Inductor fuses it into
whatever consumes the linear's output (the residual add + next norm, GELU + next quantize).
"""

from __future__ import annotations

import copy
import dataclasses
import fnmatch
import inspect
import logging
import operator
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch._subclasses.fake_tensor import unset_fake_temporarily

from zc.config import QuantizeConfig
from zc.fx_passes.pass_manager import PassReport, is_weight_input

log = logging.getLogger("zc")

# Runs on Dynamo's graph (see zc.dynamo_backend.backend), not in Inductor's post-grad hook.
GRAPH_LEVEL = "dynamo"
# The quantized graph's constants come from calibration, not from the graph and options.
CACHEABLE = False

LINEAR_TARGETS = (torch._C._nn.linear, F.linear)
LAYER_NORM_TARGETS = (F.layer_norm, torch.layer_norm)
MUL_TARGETS = (operator.mul, torch.mul)
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
ALPHA_GRID = (0.0, 0.25, 0.5, 0.75)
# Weight-only linears whose rows are statically this few run as a fused dequantize-and-reduce
# kernel (decode is memory bound: read int8/int4 weights once); more rows use a GEMM.
GEMV_MAX_ROWS = 8
INT8_MAX = 127


@dataclasses.dataclass
class Linear:
    """One ``linear(x, W, b)`` of the graph whose weight is a real constant."""

    node: torch.fx.Node
    name: str
    weight: torch.Tensor

    @property
    def input(self) -> torch.fx.Node:
        return self.node.args[0]

    @property
    def bias(self) -> torch.fx.Node | None:
        args = self.node.args
        return args[2] if len(args) > 2 else self.node.kwargs.get("bias")


@dataclasses.dataclass
class Group:
    """Linears that read the same activation: they share one quantized input."""

    key: str  # name of the first linear: stable across recompiles of the same model
    input: torch.fx.Node
    linears: list[Linear]

    @property
    def in_features(self) -> int:
        return self.linears[0].weight.shape[1]


def module_name(node: torch.fx.Node) -> str:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return node.name
    path = list(stack.values())[-1][0]
    for prefix in ("L['self'].", "L['self']", "L['mod']."):
        if path.startswith(prefix):
            return path[len(prefix):] or node.name
    return path


def find_groups(
    gm: torch.fx.GraphModule, example_inputs: Sequence[Any], config: QuantizeConfig, report: PassReport
) -> list[Group]:
    """Every eligible linear, grouped by input; what is not eligible is reported with why."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    groups: dict[torch.fx.Node, Group] = {}
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in LINEAR_TARGETS:
            continue
        name = module_name(node)
        weight = _constant(gm, node.args[1], placeholders, example_inputs)
        x = node.args[0]
        x_val = x.meta.get("example_value") if isinstance(x, torch.fx.Node) else None
        reason = None
        if weight is None or weight.dim() != 2:
            reason = "weight is not a constant 2-D parameter"
        elif weight.dtype not in FLOAT_DTYPES:
            reason = f"weight dtype {weight.dtype} is not floating point"
        elif weight.numel() < config.min_weight_size:
            reason = f"weight has {weight.numel()} elements < min_weight_size {config.min_weight_size}"
        elif any(fnmatch.fnmatchcase(name, pattern) for pattern in config.skip):
            reason = "matches a 'skip' pattern"
        elif x_val is None or x_val.dtype not in FLOAT_DTYPES or x_val.dim() < 2:
            reason = "input is not a floating-point tensor of rank >= 2"
        elif isinstance(node.args[2] if len(node.args) > 2 else None, torch.fx.Node) and _constant(
            gm, node.args[2], placeholders, example_inputs
        ) is None:
            reason = "bias is not a constant"
        if reason is not None:
            report.skipped(name, reason)
            continue
        linear = Linear(node, name, weight.detach())
        if x in groups:
            groups[x].linears.append(linear)
        else:
            groups[x] = Group(name, x, [linear])
    return list(groups.values())


def _constant(gm, node, placeholders, example_inputs) -> torch.Tensor | None:
    if not isinstance(node, torch.fx.Node):
        return None
    if node.op == "get_attr":
        value = operator.attrgetter(node.target)(gm)
        return value if isinstance(value, torch.Tensor) else None
    if node.op == "placeholder" and len(placeholders) == len(example_inputs):
        value = example_inputs[placeholders.index(node)]
        if is_weight_input(value):
            return value
    return None


# --------------------------------------------------------------------------------------------
# Scales


@dataclasses.dataclass
class LinearPlan:
    weight: torch.Tensor  # int8 [N, K] (w8a8, int8 weight-only) or packed uint8 [N, K/2] (int4)
    scale: torch.Tensor  # float [N] (epilogue scale) or [N, K/group] (int4)
    error: float | None = None  # mean per-row relative output error on the calibration samples


@dataclasses.dataclass
class GroupPlan:
    multiplier: torch.Tensor | None  # m (w8a8), None for weight-only
    alpha: float | None
    extra_columns: torch.Tensor | None  # source channel of each split copy (w8a8)
    linears: dict[str, LinearPlan]  # the quantized ones; a missing name stays float
    kept_float: dict[str, str]  # name -> why


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output channel: ``weight ~= q * scale[:, None]``."""
    scale = weight.abs().amax(1).clamp(min=1e-12) / INT8_MAX
    q = torch.round(weight / scale[:, None]).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


def quantize_int4_groups(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int4 per ``group_size`` columns, two values per byte (low nibble first)."""
    n, k = weight.shape
    grouped = weight.float().reshape(n, k // group_size, group_size)
    scale = grouped.abs().amax(-1).clamp(min=1e-12) / 7
    q = torch.round(grouped / scale[..., None]).clamp(-8, 7).to(torch.int16) + 8
    q = q.reshape(n, k // 2, 2).to(torch.uint8)
    return (q[..., 0] | (q[..., 1] << 4)).contiguous(), scale


def unpack_int4(packed: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The float weight of :func:`quantize_int4_groups` (also the graph's dequantization)."""
    n = packed.shape[0]
    groups = scale.shape[1]
    nibbles = torch.stack((packed & 15, packed >> 4), dim=-1).reshape(n, groups, -1)
    return ((nibbles.to(dtype) - 8) * scale.to(dtype).unsqueeze(-1)).reshape(n, -1)


def relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    """Mean over rows (tokens) of the row's relative error: a few large rows cannot hide
    small rows that quantization ruins."""
    if exact.dim() == 1:
        return float((approx - exact).norm() / exact.norm().clamp(min=1e-12))
    return float(((approx - exact).norm(dim=-1) / exact.norm(dim=-1).clamp(min=1e-12)).mean())


def plan_w8a8(
    group: Group,
    amax: torch.Tensor,
    samples: torch.Tensor | None,
    config: QuantizeConfig,
    decided: tuple[float, bool, list[str]] | None = None,
) -> GroupPlan:
    """Pick the smoothing strength (and whether to split outlier channels), fold them, and
    keep float any linear beyond the error budget.

    ``decided`` = (alpha, split, names kept float) replays a saved calibration's choices.
    """
    weights = [lin.weight.float() for lin in group.linears]
    x_amax = amax.float().clamp(min=1e-5)
    w_amax = torch.cat(weights).abs().amax(0).clamp(min=1e-5)
    may_split = 0 < config.outlier_channels < x_amax.numel() // 4 and not _is_norm_output(group.input)
    if decided is not None:
        candidates = [(decided[0], decided[1])]
    else:
        alphas = ALPHA_GRID if config.smooth_alpha is None else (config.smooth_alpha,)
        candidates = [(a, split) for a in alphas for split in ((False, True) if may_split else (False,))]
    exact = [samples @ w.t() for w in weights] if samples is not None else None
    best = None
    for alpha, split in candidates:
        smooth = (x_amax.pow(alpha) / w_amax.pow(1 - alpha)).clamp(1e-5, 1e5)
        ranges = x_amax / smooth
        copies = _split_copies(ranges, config.outlier_channels) if split else torch.ones_like(ranges)
        extra = torch.repeat_interleave(torch.arange(ranges.numel(), device=ranges.device), copies.long() - 1)
        step = float((ranges / copies).max()) / INT8_MAX
        multiplier = 1.0 / (smooth * step * copies)
        multiplier = torch.cat([multiplier, multiplier[extra]])
        plans = {}
        for lin, w in zip(group.linears, weights):
            scaled = w * smooth
            wq, w_scale = quantize_rows(torch.cat([scaled, scaled[:, extra]], 1))
            plans[lin.name] = LinearPlan(wq, w_scale * step)
        if exact is not None:
            q = torch.round(torch.cat([samples, samples[:, extra]], 1) * multiplier).clamp(-INT8_MAX, INT8_MAX)
            for plan, y in zip(plans.values(), exact):
                plan.error = relative_error((q @ plan.weight.float().t()) * plan.scale, y)
        worst = max((p.error or 0.0) for p in plans.values())
        if best is None or worst < best[0]:
            best = (worst, alpha, split, multiplier, extra if extra.numel() else None, plans)
    _, alpha, split, multiplier, extra, plans = best
    if decided is not None:
        kept = {name: "kept float by the loaded scales file" for name in decided[2]}
    else:
        kept = {
            name: f"relative error {plan.error:.3g} on the calibration samples > layer_error_budget "
            f"{config.layer_error_budget:g}"
            for name, plan in plans.items()
            if plan.error > config.layer_error_budget
        }
    return GroupPlan(multiplier, alpha, extra, {n: p for n, p in plans.items() if n not in kept}, kept)


def _split_copies(ranges: torch.Tensor, channels: int) -> torch.Tensor:
    """Copies per channel so that no channel's range exceeds the (channels+1)-th largest."""
    top = ranges.topk(channels + 1)
    cap = top.values[-1]
    copies = torch.ones_like(ranges)
    copies[top.indices[:-1]] = torch.ceil(top.values[:-1] / cap)
    return copies


def _is_norm_output(node: torch.fx.Node) -> bool:
    return node.op == "call_function" and node.target in (*LAYER_NORM_TARGETS, *MUL_TARGETS)


def plan_weight_only(group: Group, config: QuantizeConfig) -> GroupPlan:
    plans, kept = {}, {}
    for lin in group.linears:
        w = lin.weight.float()
        if config.mode == "int8_weight_only":
            wq, scale = quantize_rows(w)
            approx = wq.float() * scale[:, None]
        elif w.shape[1] % config.group_size:
            kept[lin.name] = f"in_features {w.shape[1]} is not a multiple of group_size {config.group_size}"
            continue
        else:
            wq, scale = quantize_int4_groups(w, config.group_size)
            approx = unpack_int4(wq, scale, torch.float32)
        plans[lin.name] = LinearPlan(wq, scale, relative_error(approx, w))
    return GroupPlan(None, None, None, plans, kept)


# --------------------------------------------------------------------------------------------
# Graph rewrite


class _Constants:
    def __init__(self, gm: torch.fx.GraphModule):
        self.gm = gm
        self.count = 0

    def add(self, tensor: torch.Tensor, hint: str) -> torch.fx.Node:
        name = f"_zc_quant_{self.count}_{hint}"
        self.count += 1
        self.gm.register_buffer(name, tensor.contiguous())
        node = self.gm.graph.get_attr(name)
        node.meta["example_value"] = tensor
        return node


def build_quantized(
    gm: torch.fx.GraphModule,
    example_inputs: Sequence[Any],
    groups: list[Group],
    plans: dict[str, GroupPlan],
    mode: str,
    report: PassReport,
) -> torch.fx.GraphModule:
    """A copy of ``gm`` with every planned linear replaced by its quantized form."""
    memo: dict[int, Any] = {}
    new = torch.fx.GraphModule(gm, copy.deepcopy(gm.graph, memo))
    by_name = {n.name: n for n in new.graph.nodes}
    constants = _Constants(new)
    for group in groups:
        plan = plans[group.key]
        for name, why in plan.kept_float.items():
            report.skipped(name, f"kept float: {why}")
        if not plan.linears:
            continue
        x = by_name[group.input.name]
        if mode == "w8a8":
            first_user = min(by_name[lin.node.name] for lin in group.linears)  # FX nodes order by position
            with new.graph.inserting_before(first_user):
                q, merged_into = _quantized_input(new, x, plan, constants, example_inputs)
        for lin in group.linears:
            lplan = plan.linears.get(lin.name)
            if lplan is None:
                continue
            node = by_name[lin.node.name]
            bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
            with new.graph.inserting_before(node):
                if mode == "w8a8":
                    out = _int8_linear(new.graph, q, lplan, bias, constants, x.meta["example_value"].dtype)
                    what = (
                        f"w8a8 int8 GEMM (smoothing a={plan.alpha:g} and quantization step merged into "
                        f"{merged_into}; dequantization in the epilogue)"
                        + ("" if lplan.error is None else f", sample error {lplan.error:.2e}")
                    )
                else:
                    out = _weight_only_linear(new.graph, x, lplan, bias, constants, mode)
                    what = f"{mode} (weight error {lplan.error:.2e})"
            node.replace_all_uses_with(out)
            new.graph.erase_node(node)
            report.rewrote(lin.name, what)
    new.graph.eliminate_dead_code()
    new.graph.lint()
    new.recompile()
    return new


def _call(graph: torch.fx.Graph, target: Any, *args: Any, **kwargs: Any) -> torch.fx.Node:
    if isinstance(target, str):
        return graph.call_method(target, args, kwargs)
    return graph.call_function(target, args, kwargs)


def _quantized_input(gm, x, plan, constants, example_inputs) -> tuple[torch.fx.Node, str]:
    """int8 ``clamp(round(x * m))``, with ``m`` folded into x's norm when x comes from one."""
    graph = gm.graph
    multiplier = plan.multiplier
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]

    def norm_constant(node):  # a tensor, None when absent, False when not a constant
        if node is None:
            return None
        value = _constant(gm, node, placeholders, example_inputs)
        return value.detach() if isinstance(value, torch.Tensor) else False

    k = multiplier.numel()
    scaled, merged_into = None, f"the kernel that produces '{x.name}'"
    dtype = x.meta["example_value"].dtype
    if plan.extra_columns is not None:
        k = multiplier.numel() - plan.extra_columns.numel()
        extra = constants.add(plan.extra_columns, "split_idx")
        scaled = _call(graph, torch.cat, [
            _call(graph, operator.mul, x, constants.add(multiplier[:k].to(dtype), "step")),
            _call(graph, operator.mul, _call(graph, torch.index_select, x, -1, extra),
                  constants.add(multiplier[k:].to(dtype), "split_step")),
        ], -1)
        merged_into = f"the kernel that produces '{x.name}', with {plan.extra_columns.numel()} split channels"
    elif x.op == "call_function" and x.target in LAYER_NORM_TARGETS:
        bound = inspect.signature(F.layer_norm).bind(*x.args, **x.kwargs)
        bound.apply_defaults()
        args = bound.arguments
        weight, bias = (norm_constant(args[key]) for key in ("weight", "bias"))
        if tuple(args["normalized_shape"]) == (k,) and weight is not False and bias is not False:
            folded_w = constants.add((multiplier if weight is None else weight.float() * multiplier).to(dtype), "norm_w")
            folded_b = None if bias is None else constants.add((bias.float() * multiplier).to(dtype), "norm_b")
            scaled = _call(graph, F.layer_norm, args["input"], args["normalized_shape"], folded_w, folded_b, args["eps"])
            merged_into = "the LayerNorm weight and bias"
    elif x.op == "call_function" and x.target in MUL_TARGETS:
        for i, operand in enumerate(x.args[:2]):
            value = norm_constant(operand)
            other = x.args[1 - i]
            if isinstance(value, torch.Tensor) and value.shape == (k,) and isinstance(other, torch.fx.Node):
                folded = constants.add((value.float() * multiplier).to(value.dtype), "norm_w")
                scaled = _call(graph, operator.mul, folded, other)
                merged_into = "the RMSNorm weight"
                break
    if scaled is None:
        scaled = _call(graph, operator.mul, x, constants.add(multiplier.to(dtype), "step"))
    rounded = _call(graph, torch.clamp, _call(graph, torch.round, scaled), -INT8_MAX, INT8_MAX)
    return _call(graph, "to", rounded, torch.int8), merged_into


def _flatten_rows(graph, x):
    return _call(graph, "flatten", x, 0, -2)


def _restore_rows(graph, out2d, like):
    lead = _call(graph, operator.getitem, _call(graph, "size", like), slice(None, -1))
    return _call(graph, torch.unflatten, out2d, 0, lead)


def _int8_linear(graph, q, plan, bias, constants, dtype):
    wq = constants.add(plan.weight, "w8")
    scale = constants.add(plan.scale.float(), "scale")
    if plan.weight.device.type == "cuda":
        import zc.codegen.quant_kernels  # noqa: F401  registers torch.ops.zc.w8a8_linear

        out2d = _call(graph, torch.ops.zc.w8a8_linear, _flatten_rows(graph, q), wq, scale, bias, dtype)
    else:
        acc = _call(graph, torch._int_mm, _flatten_rows(graph, q), _call(graph, "t", wq))
        out2d = _call(graph, operator.mul, acc, scale)
        if bias is not None:
            out2d = _call(graph, operator.add, out2d, bias)
        if dtype != torch.float32:
            out2d = _call(graph, "to", out2d, dtype)
    return _restore_rows(graph, out2d, q)


def _weight_only_linear(graph, x, plan, bias, constants, mode):
    x_val = x.meta["example_value"]
    dtype = x_val.dtype
    wq = constants.add(plan.weight, "w8" if mode == "int8_weight_only" else "w4")
    scale = constants.add(plan.scale.to(dtype), "scale")
    if mode == "int8_weight_only":
        weight = _call(graph, "to", wq, dtype)  # the per-channel scale is applied after the GEMM
    else:
        weight = _call(graph, unpack_int4, wq, scale, dtype)
    rows = x_val.shape[:-1].numel() if all(isinstance(d, int) for d in x_val.shape[:-1]) else None
    if rows is not None and rows <= GEMV_MAX_ROWS:
        out = _call(graph, torch.sum, _call(graph, operator.mul, _call(graph, "unsqueeze", x, -2), weight), -1)
    else:
        out = _call(graph, F.linear, x, weight)
    if mode == "int8_weight_only":
        out = _call(graph, operator.mul, out, scale)
    if bias is not None:
        out = _call(graph, operator.add, out, bias)
    return out


# --------------------------------------------------------------------------------------------
# Entry point from the backend


def prepare(
    gm: torch.fx.GraphModule,
    example_inputs: Sequence[Any],
    config: QuantizeConfig,
    compile_graph: Callable[[torch.fx.GraphModule], Callable[..., Any]],
    report: PassReport,
    on_quantized: Callable[[torch.fx.GraphModule], None],
) -> Callable[..., Any] | None:
    """The callable zc returns for ``gm`` with quantization, or ``None`` to compile it as is.

    ``compile_graph(gm)`` compiles a graph with the same inputs as ``gm`` through Inductor (the
    backend keeps Dynamo's context for a compile that happens after calibration).
    """
    from zc.runtime.calibration import Calibration, load_scales, save_scales

    groups = find_groups(gm, example_inputs, config, report)
    if not groups:
        report.status = "skipped"
        report.skipped("graph", "no eligible linear layer (see the skips above)")
        return None
    report.metrics["layers"] = sum(len(g.linears) for g in groups)

    def finish(plans: dict[str, GroupPlan]) -> Callable[..., Any]:
        quantized = build_quantized(gm, example_inputs, groups, plans, config.mode, report)
        report.status = "applied" if report.rewrites else "unchanged"
        report.metrics["quantized_layers"] = len(report.rewrites)
        errors = [p.error for plan in plans.values() for p in plan.linears.values() if p.error is not None]
        if errors:
            report.metrics["max_layer_error"] = max(errors)
        report.metrics["weight_bytes"] = {
            "float": sum(lin.weight.numel() * lin.weight.element_size() for g in groups for lin in g.linears),
            "quantized": sum(
                p.weight.numel() * p.weight.element_size() + p.scale.numel() * p.scale.element_size()
                for plan in plans.values() for p in plan.linears.values()
            ),
        }
        on_quantized(quantized)
        return compile_graph(quantized)

    if config.mode != "w8a8":
        with unset_fake_temporarily():  # real arithmetic on the weights, inside Dynamo's compile
            plans = {g.key: plan_weight_only(g, config) for g in groups}
        return finish(plans)

    def plans_from(calibration: Calibration) -> dict[str, GroupPlan]:
        plans = {}
        with unset_fake_temporarily():  # real arithmetic on the weights, inside Dynamo's compile
            for g in groups:
                stats = calibration.groups[g.key]
                plans[g.key] = plan_w8a8(g, stats.amax, stats.samples(), config, stats.decided)
        if config.save_scales:
            save_scales(config.save_scales, calibration, groups, plans)
            report.metrics["saved_scales"] = config.save_scales
        return plans

    if config.scales:
        with unset_fake_temporarily():
            calibration = load_scales(config.scales, groups)
        report.metrics["scales"] = config.scales
        return finish(plans_from(calibration))
    calibration = Calibration.shared(gm, groups, config)
    if calibration.complete:
        report.metrics["calibration"] = "reused from an earlier graph of the same model"
        return finish(plans_from(calibration))
    return calibration.executor(gm, groups, lambda: finish(plans_from(calibration)), report)
