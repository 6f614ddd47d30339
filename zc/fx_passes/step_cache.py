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

On a reused step the deep partition is not run: its outputs from the last computed step are
returned as they are (``forecast="reuse"``, DeepCache) or extrapolated linearly in the timestep
from the last two computed steps (``forecast="linear"``, TaylorSeer's first order: one fused
multiply-add per output). Whether a step may reuse is decided per call on the host
(:class:`StepCacheExecutor`): a generation starts when the timestep goes up or the non-weight
inputs change shape; the first step of a generation, steps with irregular timestep spacing, the
last step (the timestep is below the spacing, so the next would be below 0) and generations
whose spacing implies fewer than ``min_steps`` steps always compute; ``interval`` (with
``schedule_power`` != 1: a non-uniform plan, denser early) or ``threshold`` pick the others.
Calls repeating the previous call's timestep are further guidance branches (classifier-free
guidance run as two calls) and keep their own cache. Reading the timestep (and, with
``threshold``, one relative L1 distance) is a host read: free on CPU, one small device-to-host
copy per step on a GPU.

The sampler is invisible to the model, but its steps are not: the latents the model gets at step
k+1 are, for a deterministic sampler, a linear function of the latents and outputs of steps k
and k-1 (DDIM, DPM-Solver, Euler; fitted by least squares over the elements). At the second step
of each generation that fit is checked on the first step (``sampler_check``): a sampler that
injects noise (DDPM, DDIM with eta > 0, ancestral) leaves a residual the size of its noise, and
that generation computes every step. ``max_error`` uses the same fits to replay the first
generation (computed in full) under each candidate interval, and keeps the largest whose latents
entering the last step stay within the budget (relative L2).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import re
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx

from zc.config import STEP_CACHE_FORECASTS, StepCacheConfig
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
# Intervals a max_error calibration replays.
MAX_ERROR_INTERVALS = (2, 3, 4, 5, 6, 7, 8)
# A sampler step whose next latent a linear fit of the last latents and model outputs misses by
# more than this (relative L2) injects noise: far above fp rounding (~1e-6, or ~1e-3 in fp16),
# far below DDPM's or ancestral samplers' noise (~0.1 to 0.5 of the latent at the first step).
SAMPLER_FIT_TOLERANCE = 1e-2

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
        if len({stage[0] for stage in stages}) < 2:
            # A U goes down one module list and comes back up another. A "skip" whose inside
            # is one module list (a transformer's blocks, with the patch embedding reaching
            # the output layers) or one block (a feed-forward inside a transformer block) is
            # a residual around repeated blocks: those are cached as a block chain instead.
            continue
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
    # forecast "quadratic": Newton's second divided differences over the last three computed
    # steps, and the timestep of the one before the last
    curvatures: list[torch.Tensor | None] | None = None
    previous_timestep: float = 0.0
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
    plans: dict[int, frozenset[int]] = dataclasses.field(default_factory=dict)  # per interval: computed steps
    calibrating: bool = False  # max_error: this generation computes every step and replays candidates
    first_step: list[torch.Tensor] = dataclasses.field(default_factory=list)  # sampler check: latent, outputs


def computed_steps(total: int, interval: int, power: float) -> frozenset[int]:
    """The steps of a ``total``-step generation that compute the deep partition under a
    non-uniform schedule: ``ceil(total / interval)`` steps at ``round((total - 1) * (j / K) ** power)``
    (``power`` > 1 computes more often early, at high noise), and always the last step."""
    count = max(1, -(-total // interval))
    return frozenset(round((total - 1) * (j / count) ** power) for j in range(count)) | {total - 1}


def _relative_l1(actual: torch.Tensor, reference: torch.Tensor) -> float:
    return float((actual - reference).abs().mean() / reference.abs().mean().clamp_min(1e-12))


def _relative_l2(actual: torch.Tensor, reference: torch.Tensor) -> float:
    return float((actual.double() - reference.double()).norm() / reference.double().norm().clamp_min(1e-30))


def _batched_guidance(latent: torch.Tensor) -> bool:
    """Whether the two halves of the batch are the same latents (guidance batched in one call)."""
    half = latent.shape[0] // 2
    return latent.shape[0] % 2 == 0 and half > 0 and torch.equal(latent[:half], latent[half:])


def _step_regressors(latent: torch.Tensor, outputs: Sequence[torch.Tensor], batched_guidance: bool) -> list[torch.Tensor]:
    """What a deterministic first- or second-order sampler's next latent is a linear function of,
    from one step: its latent and the model's outputs (one per guidance branch). Guidance batched
    in one call mixes the outputs' halves, so their mean and half-difference, repeated over both
    halves, are regressors too."""
    regressors = [latent, *outputs]
    half = latent.shape[0] // 2
    if batched_guidance:
        for out in outputs:
            mean, difference = (out[:half] + out[half:]) / 2, (out[half:] - out[:half]) / 2
            regressors += [torch.cat([mean, mean]), torch.cat([difference, difference])]
    return regressors


def fit_sampler_step(target: torch.Tensor, regressors: Sequence[torch.Tensor]) -> tuple[torch.Tensor, float]:
    """Least-squares coefficients of ``target`` (the next latent) over ``regressors``, and the
    relative L2 residual. Measured on the first step of a 12-step run of a small random UNet:
    about 5e-8 for DDIM (eta 0, no clipping), Euler, DPM-Solver++(2M) and UniPC; the size of the
    injected noise for stochastic samplers (DDPM 0.6, DDIM eta 1 0.3 to 0.6, Euler ancestral 0.3,
    DDIM eta 0.1 0.14). Fitting later steps over the last two steps: up to 2e-4
    (DPM-Solver++(2M)) and 9e-4 (UniPC), not exact but close; DDIM's ``clip_sample`` on the
    trained digit UNet 3e-3 to 8e-3."""
    columns = torch.stack([r.reshape(-1).double() for r in regressors], 1)
    wanted = target.reshape(-1).double()
    coefficients = torch.linalg.pinv(columns.T @ columns) @ (columns.T @ wanted)
    residual = wanted - columns @ coefficients
    return coefficients, float(residual.norm() / wanted.norm().clamp_min(1e-30))


def _propagate(latent: torch.Tensor, coefficients: torch.Tensor, replayed: Sequence[torch.Tensor],
               computed: Sequence[torch.Tensor]) -> torch.Tensor:
    """A replayed run's next latent: the computed run's, moved by the fitted step applied to the
    difference of their regressors (so a replay that differs in nothing equals it exactly)."""
    moved = latent.double()
    for c, mine, theirs in zip(coefficients.tolist(), replayed, computed):
        moved = moved + c * (mine.double() - theirs.double())
    return moved.to(latent.dtype)


@dataclasses.dataclass
class _Shadow:
    """One candidate interval replayed alongside the calibration generation."""

    interval: int
    branch: _Branch
    latent: torch.Tensor
    history: list[tuple[torch.Tensor, list[torch.Tensor]]]  # (latent, [output]) of the last steps
    error: float = 0.0  # relative L2 error of its latent vs the computed run's, at the last step


class _ShadowCalibration:
    """For ``max_error``: the first generation computes every step (its results are exact) and,
    alongside, replays the generation under each candidate interval (with the configured
    forecast and schedule). The sampler is not visible to the model, so each step of it is
    fitted as a linear function of the last two steps' latents and outputs (exact for DDIM and
    Euler, close for DPM-Solver++(2M) and UniPC: see :func:`fit_sampler_step`), and each
    candidate's latents are moved by that fit applied to their difference from the computed
    run's, then run through the cached model. The chosen interval is the largest
    whose latent at the last step (what the sampler turns into the image) stays within
    ``max_error`` (relative L2) of the computed one, it and every smaller candidate."""

    def __init__(self, candidates: Sequence[int]):
        self.candidates = list(candidates)
        self.batched_guidance = False
        self.shadows: list[_Shadow] = []
        self.history: list[tuple[torch.Tensor, list[torch.Tensor]]] = []
        self.steps = 0
        self.failed: str | None = None
        self.worst_fit = 0.0

    def regressors(self, history: Sequence[tuple[torch.Tensor, list[torch.Tensor]]]) -> list[torch.Tensor]:
        return [r for latent, outputs in history for r in _step_regressors(latent, outputs, self.batched_guidance)]

    def choose(self, max_error: float) -> int:
        chosen = 1
        for shadow in sorted(self.shadows, key=lambda s: s.interval):
            if shadow.error > max_error:
                break
            chosen = shadow.interval
        return chosen


class StepCacheExecutor(Executor):
    """Runs the three partitions; on each call decides whether the deep one may be reused.

    State is per model (the address of its first weight, since Dynamo may serve two instances of
    one class with one graph) and per guidance branch, in ``self.state`` (reset with
    :meth:`reset`); counters: ``calls``, ``deep_computed``, ``deep_reused``, ``generations``,
    ``stochastic_generations``.
    """

    def __init__(self, config: StepCacheConfig, timestep_index: int, data_indices: list[int], io: DeepIO,
                 latent_input: int | None = None, noise_output: int | None = None):
        super().__init__()
        self.config = config
        self.timestep_index = timestep_index
        self.data_indices = data_indices
        self.io = io
        # the sampler's latent among the inputs, and the output shaped like it (None: unknown)
        self.latent_input, self.noise_output = latent_input, noise_output
        self.partitioned = None  # set by prepare (the policy needs this object first)
        self.adaptive = config.threshold is not None
        self.threshold = config.threshold
        # With max_error, the interval comes from the first full generation (kept by reset()).
        self.interval = config.interval
        self.calibration = _ShadowCalibration(MAX_ERROR_INTERVALS) if config.max_error is not None else None
        self.calibrated: dict[str, Any] = {}
        self.forecast_order = STEP_CACHE_FORECASTS.index(config.forecast)  # reuse 0, linear 1, quadratic 2
        self._weight_index: int | None = None
        self._branch: _Branch | None = None
        self._may_reuse = False
        self._shadowing = False
        self._step, self._timestep = 0, 0.0
        _live_executors.add(self)

    @property
    def max_consecutive(self) -> int:
        return self._max_consecutive(self.interval)

    def _max_consecutive(self, interval: int) -> int:
        if self.config.max_consecutive is not None:
            return self.config.max_consecutive
        if self.adaptive:
            return DEFAULT_MAX_CONSECUTIVE_ADAPTIVE
        return interval - 1 if self.config.schedule_power == 1.0 else NO_LIMIT  # a schedule's gaps are its own

    def __call__(self, *args: Any) -> Any:
        self.state.counters["calls"] += 1
        gen = self._begin(args)
        outputs = self.partitioned(*args)
        if gen is not None and self._branch is not None and self.noise_output is not None:
            if self.calibration is not None and gen.calibrating:
                # the replays run the partitions again, which may reuse their output buffers
                outputs = tuple(o.clone() if isinstance(o, torch.Tensor) else o for o in outputs)
                self._calibrate(gen, args, outputs)
            elif gen.step == 0 and self.config.sampler_check:
                # a copy: another guidance branch's call may reuse the partitions' output buffers
                gen.first_step.append(outputs[self.noise_output].clone())
        return outputs

    def reset(self) -> None:
        super().reset()
        self.partitioned.state.reset()

    def report(self) -> dict[str, Any]:
        return {**super().report(), "partition_calls": dict(self.partitioned.state.counters),
                "interval": self.interval, "max_consecutive": self.max_consecutive, "threshold": self.threshold,
                **self.calibrated}

    # The decision of one call, before any partition runs.
    def _begin(self, args: Sequence[Any]) -> _Generation | None:
        if self._weight_index is None:
            self._weight_index = next((i for i, a in enumerate(args) if is_weight_input(a)), -1)
        model = args[self._weight_index].data_ptr() if self._weight_index >= 0 else 0
        timesteps = args[self.timestep_index]
        shapes = tuple(tuple(args[i].shape) for i in self.data_indices)
        self._branch, self._may_reuse = None, False
        values = timesteps.reshape(-1).tolist()  # the one host read of a call (a GPU sync where t is on it)
        if not values or any(v != values[0] for v in values):
            return None  # one timestep per sample differing: not a sampling loop
        t = float(values[0])
        gen: _Generation | None = self.state.get(model)
        if gen is None or gen.shapes != shapes or t > gen.timestep:
            if self.calibration is not None and self.calibration.steps:
                self._finish_calibration()
            gen = self.state[model] = _Generation(shapes, t, t)
            gen.calibrating = self.calibration is not None and self.noise_output is not None
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
            if gen.step == 1 and len(gen.first_step) > 1:
                self._check_sampler(gen, args[self.latent_input])
        if gen.branch >= MAX_BRANCHES:
            return None
        if (gen.step == 0 and gen.branch == 0 and not gen.calibrating and self.latent_input is not None
                and self.config.sampler_check):
            gen.first_step = [args[self.latent_input].clone()]
        self._branch = gen.branches.setdefault(gen.branch, _Branch())
        self._step, self._timestep = gen.step, t
        if gen.calibrating:
            return gen  # the calibration generation computes every step
        self._may_reuse = self._reuse_allowed(gen, self._branch, self.interval)
        return gen

    def _reuse_allowed(self, gen: _Generation, branch: _Branch, interval: int) -> bool:
        """Whether this step may reuse the deep partition (adaptive mode: before its threshold test)."""
        if gen.spacing is None or not gen.regular or branch.outputs is None or interval <= 1 and not self.adaptive:
            return False
        estimated_steps = gen.first_timestep / gen.spacing + 1
        last_step = gen.timestep < gen.spacing  # the next timestep would be below 0
        if estimated_steps < self.config.min_steps or last_step:
            return False
        if branch.reused_in_a_row >= self._max_consecutive(interval):
            return False
        if self.adaptive:
            return True
        if self.config.schedule_power != 1.0:
            if interval not in gen.plans:
                gen.plans[interval] = computed_steps(round(estimated_steps), interval, self.config.schedule_power)
            return gen.step not in gen.plans[interval]
        return gen.step - branch.computed_step < interval

    def _check_sampler(self, gen: _Generation, latent: torch.Tensor) -> None:
        """At the second step: was the first a deterministic linear step? If not, the sampler
        injects noise (or is not one we know) and this generation computes every step."""
        first_latent = gen.first_step[0]
        _, residual = fit_sampler_step(
            latent, _step_regressors(first_latent, gen.first_step[1:], _batched_guidance(first_latent)))
        gen.first_step = []
        if residual > SAMPLER_FIT_TOLERANCE:
            gen.regular = False
            self.state.counters["stochastic_generations"] += 1
            if self.state.counters["stochastic_generations"] == 1:
                log.warning("zc step_cache: the sampler's first step is not a deterministic function of the "
                            "model's input and output (relative residual %.3g; noise injected, as by DDPM or "
                            "DDIM with eta > 0?): computing every step of such generations "
                            "(step_cache.sampler_check=False caches anyway)", residual)

    def _calibrate(self, gen: _Generation, args: Sequence[Any], outputs: Sequence[Any]) -> None:
        calibration = self.calibration
        if calibration.failed is not None:
            return
        if gen.branch > 0 or not gen.regular:
            calibration.failed = ("guidance called as separate model calls" if gen.branch > 0
                                  else "irregular timesteps")
            return
        latent, noise = args[self.latent_input], outputs[self.noise_output]
        if gen.step == 0:
            calibration.batched_guidance = _batched_guidance(latent)
            calibration.history = [(latent, [noise])]
            calibration.shadows = [
                _Shadow(interval, dataclasses.replace(self._branch), latent, [(latent, [noise])])
                for interval in calibration.candidates
            ]
            calibration.steps = 1
            return
        coefficients, residual = fit_sampler_step(latent, calibration.regressors(calibration.history))
        calibration.worst_fit = max(calibration.worst_fit, residual)
        if residual > SAMPLER_FIT_TOLERANCE:
            calibration.failed = f"the sampler step is not a deterministic linear step (relative residual {residual:.3g})"
            return
        real_branch, counters = self._branch, dict(self.partitioned.state.counters)
        self._shadowing = True
        try:
            for shadow in calibration.shadows:
                shadow.latent = _propagate(latent, coefficients, calibration.regressors(shadow.history),
                                           calibration.regressors(calibration.history))
                shadow.error = _relative_l2(shadow.latent, latent)
                self._branch = shadow.branch
                self._may_reuse = self._reuse_allowed(gen, shadow.branch, shadow.interval)
                shadow_args = list(args)
                shadow_args[self.latent_input] = shadow.latent
                shadow_noise = self.partitioned(*shadow_args)[self.noise_output].clone()
                shadow.history = [*shadow.history[-1:], (shadow.latent, [shadow_noise])]
        finally:
            self._shadowing, self._branch, self._may_reuse = False, real_branch, False
            self.partitioned.state.counters.clear()
            self.partitioned.state.counters.update(counters)
        calibration.history = [*calibration.history[-1:], (latent, [noise])]
        calibration.steps += 1

    def _finish_calibration(self) -> None:
        calibration, budget = self.calibration, self.config.max_error
        if calibration.failed is None and calibration.steps < max(self.config.min_steps, 2):
            self.calibration = _ShadowCalibration(MAX_ERROR_INTERVALS)  # too short: try the next generation
            return
        self.interval = 1 if calibration.failed is not None else calibration.choose(budget)
        self.calibrated = {
            "calibrated_on_steps": calibration.steps,
            "calibrated_errors": {s.interval: s.error for s in calibration.shadows},
            "calibration_failed": calibration.failed,
        }
        if calibration.failed is not None:
            log.warning("zc step_cache: max_error calibration failed (%s): computing every step", calibration.failed)
        elif self.interval == 1:
            log.warning("zc step_cache: no interval keeps the final latents within max_error=%g: computing every "
                        "step", budget)
        log.info("zc step_cache: max_error %g -> interval %d (replayed final-latent errors %s)", budget,
                 self.interval, self.calibrated["calibrated_errors"])
        self.calibration = None

    def policy(self, name: str, inputs: tuple, run: Callable[[], Any], state) -> Any:
        if name != DEEP:
            return run()
        branch, io = self._branch, self.io
        counters = self.state.counters if not self._shadowing else collections.Counter()
        stream = inputs[io.stream_input] if io.stream_input is not None else None
        if self._may_reuse and self.adaptive:
            self._may_reuse = _relative_l1(stream, branch.reference) < self.threshold
        if self._may_reuse:
            branch.reused_in_a_row += 1
            counters["deep_reused"] += 1
            if io.residual_output is None and branch.slopes is None:
                return branch.outputs
            outputs = list(branch.outputs) if io.outputs_tuple else [branch.outputs]
            if branch.slopes is not None:
                distance = self._timestep - branch.computed_timestep
                outputs = [out if slope is None else torch.add(out, slope, alpha=distance)
                           for out, slope in zip(outputs, branch.slopes)]
            if branch.curvatures is not None:
                factor = (self._timestep - branch.computed_timestep) * (self._timestep - branch.previous_timestep)
                outputs = [out if curvature is None else torch.add(out, curvature, alpha=factor)
                           for out, curvature in zip(outputs, branch.curvatures)]
            if io.residual_output is not None:
                outputs[io.residual_output] = stream + outputs[io.residual_output]
            return tuple(outputs) if io.outputs_tuple else outputs[0]
        outputs = run()
        counters["deep_computed"] += 1
        if branch is not None:
            # Copies, not references: a partition may hand out the same buffers on its next call
            # (CUDA graphs replay into static memory), and the outputs also flow on to the user.
            cached = [
                out - stream if index == io.residual_output else out.clone() if isinstance(out, torch.Tensor) else out
                for index, out in enumerate(outputs if io.outputs_tuple else [outputs])
            ]
            previous = branch.outputs
            if self.forecast_order and previous is not None and self._timestep != branch.computed_timestep:
                previous = list(previous) if io.outputs_tuple else [previous]
                distance = self._timestep - branch.computed_timestep
                slopes = [
                    (new - old) / distance
                    if isinstance(new, torch.Tensor) and new.is_floating_point() and new.dim() >= 3 else None
                    for new, old in zip(cached, previous)
                ]
                if self.forecast_order == 2 and branch.slopes is not None:
                    span = self._timestep - branch.previous_timestep
                    branch.curvatures = [None if new is None or old is None else (new - old) / span
                                         for new, old in zip(slopes, branch.slopes)]
                branch.slopes = slopes
                branch.previous_timestep = branch.computed_timestep
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
    output = next(n for n in submodule.graph.nodes if n.op == "output").args[0]
    outputs_tuple = isinstance(output, (tuple, list))
    output_nodes = list(output) if outputs_tuple else [output]
    features = [i for i, out in enumerate(output_nodes) if isinstance(out, torch.fx.Node) and _rank(out) >= 3]
    residual_output = None
    # A block chain's remaining blocks add a residual to their input stream (first-block
    # caching reuses that residual); a UNet's inner part is reused as is (DeepCache). Blocks
    # that carry two streams (SD3's image and text tokens) but hand on one: the stream is the
    # input shaped like that output.
    if region.kind == "repeated-blocks" and len(features) == 1:
        shaped_like_output = [n for n in stream_candidates if _shape(n) == _shape(output_nodes[features[0]])]
        if shaped_like_output:
            stream_candidates, residual_output = shaped_like_output, features[0]
    stream = stream_candidates[-1] if stream_candidates else None
    arg_names = [n.name for n in submodule.graph.nodes if n.op == "placeholder"]
    stream_input = arg_names.index(stream.name) if stream is not None and stream.name in arg_names else None
    if stream_input is None:
        residual_output = None
    return DeepIO(stream_input, residual_output, outputs_tuple)


def _sampler_io(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], data_indices: list[int]) -> tuple[int | None, int | None]:
    """(input, output) index of the sampler's latents and the model's prediction: the first
    output of rank >= 3 shaped like a non-weight input (None, None if there is none)."""
    output = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    outputs = list(output) if isinstance(output, (tuple, list)) else [output]
    for index, out in enumerate(outputs):
        shape = _shape(out) if isinstance(out, torch.fx.Node) else None
        if shape is None or len(shape) < 3:
            continue
        for i in data_indices:
            if tuple(example_inputs[i].shape) == shape:
                return i, index
    return None, None


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
    if config.threshold is not None and io.stream_input is None:
        report.status = "skipped"
        report.skipped("graph", "threshold mode needs a feature map entering the deep partition; none found")
        return None
    latent_input, noise_output = _sampler_io(gm, example_inputs, data_indices)
    if config.max_error is not None and noise_output is None:
        report.status = "skipped"
        report.skipped("graph", "max_error needs an output shaped like one of the inputs (the sampler's latents) "
                                "to replay the sampler; none found")
        return None
    executor = StepCacheExecutor(config, timestep_index, data_indices, io, latent_input, noise_output)
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
                 else f"max_error {config.max_error} (interval calibrated on the first generation)"
                 if config.max_error is not None
                 else f"interval {config.interval}" + (f", schedule_power {config.schedule_power}"
                                                      if config.schedule_power != 1.0 else "")),
        "forecast": config.forecast,
        "sampler_check": "off" if not config.sampler_check else
                         "at the second step of each generation" if latent_input is not None else
                         "not possible: no output shaped like an input",
        "max_consecutive": executor.max_consecutive,
        "decision": ("on the host: reads the timestep each call (free when the pipeline keeps its timesteps on the "
                     "CPU, as DDIMPipeline does; one device-to-host copy per step when they are on a GPU)"
                     + ("; and one relative L1 distance per call" if config.threshold is not None else "")
                     + ("; the sampler check fits the first step once per generation" if config.sampler_check else "")
                     + ("; max_error fits every step of the calibration generation" if config.max_error is not None else "")),
    })
    log.info("zc step_cache: %s, deep partition %d of %d ops, reuse %s", region.description, sizes[DEEP],
             sum(sizes.values()), report.metrics["reuse"])
    return executor
