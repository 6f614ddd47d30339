"""step_cache: reuse a denoiser's deep computation across adjacent diffusion steps.

Dynamo-level pass. The graph is cut into three partitions by position: ``shallow_in`` (run every
step), ``deep`` (computed on some steps, reused on the others) and ``shallow_out`` (run every
step). Where to cut comes from the graph's structure, read from each op's ``nn_module_stack``
(no registry of model classes):

* **UNet skip structure** (DeepCache): ops are grouped into *stages* (``ModuleList`` entries
  inside blocks such as ``down_blocks.0.resnets.1``, else top-level submodules such as
  ``conv_in``; ops written directly in a block's ``forward``, like an up block's skip
  concatenation, are glue that passes on where its inputs came from), ordered by first use. A
  *skip* is a feature map (a tensor of rank >= 3: conditioning vectors do not count) that a stage
  hands to a stage two or more places later. For a stage ``e`` that receives skips, the stages
  strictly between the last stage that sends ``e`` a skip and ``e`` form a cacheable region when
  nothing they compute is used past ``e``. Those regions nest; ``depth`` picks one (1 = the
  outermost: only ``conv_in``, the last up layer and the output layers stay shallow). If no
  layer-level U is found, the same search runs on block-level stages (``down_blocks.0``). The
  deep partition's outputs are reused as they are.
* **Repeated blocks** (DiT / transformer chains): the longest run of consecutive entries of one
  ``ModuleList`` of one module type, each feeding a feature map to the next. The first ``depth``
  blocks run every step; the remaining blocks are the deep partition. When the deep partition
  returns one feature map shaped like its input stream, its *residual* (output - input) is
  cached and added to the new input on reused steps (first-block caching).

On a reused step the deep partition is not run. Whether a step may reuse is decided per call on
the host (:class:`StepCacheExecutor`): a generation starts when the timestep goes up or the
non-weight inputs change shape; the first step of a generation, steps with irregular timestep
spacing, the last step (the timestep is below the spacing, so the next would be below 0) and
generations whose spacing implies fewer than ``min_steps`` steps always compute. Calls repeating
the previous call's timestep are further guidance branches (classifier-free guidance run as two
calls) and keep their own cache. Reading the timestep (and, with ``threshold``, one relative L1
distance) is a host read: free on CPU, one small device-to-host copy per step on a GPU.

``max_error`` computes the whole first generation, replays on it which steps each candidate
threshold would have reused and the relative L1 error that would have put on the deep
partition's outputs, and keeps the largest threshold within budget (a per-step bound on the
cached part, not a bound on the final image).
"""

from __future__ import annotations

import dataclasses
import logging
import re
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx

from zc.config import StepCacheConfig
from zc.fx_passes.pass_manager import PassReport, is_weight_input
from zc.runtime import Executor, split_and_compile

GRAPH_LEVEL = "dynamo"
# The partitions are plain graphs (the cache state lives in the executor, not in compiled code),
# so Inductor's caches stay valid for them.
CACHEABLE = True

log = logging.getLogger("zc")

SHALLOW_IN, DEEP, SHALLOW_OUT = "submod_0", "submod_1", "submod_2"
# Guidance branches kept per timestep: more calls with one timestep than this are not a
# denoising loop and simply compute.
MAX_BRANCHES = 4
# With a threshold and no max_consecutive, at most this many steps in a row reuse.
DEFAULT_MAX_CONSECUTIVE_ADAPTIVE = 4
NO_LIMIT = 1 << 30
# Adjacent timestep spacings further apart than this factor are not one sampler's schedule.
IRREGULAR_SPACING = 2.0
# Thresholds that a max_error calibration simulates (relative L1 change, 0.002 to ~2.5).
CALIBRATION_THRESHOLDS = tuple(0.002 * 1.3 ** i for i in range(28))

_PATH_TOKEN = re.compile(r"\['([^']+)'\]|\.([A-Za-z0-9_]+)|\[(\d+)\]")
_NOT_MODULE_NAMES = {"self", "__dict__", "_modules", "_parameters", "_buffers"}

_live_executors: weakref.WeakSet[StepCacheExecutor] = weakref.WeakSet()


def reset_step_caches() -> None:
    """Forget every cached step of every live step-cache executor (start clean generations)."""
    for executor in list(_live_executors):
        executor.reset()


def step_cache_reports() -> list[dict[str, Any]]:
    """:meth:`StepCacheExecutor.report` of every live step-cache executor."""
    return [executor.report() for executor in list(_live_executors)]


# ---------------------------------------------------------------- structure


Stage = tuple[str, ...]


def module_path(node: torch.fx.Node) -> tuple[str, ...]:
    """The innermost module of ``node`` as names below the root (``('down_blocks', '0', ...)``)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ()
    path = list(stack.values())[-1][0]
    return tuple(
        name for match in _PATH_TOKEN.finditer(path)
        for name in match.groups() if name is not None and name not in _NOT_MODULE_NAMES
    )


def _stage_of(node: torch.fx.Node) -> Stage | None:
    """Block level: the top-level submodule, or the entry of a top-level ``ModuleList``."""
    path = module_path(node)
    if not path:
        return None
    return path[:2] if len(path) > 1 and path[1].isdigit() else path[:1]


def _layer_of(node: torch.fx.Node) -> Stage | None:
    """Layer level: a ``ModuleList`` entry inside a block (``down_blocks.0.resnets.1``).

    Ops written directly in a block's ``forward`` (a UNet up block's skip concatenation) are
    glue, like root-level ops: their inputs' stages are what they pass on.
    """
    path = module_path(node)
    indices = [i for i, name in enumerate(path) if name.isdigit()]
    if len(indices) >= 2:
        return path[:indices[1] + 1]
    if indices and indices[0] == len(path) - 1:
        return None
    return path[:indices[0] + 1] if indices else path[:1] if path else None


def _module_type(node: torch.fx.Node, depth: int) -> Any:
    stack = list((node.meta.get("nn_module_stack") or {}).values())
    return stack[depth - 1][1] if len(stack) >= depth else None


def _rank(node: Any) -> int:
    value = node.meta.get("example_value") if isinstance(node, torch.fx.Node) else None
    return value.dim() if isinstance(value, torch.Tensor) else 0


@dataclasses.dataclass
class Region:
    kind: str  # "unet-skip" | "repeated-blocks"
    stages: list[Stage]  # the deep stages
    start: int  # first and last op position (in graph order) of the deep partition
    end: int
    description: str


class _Graph:
    """Op positions, stages and the feature-map edges between stages of a Dynamo graph."""

    def __init__(self, gm: torch.fx.GraphModule, stage_of: Callable[[torch.fx.Node], Stage | None] = _stage_of):
        self.nodes = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output", "get_attr")]
        self.position = {n: i for i, n in enumerate(self.nodes)}
        self.stage = {n: stage_of(n) for n in self.nodes}
        self.order: list[Stage] = list(dict.fromkeys(s for s in self.stage.values() if s is not None))
        self.index = {s: i for i, s in enumerate(self.order)}
        self.output_index = len(self.order)
        # Per node: the stages its value comes from, each with whether that stage handed on a
        # feature map (rank >= 3). Glue ops at the root pass on what their inputs came from, so
        # a conditioning vector broadcast by a root-level op is still not a feature map.
        producers: dict[torch.fx.Node, frozenset[tuple[int, bool]]] = {}
        for n in gm.graph.nodes:
            if n.op in ("placeholder", "get_attr"):
                producers[n] = frozenset()
            elif n.op != "output" and self.stage[n] is not None:
                producers[n] = frozenset({(self.index[self.stage[n]], _rank(n) >= 3)})
            else:
                producers[n] = frozenset().union(*(producers[a] for a in n.all_input_nodes))
        # (producer stage, consumer stage) -> whether a feature map goes along
        self.edges: dict[tuple[int, int], bool] = {}
        for n in gm.graph.nodes:
            if n.op == "output":
                consumer = self.output_index
            elif n.op in ("placeholder", "get_attr") or self.stage[n] is None:
                continue
            else:
                consumer = self.index[self.stage[n]]
            for arg in n.all_input_nodes:
                for producer, feature in producers[arg]:
                    if producer != consumer:
                        self.edges[(producer, consumer)] = self.edges.get((producer, consumer), False) or feature

    def span(self, stages: Sequence[Stage], before: int | None = None) -> tuple[int, int] | None:
        """First and last position of ops of ``stages`` (only those before position ``before``)."""
        wanted = set(stages)
        positions = [
            self.position[n] for n in self.nodes
            if self.stage[n] in wanted and (before is None or self.position[n] < before)
        ]
        return (min(positions), max(positions)) if positions else None

    def first_position(self, stage: Stage) -> int:
        return min(self.position[n] for n in self.nodes if self.stage[n] == stage)


def find_unet_regions(graph: _Graph) -> list[Region]:
    """Cacheable regions inside the skip levels of a U-shaped graph, outermost first."""
    skips = [(i, j) for (i, j), feature in graph.edges.items() if feature and j >= i + 2 and j < graph.output_index]
    regions = []
    for end in sorted({j for _, j in skips}, reverse=True):
        start = max(i for i, j in skips if j == end)
        inside = range(start + 1, end)
        leaks = [(i, j) for (i, j) in graph.edges if i in inside and j not in inside and j != end]
        feeds_end = any((i, end) in graph.edges for i in inside)
        if leaks or not feeds_end:
            continue
        stages = [graph.order[i] for i in inside]
        span = graph.span(stages, before=graph.first_position(graph.order[end]))
        if span is None:
            continue
        if regions and not (regions[-1].start < span[0] and span[1] < regions[-1].end):
            continue  # not nested inside the previous level: not a U
        names = ", ".join(".".join(s) for s in stages)
        regions.append(Region(
            "unet-skip", stages, *span,
            f"skip level {len(regions) + 1}: between '{'.'.join(graph.order[start])}' and "
            f"'{'.'.join(graph.order[end])}' (deep: {names})",
        ))
    return regions


def find_block_chain(graph: _Graph) -> list[Stage]:
    """The longest run of consecutive, same-type ``ModuleList`` entries chained by feature maps."""
    best: list[Stage] = []
    run: list[Stage] = []

    def block_type(stage: Stage) -> Any:
        node = next(n for n in graph.nodes if graph.stage[n] == stage)
        return _module_type(node, 2) if len(module_path(node)) > 2 else _module_type(node, 1)

    for stage in graph.order:
        chained = (
            run
            and len(stage) == 2
            and stage[0] == run[-1][0]
            and int(stage[1]) == int(run[-1][1]) + 1
            and block_type(stage) == block_type(run[-1])
            and graph.edges.get((graph.index[run[-1]], graph.index[stage]), False)
        )
        if chained:
            run.append(stage)
        else:
            run = [stage] if len(stage) == 2 and stage[1].isdigit() else []
        if len(run) > len(best):
            best = list(run)
    return best if len(best) >= 2 else []


def find_region(gm: torch.fx.GraphModule, depth: int, report: PassReport) -> Region | None:
    # Skip levels between layers (DeepCache's branches: the outermost keeps only the first and
    # last layer in the shallow path), else between blocks; else a chain of repeated blocks.
    unet = find_unet_regions(_Graph(gm, _layer_of)) or find_unet_regions(_Graph(gm))
    graph = _Graph(gm)
    if unet:
        if depth > len(unet):
            report.skipped("graph", f"depth {depth} asked, but the U-shaped graph has {len(unet)} cacheable skip level(s)")
            return None
        return unet[depth - 1]
    blocks = find_block_chain(graph)
    if blocks:
        if depth >= len(blocks):
            report.skipped("graph", f"depth {depth} leaves no block to cache in the chain of {len(blocks)} "
                                    f"'{blocks[0][0]}' blocks")
            return None
        deep = blocks[depth:]
        span = graph.span(deep)
        return Region("repeated-blocks", deep, *span,
                      f"blocks {'.'.join(deep[0])}..{deep[-1][1]} of {len(blocks)} '{blocks[0][0]}' blocks "
                      f"(first {depth} run every step)")
    report.skipped(
        "graph",
        "no cacheable structure: no skip connections around a self-contained inner part (UNet) and "
        "no chain of repeated blocks (nn_module_stack of the Dynamo graph)",
    )
    return None


# ---------------------------------------------------------------- runtime


@dataclasses.dataclass
class DeepIO:
    """Which of the deep partition's inputs is its feature stream, and how to reuse its outputs."""

    stream_input: int | None  # index among the deep partition's arguments
    residual_output: int | None  # index among its outputs, when reused as a residual
    outputs_tuple: bool


@dataclasses.dataclass
class _Branch:
    outputs: Any = None  # the deep partition's outputs (residual replacing the stream output)
    reference: torch.Tensor | None = None  # its stream input at the last computed step
    computed_step: int = -1
    computed_timestep: float = 0.0
    # forecast "linear": per output, its change per unit of timestep between the last two
    # computed steps (None until two were computed, or for non-float outputs)
    slopes: list[torch.Tensor | None] | None = None
    reused_in_a_row: int = 0


@dataclasses.dataclass
class _Generation:
    shapes: tuple
    timestep: float
    first_timestep: float
    step: int = 0
    spacing: float | None = None
    branch: int = 0
    regular: bool = True
    branches: dict[int, _Branch] = dataclasses.field(default_factory=dict)
    plan: frozenset[int] | None = None  # non-uniform schedule: the steps that compute


def computed_steps(total: int, interval: int, power: float) -> frozenset[int]:
    """The steps of a ``total``-step generation that compute the deep partition under a
    non-uniform schedule: ``ceil(total / interval)`` steps at ``round((total - 1) * (j / K) ** power)``
    (``power`` > 1 computes more often early, at high noise), and always the last step."""
    count = max(1, -(-total // interval))
    return frozenset(round((total - 1) * (j / count) ** power) for j in range(count)) | {total - 1}


def _relative_l1(actual: torch.Tensor, reference: torch.Tensor) -> float:
    return float((actual - reference).abs().mean() / reference.abs().mean().clamp_min(1e-12))


class _Calibration:
    """For ``max_error``: a generation computed at every step replays, for each candidate
    threshold, which steps it would have reused and the relative L1 error that reuse would have
    put on the deep partition's outputs; the largest threshold within budget wins."""

    def __init__(self, residual_output: int | None, outputs_tuple: bool, max_consecutive: int):
        self.residual_output = residual_output
        self.outputs_tuple = outputs_tuple
        self.max_consecutive = max_consecutive
        self.reference: dict[float, tuple[torch.Tensor, list[torch.Tensor]] | None] = dict.fromkeys(CALIBRATION_THRESHOLDS)
        self.reused = dict.fromkeys(CALIBRATION_THRESHOLDS, 0)
        self.worst = dict.fromkeys(CALIBRATION_THRESHOLDS, 0.0)
        self.steps = 0

    def observe(self, stream: torch.Tensor, outputs: Any) -> None:
        outputs = list(outputs) if self.outputs_tuple else [outputs]
        changes: dict[int, float] = {}
        for threshold, reference in self.reference.items():
            if reference is not None and self.reused[threshold] < self.max_consecutive:
                ref_stream, ref_outputs = reference
                if id(ref_stream) not in changes:
                    changes[id(ref_stream)] = _relative_l1(stream, ref_stream)
                if changes[id(ref_stream)] < threshold:
                    predicted = list(ref_outputs)
                    if self.residual_output is not None:
                        predicted[self.residual_output] = stream + (ref_outputs[self.residual_output] - ref_stream)
                    error = max(_relative_l1(p, a) for p, a in zip(predicted, outputs) if isinstance(a, torch.Tensor))
                    self.worst[threshold] = max(self.worst[threshold], error)
                    self.reused[threshold] += 1
                    continue
            self.reference[threshold] = (stream, outputs)
            self.reused[threshold] = 0
        self.steps += 1

    def choose(self, max_error: float) -> tuple[float, float]:
        """(threshold, its worst simulated error); threshold 0 (never reuse) if none fits."""
        fitting = [t for t in CALIBRATION_THRESHOLDS if self.worst[t] <= max_error]
        # the largest threshold below the first one over budget: errors need not be monotonic
        over = [t for t in CALIBRATION_THRESHOLDS if self.worst[t] > max_error]
        fitting = [t for t in fitting if not over or t < over[0]]
        return (fitting[-1], self.worst[fitting[-1]]) if fitting else (0.0, 0.0)


class StepCacheExecutor(Executor):
    """Runs the three partitions; on each call decides whether the deep one may be reused.

    State is per model (the address of its first weight, since Dynamo may serve two instances of
    one class with one graph) and per guidance branch, in ``self.state`` (reset with
    :meth:`reset`); counters: ``calls``, ``deep_computed``, ``deep_reused``, ``generations``.
    """

    def __init__(self, config: StepCacheConfig, timestep_index: int, data_indices: list[int], io: DeepIO):
        super().__init__()
        self.config = config
        self.timestep_index = timestep_index
        self.data_indices = data_indices
        self.io = io
        self.partitioned = None  # set by prepare (the policy needs this object first)
        self.adaptive = config.threshold is not None or config.max_error is not None
        self.max_consecutive = (
            config.max_consecutive if config.max_consecutive is not None
            else DEFAULT_MAX_CONSECUTIVE_ADAPTIVE if self.adaptive
            else config.interval - 1 if config.schedule_power == 1.0
            else NO_LIMIT  # a non-uniform schedule's gaps are its own
        )
        # With max_error, the threshold comes from the first full generation (kept by reset()).
        self.threshold = config.threshold
        self.calibration = (
            _Calibration(io.residual_output, io.outputs_tuple, self.max_consecutive)
            if config.max_error is not None else None
        )
        self.calibrated: dict[str, float] = {}
        self._weight_index: int | None = None
        self._branch: _Branch | None = None
        self._may_reuse = False
        self._calibrating = False
        self._step, self._timestep = 0, 0.0
        self.linear_forecast = config.forecast == "linear"
        _live_executors.add(self)

    def __call__(self, *args: Any) -> Any:
        self.state.counters["calls"] += 1
        self._begin(args)
        return self.partitioned(*args)

    def reset(self) -> None:
        super().reset()
        self.partitioned.state.reset()

    def report(self) -> dict[str, Any]:
        return {**super().report(), "partition_calls": dict(self.partitioned.state.counters),
                "max_consecutive": self.max_consecutive, "threshold": self.threshold, **self.calibrated}

    # The decision of one call, before any partition runs.
    def _begin(self, args: Sequence[Any]) -> None:
        if self._weight_index is None:
            self._weight_index = next((i for i, a in enumerate(args) if is_weight_input(a)), -1)
        model = args[self._weight_index].data_ptr() if self._weight_index >= 0 else 0
        timesteps = args[self.timestep_index]
        shapes = tuple(tuple(args[i].shape) for i in self.data_indices)
        self._branch, self._may_reuse = None, False
        flat = timesteps.reshape(-1)
        if flat.numel() == 0 or (flat.numel() > 1 and not bool((flat == flat[0]).all())):
            return  # one timestep per sample differing: not a sampling loop
        t = float(flat[0])
        gen: _Generation | None = self.state.get(model)
        if gen is None or gen.shapes != shapes or t > gen.timestep:
            if self.calibration is not None:
                if self.calibration.steps >= max(self.config.min_steps, 2):
                    self._finish_calibration()
                else:  # too short to calibrate on: start over with the next generation
                    self.calibration = _Calibration(self.io.residual_output, self.io.outputs_tuple, self.max_consecutive)
            gen = self.state[model] = _Generation(shapes, t, t)
            self.state.counters["generations"] += 1
        elif t == gen.timestep:
            gen.branch += 1
        else:
            spacing = gen.timestep - t
            if gen.spacing is not None and not (
                gen.spacing / IRREGULAR_SPACING <= spacing <= gen.spacing * IRREGULAR_SPACING
            ):
                gen.regular = False  # once irregular, this generation computes every step
            gen.spacing, gen.timestep, gen.branch = spacing, t, 0
            gen.step += 1
        if gen.branch >= MAX_BRANCHES:
            return
        self._branch = gen.branches.setdefault(gen.branch, _Branch())
        self._step, self._timestep = gen.step, t
        self._calibrating = self.calibration is not None and gen.branch == 0 and gen.regular
        if self.calibration is not None or gen.spacing is None or not gen.regular or self._branch.outputs is None:
            return
        estimated_steps = gen.first_timestep / gen.spacing + 1
        last_step = t < gen.spacing  # the next timestep would be below 0
        if estimated_steps < self.config.min_steps or last_step:
            return
        if self._branch.reused_in_a_row >= self.max_consecutive:
            return
        if not self.adaptive:
            if self.config.schedule_power != 1.0:
                if gen.plan is None:
                    gen.plan = computed_steps(round(estimated_steps), self.config.interval, self.config.schedule_power)
                if gen.step in gen.plan:
                    return
            elif gen.step - self._branch.computed_step >= self.config.interval:
                return
        self._may_reuse = True

    def _finish_calibration(self) -> None:
        self.threshold, worst = self.calibration.choose(self.config.max_error)
        self.calibrated = {"calibrated_on_steps": self.calibration.steps, "calibrated_worst_error": worst}
        if self.threshold == 0.0:
            log.warning("zc step_cache: no threshold keeps the deep partition's error under max_error=%g; "
                        "computing every step", self.config.max_error)
        log.info("zc step_cache: max_error %g -> threshold %.4g (simulated worst relative L1 error %.4g)",
                 self.config.max_error, self.threshold, worst)
        self.calibration = None

    def policy(self, name: str, inputs: tuple, run: Callable[[], Any], state) -> Any:
        if name != DEEP:
            return run()
        branch, io = self._branch, self.io
        stream = inputs[io.stream_input] if io.stream_input is not None else None
        if self._may_reuse and self.adaptive:
            self._may_reuse = _relative_l1(stream, branch.reference) < self.threshold
        if self._may_reuse:
            branch.reused_in_a_row += 1
            self.state.counters["deep_reused"] += 1
            if io.residual_output is None and branch.slopes is None:
                return branch.outputs
            outputs = list(branch.outputs) if io.outputs_tuple else [branch.outputs]
            if branch.slopes is not None:
                distance = self._timestep - branch.computed_timestep
                outputs = [out if slope is None else torch.add(out, slope, alpha=distance)
                           for out, slope in zip(outputs, branch.slopes)]
            if io.residual_output is not None:
                outputs[io.residual_output] = stream + outputs[io.residual_output]
            return tuple(outputs) if io.outputs_tuple else outputs[0]
        outputs = run()
        self.state.counters["deep_computed"] += 1
        if self.calibration is not None and self._calibrating:
            self.calibration.observe(stream, outputs)
        if branch is not None:
            cached = list(outputs) if io.outputs_tuple else [outputs]
            if io.residual_output is not None:
                cached[io.residual_output] = cached[io.residual_output] - stream
            previous = branch.outputs
            if self.linear_forecast and previous is not None and self._timestep != branch.computed_timestep:
                previous = list(previous) if io.outputs_tuple else [previous]
                distance = self._timestep - branch.computed_timestep
                branch.slopes = [
                    (new - old) / distance
                    if isinstance(new, torch.Tensor) and new.is_floating_point() and new.dim() >= 3 else None
                    for new, old in zip(cached, previous)
                ]
            branch.reused_in_a_row = 0
            branch.computed_step, branch.computed_timestep = self._step, self._timestep
            branch.reference = stream
            branch.outputs = tuple(cached) if io.outputs_tuple else cached[0]
        return outputs


# ---------------------------------------------------------------- the pass


def _find_timestep(gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> int | None:
    """The input that feeds the sinusoidal timestep projection (a non-weight tensor of rank <= 1)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    candidates = []
    for index, (node, value) in enumerate(zip(placeholders, example_inputs)):
        if not isinstance(value, torch.Tensor) or is_weight_input(value) or value.dim() > 1:
            continue
        seen, frontier = set(), [node]
        for _ in range(12):  # a timestep reaches sin / cos within a few ops
            frontier = [u for n in frontier for u in n.users if u not in seen]
            seen.update(frontier)
        if any(getattr(n.target, "__name__", "") in ("sin", "cos") for n in seen):
            candidates.append(index)
    return candidates[0] if len(candidates) == 1 else None


def _deep_io(gm: torch.fx.GraphModule, region: Region, submodule: torch.fx.GraphModule) -> DeepIO:
    nodes = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output", "get_attr")]
    inside = set(nodes[region.start:region.end + 1])
    stream_candidates = [
        n for n in nodes[:region.start] if _rank(n) >= 3 and any(u in inside for u in n.users)
    ]
    stream = stream_candidates[-1] if stream_candidates else None
    arg_names = [n.name for n in submodule.graph.nodes if n.op == "placeholder"]
    stream_input = arg_names.index(stream.name) if stream is not None and stream.name in arg_names else None
    output = next(n for n in submodule.graph.nodes if n.op == "output").args[0]
    outputs_tuple = isinstance(output, (tuple, list))
    output_nodes = list(output) if outputs_tuple else [output]
    residual_output = None
    # A block chain's remaining blocks add a residual to their input stream (first-block
    # caching reuses that residual); a UNet's inner part is reused as is (DeepCache).
    if stream_input is not None and region.kind == "repeated-blocks":
        shaped_like_stream = [
            i for i, out in enumerate(output_nodes)
            if isinstance(out, torch.fx.Node) and _rank(out) >= 3
            and _shape(out) == _shape(stream)
        ]
        features = [i for i, out in enumerate(output_nodes) if isinstance(out, torch.fx.Node) and _rank(out) >= 3]
        if len(shaped_like_stream) == 1 and len(features) == 1:
            residual_output = shaped_like_stream[0]
    return DeepIO(stream_input, residual_output, outputs_tuple)


def _shape(node: torch.fx.Node) -> tuple | None:
    value = node.meta.get("example_value", node.meta.get("val"))
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None


def prepare(
    gm: torch.fx.GraphModule,
    example_inputs: Sequence[Any],
    config: StepCacheConfig,
    compile_rest: Callable[..., Callable[..., Any]],
    report: PassReport,
    on_rewritten: Callable[[torch.fx.GraphModule], None],
) -> Callable[..., Any] | None:
    if config.interval == 1 and config.threshold is None and config.max_error is None:
        report.status = "unchanged"
        report.skipped("graph", "interval 1 without a threshold computes every step: nothing to cache")
        return None
    timestep_index = _find_timestep(gm, example_inputs)
    if timestep_index is None:
        report.status = "skipped"
        report.skipped("graph", "no single timestep input (a non-weight tensor of rank <= 1 feeding sin/cos)")
        return None
    region = find_region(gm, config.depth, report)
    if region is None:
        report.status = "skipped"
        return None

    nodes = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output", "get_attr")]
    position = {n: i for i, n in enumerate(nodes)}

    def assign(node: torch.fx.Node) -> int:
        where = position[node]
        return 0 if where < region.start else 1 if where <= region.end else 2

    data_indices = [
        i for i, x in enumerate(example_inputs) if isinstance(x, torch.Tensor) and not is_weight_input(x)
    ]
    partitions: dict[str, torch.fx.GraphModule] = {}
    built: dict[str, DeepIO] = {}

    def compile_partition(submodule: torch.fx.GraphModule, inputs: list[Any]) -> Callable[..., Any]:
        name = f"submod_{len(partitions)}"
        partitions[name] = submodule
        if name == DEEP:
            built["io"] = _deep_io(gm, region, submodule)
        on_rewritten(submodule)
        return compile_rest(submodule, inputs)

    # The policy is the executor's method, and the executor needs the deep partition's wiring,
    # known only once split: route through a holder.
    holder: dict[str, StepCacheExecutor] = {}
    partitioned = split_and_compile(
        gm, example_inputs, assign, compile_partition,
        policy=lambda *a: holder["executor"].policy(*a),
    )
    if DEEP not in partitioned.partitions or SHALLOW_OUT not in partitioned.partitions:
        raise RuntimeError(f"step_cache: expected 3 partitions, got {sorted(partitioned.partitions)}")
    io = built["io"]
    if (config.threshold is not None or config.max_error is not None) and io.stream_input is None:
        report.status = "skipped"
        report.skipped("graph", "threshold mode needs a feature map entering the deep partition; none found")
        return None
    executor = StepCacheExecutor(config, timestep_index, data_indices, io)
    executor.partitioned = partitioned
    holder["executor"] = executor

    sizes = {name: sum(1 for n in partitions[name].graph.nodes if n.op == "call_function") for name in (SHALLOW_IN, DEEP, SHALLOW_OUT)}
    report.rewrote(".".join(region.stages[0]), f"{region.kind}: {region.description}")
    report.metrics.update({
        "structure": region.kind,
        "deep_stages": [".".join(s) for s in region.stages],
        "ops": {"shallow_in": sizes[SHALLOW_IN], "deep": sizes[DEEP], "shallow_out": sizes[SHALLOW_OUT]},
        "reuse": "residual" if io.residual_output is not None else "output",
        "mode": (f"threshold {config.threshold}" if config.threshold is not None
                 else f"max_error {config.max_error} (threshold calibrated on the first generation)"
                 if config.max_error is not None else f"interval {config.interval}"),
        "max_consecutive": executor.max_consecutive,
        "decision": "on the host: reads the timestep each call (one scalar device-to-host copy per step on GPU)",
    })
    log.info("zc step_cache: %s, deep partition %d of %d ops, reuse %s", region.description, sizes[DEEP],
             sum(sizes.values()), report.metrics["reuse"])
    return executor
