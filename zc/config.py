"""zc's option schema: ``torch.compile(..., backend="zc", options=...)`` -> :class:`ZcConfig`.

Every key is validated; an unknown key or a value of the wrong type raises ``ValueError`` naming
the key, the closest valid name and every valid name. ``ZC_<KEY>`` environment variables
override the options given in code (see :func:`ZcConfig.from_options`).
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import os
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

ENV_PREFIX = "ZC_"


def _check_one_of(option: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"zc: option '{option}' must be one of {', '.join(choices)}; got {value!r}")


@dataclasses.dataclass(frozen=True)
class PassConfig:
    """Base of every per-pass sub-config. A pass runs only when ``enabled``.

    The option value of a pass may be ``True`` (the pass with its defaults), ``False``/``None``
    (off), a dict of its fields, an instance of the sub-config, or, when the sub-config names a
    ``shorthand`` field, a bare value for that field (``{"quantize": "w8a8"}``).
    """

    enabled: bool = False

    shorthand: ClassVar[str | None] = None

    def check(self) -> None:
        """Raise ``ValueError`` naming the option when a value is out of its range."""


@dataclasses.dataclass(frozen=True)
class CleanupConfig(PassConfig):
    """Exact canonicalisation: removes ATen ops that return their input unchanged."""


QUANTIZE_MODES = ("w8a8", "int8_weight_only", "int4_weight_only")


@dataclasses.dataclass(frozen=True)
class QuantizeConfig(PassConfig):
    """Post-training quantization of every Linear-like matmul with a large enough weight.

    ``mode``: ``w8a8`` (int8 weights per output channel, int8 activations with static scales
    from calibration, smoothing and quantization steps merged into the producing norm / op and
    the dequantization into the GEMM epilogue), ``int8_weight_only`` or ``int4_weight_only``
    (``group_size`` columns per scale). ``calibration_steps``: float calls observed before the
    quantized code runs (w8a8). ``smooth_alpha``: SmoothQuant's migration strength in [0, 1];
    ``None`` picks it per layer from the calibration samples. ``min_weight_size``: smaller
    weights stay float. ``skip``: fnmatch patterns of module names kept float.
    ``outlier_channels``: per group of linears, this many input channels with the largest
    calibrated range skip quantization and run in a small float GEMM beside the int8 one (BERT-
    style activation outliers would otherwise set the per-tensor step for every other channel).
    ``layer_error_budget``: a layer whose mean per-row relative output error on the
    calibration samples exceeds it stays float (reported). ``scales`` / ``save_scales``: load / save the
    calibration so production never recalibrates.
    """

    mode: str = "w8a8"
    calibration_steps: int = 8
    smooth_alpha: float | None = None
    min_weight_size: int = 16384
    skip: tuple[str, ...] = ()
    group_size: int = 128
    outlier_channels: int = 8
    layer_error_budget: float = 0.1
    scales: str | None = None
    save_scales: str | None = None

    shorthand: ClassVar[str | None] = "mode"

    def check(self) -> None:
        _check_one_of("quantize.mode", self.mode, QUANTIZE_MODES)
        if self.calibration_steps < 1:
            raise ValueError(f"zc: option 'quantize.calibration_steps' must be >= 1; got {self.calibration_steps}")
        if self.smooth_alpha is not None and not 0.0 <= self.smooth_alpha <= 1.0:
            raise ValueError(f"zc: option 'quantize.smooth_alpha' must be in [0, 1] or None; got {self.smooth_alpha}")
        if self.group_size not in (32, 64, 128):
            raise ValueError(f"zc: option 'quantize.group_size' must be 32, 64 or 128; got {self.group_size}")
        if self.outlier_channels < 0:
            raise ValueError(f"zc: option 'quantize.outlier_channels' must be >= 0; got {self.outlier_channels}")
        if self.min_weight_size < 1:
            raise ValueError(f"zc: option 'quantize.min_weight_size' must be >= 1; got {self.min_weight_size}")
        if self.layer_error_budget <= 0:
            raise ValueError(f"zc: option 'quantize.layer_error_budget' must be > 0; got {self.layer_error_budget}")


TOKEN_SKIP_STRATEGIES = ("skip", "merge")
TOKEN_SKIP_SCORES = ("similarity", "dissimilarity", "norm")
TOKEN_SKIP_ANCHORS = ("auto", "first", "last")
TOKEN_SKIP_MATCHINGS = ("bipartite", "score")
TOKEN_SKIP_ERROR_MEASURES = ("outputs", "token_mean")
TOKEN_SKIP_REDUCE_POINTS = ("block", "mlp")


@dataclasses.dataclass(frozen=True)
class TokenSkipConfig(PassConfig):
    """Fewer tokens through the transformer blocks after block ``start_layer`` (training-free).

    After block ``start_layer`` (0-based) only ``ceil(keep_ratio * tokens)`` tokens go on through
    the later blocks; the others keep their hidden state from that block and are scattered back,
    so output shapes do not change. ``score``: ``similarity`` ranks tokens by cosine similarity
    to the anchor token, ``dissimilarity`` by its opposite (the tokens least like the anchor first),
    ``norm`` by hidden-state norm. ``anchor``: the token compared with and
    always kept: ``first`` (CLS), ``last`` (causal LMs, which also keep the first token), or
    ``auto`` (last for causal LMs, else first). Padding tokens skip first. ``strategy``:
    ``skip`` (skipped tokens keep their state from block ``start_layer``) or ``merge`` (ToMe-
    style: tokens are merged into similar ones, see ``matching``, and take their group's output
    at the end). ``withdraw_start`` / ``withdraw_end``: instead of scoring, the
    tokens at positions ``[withdraw_start, withdraw_end)`` are withdrawn after block
    ``start_layer`` (VTW: the image tokens of a multimodal LLM); ``keep_ratio`` is then unused.
    ``withdraw_token_id``: the same for the tokens whose input id is this one (the image token id);
    their number is read from the example and compiled in (another number fails at run time).

    ``schedule``: instead of ``start_layer`` / ``keep_ratio``, the fraction of the tokens each block
    runs on, one per block, non-increasing, the first 1 (``(1, .875, .75, .625, .5, .375)``): tokens
    leave (or merge) gradually, which loses less than one drop at the same cost. ``matching``
    (merge): ``bipartite`` (ToMe's bipartite soft matching: tokens at even positions merge into
    their most similar token at an odd position, the closest pairs first; the first token is
    never merged) or ``score`` (the tokens kept are chosen by ``score``; every other token merges
    into its most similar kept one). Merged states are averages weighted by how many tokens each
    stands for. ``proportional_attention`` (merge): ``log(size)`` of each merged token is added to
    the attention logits of its key, so it weighs as much as the tokens it stands for.

    ``max_error``: the schedule is chosen instead (``start_layer`` / ``keep_ratio`` are then unused;
    ``strategy``, ``matching``, ``score`` still apply): the first ``calibration_calls`` calls run
    the full graph eagerly, candidate schedules run eagerly on those inputs, and the one keeping
    the fewest tokens through the blocks whose outputs stay within ``max_error`` of the full
    model's (1 - cosine similarity per sample, worst case) is compiled and reported.
    ``error_measure``: ``outputs`` compares every output whole (each token's state, logits);
    ``token_mean`` first averages ``[batch, tokens, dim]`` outputs over their tokens (for
    mean-pooled embeddings: far less strict).

    ``reduce_before``: where in a block the token count drops: ``block`` (between blocks) or
    ``mlp`` (inside a block, between its attention and its MLP, as ToMe merges: the block's MLP
    already runs on fewer tokens, and merging matches the states its attention just produced).
    With ``mlp`` a ``schedule`` gives the fraction of the tokens each block's MLP runs on (a
    block's attention runs on what the MLP before it ran on; the first entry may be below 1), and
    with ``start_layer`` K the drop is before the MLP of block K + 1; ``max_error`` then also tries
    schedules that start at block 0's MLP.
    """

    start_layer: int = 1
    keep_ratio: float = 0.5
    strategy: str = "skip"
    score: str = "similarity"
    anchor: str = "auto"
    withdraw_start: int | None = None
    withdraw_end: int | None = None
    withdraw_token_id: int | None = None
    schedule: tuple[float, ...] | None = None
    matching: str = "bipartite"
    proportional_attention: bool = True
    max_error: float | None = None
    calibration_calls: int = 2
    error_measure: str = "outputs"
    reduce_before: str = "block"

    shorthand: ClassVar[str | None] = "keep_ratio"

    def check(self) -> None:
        if not 0.0 < self.keep_ratio <= 1.0:
            raise ValueError(f"zc: option 'token_skip.keep_ratio' must be in (0, 1]; got {self.keep_ratio}")
        if self.start_layer < 0:
            raise ValueError(f"zc: option 'token_skip.start_layer' must be >= 0; got {self.start_layer}")
        if (self.withdraw_start is None) != (self.withdraw_end is None):
            raise ValueError("zc: options 'token_skip.withdraw_start' and 'token_skip.withdraw_end' go together; "
                             f"got {self.withdraw_start} and {self.withdraw_end}")
        if self.withdraw_start is not None and not 0 < self.withdraw_start < self.withdraw_end:
            raise ValueError("zc: option 'token_skip.withdraw_start' must be > 0 (the first token stays) and "
                             f"< 'withdraw_end'; got {self.withdraw_start} and {self.withdraw_end}")
        _check_one_of("token_skip.strategy", self.strategy, TOKEN_SKIP_STRATEGIES)
        _check_one_of("token_skip.score", self.score, TOKEN_SKIP_SCORES)
        _check_one_of("token_skip.anchor", self.anchor, TOKEN_SKIP_ANCHORS)
        if self.max_error is not None and not 0.0 < self.max_error < 1.0:
            raise ValueError(f"zc: option 'token_skip.max_error' must be in (0, 1) (1 - cosine similarity); "
                             f"got {self.max_error}")
        if self.withdraw_token_id is not None and self.withdraw_start is not None:
            raise ValueError("zc: option 'token_skip.withdraw_token_id' does not go with 'withdraw_start' / "
                             "'withdraw_end': withdraw the tokens of an id or of a span")
        if self.max_error is not None and (self.withdraw_start is not None or self.withdraw_token_id is not None):
            raise ValueError("zc: option 'token_skip.max_error' does not go with 'withdraw_start' / 'withdraw_end' "
                             "(the withdrawn span is fixed)")
        _check_one_of("token_skip.error_measure", self.error_measure, TOKEN_SKIP_ERROR_MEASURES)
        if self.calibration_calls < 1:
            raise ValueError(f"zc: option 'token_skip.calibration_calls' must be >= 1; got {self.calibration_calls}")
        _check_one_of("token_skip.matching", self.matching, TOKEN_SKIP_MATCHINGS)
        _check_one_of("token_skip.reduce_before", self.reduce_before, TOKEN_SKIP_REDUCE_POINTS)
        if self.schedule is not None:
            ratios = self.schedule
            first_whole = self.reduce_before == "block"  # inside blocks, block 0's MLP may already run on fewer
            if (not ratios or (first_whole and ratios[0] != 1.0) or any(not 0.0 < r <= 1.0 for r in ratios)
                    or any(b > a for a, b in zip(ratios, ratios[1:]))):
                raise ValueError("zc: option 'token_skip.schedule' must be the keep ratio of every block, in (0, 1], "
                                 "non-increasing" + (", the first block's 1.0" if first_whole else "") +
                                 f"; got {ratios}")
            if self.withdraw_start is not None or self.withdraw_token_id is not None or self.max_error is not None:
                raise ValueError("zc: option 'token_skip.schedule' does not go with 'max_error' (which picks it) or "
                                 "'withdraw_start' / 'withdraw_end' / 'withdraw_token_id' "
                                 "(the withdrawn span says which tokens leave)")


STEP_CACHE_FORECASTS = ("reuse", "linear", "quadratic")


@dataclasses.dataclass(frozen=True)
class StepCacheConfig(PassConfig):
    """Reuse the deep part of a denoiser across adjacent diffusion steps.

    The graph is split where its structure says (a UNet's outermost skip levels, or the first
    blocks of a chain of repeated blocks); the deep partition is computed on some steps and its
    cached result reused on the others.

    ``interval``: compute the deep partition every ``interval`` steps of a generation (1 = every
    step: the pass steps aside). ``schedule_power``: place those ``K = ceil(steps / interval)``
    computed steps at ``(j / K) ** schedule_power`` of the way through the generation (1 = evenly;
    > 1 = denser at the start, at high noise, where reuse errors cost the trained UNet most); the
    number of steps is estimated from the timestep spacing. ``threshold``: adaptive instead:
    reuse while the deep partition's input changed by less than this relative L1 distance since
    the last computed step. ``depth``: UNet skip level whose inside is cached (1 = the outermost,
    the most reuse), or the number of leading blocks of a block chain run every step.

    ``forecast``: what a reused step returns for the deep partition: ``"reuse"`` its outputs from
    the last computed step as they are (DeepCache); ``"linear"`` / ``"quadratic"`` extrapolated
    (in the timestep) through the last two / three computed steps (TaylorSeer's first / second
    order: one / two multiply-adds per tensor per reused step).

    ``max_error``: choose the interval by calibration. The first generation computes every step
    (its results are exact) while replaying itself under intervals 2 to 8 (with the configured
    ``forecast`` and ``schedule_power``; the sampler's steps are fitted from the latents the model
    sees), which makes that one generation about 3x as long; the largest interval whose latents
    entering the last step stay within ``max_error`` (relative L2) of the computed ones is used
    from the next generation on. For images ``latents / 2 + 0.5`` with latents of RMS r, a
    relative error e is a PSNR of about ``20 log10(2 / (e r))`` (0.05 is about 34 dB at r = 0.8);
    pipelines that clip the final image usually come out closer. The bound holds for the
    calibration generation: other seeds, prompts or sizes are not re-checked.

    ``sampler_check``: at the second step of each generation, check that the first sampler step
    was a deterministic linear function of the model's input and output; a sampler that injects
    noise (DDPM, DDIM with eta > 0, ancestral samplers) fails it and that generation computes
    every step (``False``: cache anyway). ``max_consecutive``: most reused steps in a row
    (default ``interval - 1`` with an even schedule, unlimited with ``schedule_power`` != 1, 4
    with a threshold). ``min_steps``: a generation whose timestep spacing implies fewer steps
    computes every step (0 = always cache).
    """

    interval: int = 3
    threshold: float | None = None
    depth: int = 1
    max_consecutive: int | None = None
    min_steps: int = 10
    max_error: float | None = None
    forecast: str = "reuse"
    schedule_power: float = 1.0
    sampler_check: bool = True

    shorthand: ClassVar[str | None] = "interval"

    def check(self) -> None:
        if self.interval < 1:
            raise ValueError(f"zc: option 'step_cache.interval' must be >= 1; got {self.interval}")
        if self.threshold is not None and self.threshold < 0:
            raise ValueError(f"zc: option 'step_cache.threshold' must be >= 0 or None; got {self.threshold}")
        if self.depth < 1:
            raise ValueError(f"zc: option 'step_cache.depth' must be >= 1; got {self.depth}")
        if self.max_consecutive is not None and self.max_consecutive < 0:
            raise ValueError(f"zc: option 'step_cache.max_consecutive' must be >= 0 or None; got {self.max_consecutive}")
        if self.max_error is not None and self.max_error <= 0:
            raise ValueError(f"zc: option 'step_cache.max_error' must be > 0 or None; got {self.max_error}")
        if self.max_error is not None and self.threshold is not None:
            raise ValueError("zc: options 'step_cache.max_error' and 'step_cache.threshold' exclude each other: "
                             "max_error calibrates an interval")
        if self.min_steps < 0:
            raise ValueError(f"zc: option 'step_cache.min_steps' must be >= 0; got {self.min_steps}")
        if not self.schedule_power > 0:
            raise ValueError(f"zc: option 'step_cache.schedule_power' must be > 0; got {self.schedule_power}")
        _check_one_of("step_cache.forecast", self.forecast, STEP_CACHE_FORECASTS)


WINDOW_ATTENTION_MODES = ("exact", "approximate")


@dataclasses.dataclass(frozen=True)
class WindowAttentionConfig(PassConfig):
    """Banded attention: only the band of keys each query may see is computed (FlexAttention).

    Exact mode (``window`` unset): attention whose boolean mask the pass can prove to be a
    sliding window (built from index arithmetic, as ``transformers`` does for Mistral / Qwen2)
    runs as FlexAttention with a block mask cached per input shape; the output equals the dense
    masked attention. Approximate mode (``window`` set, e.g. ``{"window_attention": 512}``):
    every attention call keeps its own mask (causal, padding) and additionally sees only the
    last ``window`` keys, one int for all layers or one per attention call in graph order.
    ``head_groups``: split the heads of each layer into this many groups, group g seeing
    ``window * 2**(g - head_groups // 2)`` keys (multi-scale windows, as in MSWA). ``sink``:
    this many leading keys stay visible to every query. ``block_size``: the block mask's tile
    (queries and keys), a multiple of 16; ``None`` picks 64 on CPU (measured faster than 128 for
    a 256-token window) and FlexAttention's 128 elsewhere.
    """

    window: int | tuple[int, ...] | None = None
    head_groups: int = 1
    sink: int = 0
    block_size: int | None = None

    shorthand: ClassVar[str | None] = "window"

    @property
    def mode(self) -> str:
        return "exact" if self.window is None else "approximate"

    def windows(self, layers: int) -> list[int]:
        """The window of each of ``layers`` attention calls (approximate mode)."""
        if isinstance(self.window, int):
            return [self.window] * layers
        if len(self.window) != layers:
            raise ValueError(
                f"zc: option 'window_attention.window' lists {len(self.window)} windows but the graph "
                f"has {layers} attention calls; give one int for all layers or one per attention call"
            )
        return list(self.window)

    def check(self) -> None:
        windows = (self.window,) if isinstance(self.window, int) else (self.window or ())
        if isinstance(self.window, tuple) and not self.window:
            raise ValueError("zc: option 'window_attention.window' is an empty list; give an int or one per layer")
        for window in windows:
            if window <= 0:
                raise ValueError(f"zc: option 'window_attention.window' must be > 0; got {self.window}")
        if self.head_groups < 1:
            raise ValueError(f"zc: option 'window_attention.head_groups' must be >= 1; got {self.head_groups}")
        if self.head_groups > 1 and self.window is None:
            raise ValueError("zc: option 'window_attention.head_groups' needs 'window_attention.window' (approximate mode)")
        if self.sink < 0:
            raise ValueError(f"zc: option 'window_attention.sink' must be >= 0; got {self.sink}")
        if self.sink and self.window is None:
            raise ValueError("zc: option 'window_attention.sink' needs 'window_attention.window' (approximate mode)")
        if self.block_size is not None and (self.block_size < 16 or self.block_size % 16):
            raise ValueError(f"zc: option 'window_attention.block_size' must be a multiple of 16; got {self.block_size}")


@dataclasses.dataclass(frozen=True)
class OpGroupingConfig(PassConfig):
    """Slice large activations and run chains of ops per slice to bound peak memory (exact).

    ``memory_budget``: the peak activation memory to fit, in bytes or as a string (``"2GB"``
    = 2*10^9, ``"512MiB"`` = 512*2^20); each chain gets the fewest slices whose estimated peak
    fits (a budget no slicing reaches compiles the smallest peak found, with a warning).
    ``max_slices``: the most slices per chain; without a budget every worthwhile chain is cut
    into this many (8 when neither is given).
    ``spatial``: also cut chains of convolutions / pointwise ops / nearest upsampling over
    ``[N, C, H, W]`` images into bands of rows, each widened by the halo its convolutions read
    (after the chains along independent dims, inside their slices). Off by default: exact on
    the VAE decoders, conv stacks and the video UNet tested, and it lowers a batch-4 decode's
    measured peak further (3.9x below Inductor's vs 3.1x without), but it multiplies the
    compiled kernels (compile time) and costs a few percent of time.
    """

    memory_budget: int | str | None = None
    max_slices: int | None = None
    spatial: bool = False

    shorthand: ClassVar[str | None] = "memory_budget"

    _BYTE_UNITS: ClassVar[dict[str, int]] = {
        "": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
        "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
    }

    def budget_bytes(self) -> int | None:
        """``memory_budget`` in bytes (``None`` when unset)."""
        value = self.memory_budget
        if value is None or isinstance(value, int):
            return value
        import re

        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", value)
        if not match or match.group(2).lower() not in self._BYTE_UNITS:
            raise ValueError(
                "zc: option 'op_grouping.memory_budget' must be a number of bytes or a string like "
                f"'2GB' / '512MiB' (units {', '.join(u for u in self._BYTE_UNITS if u)}); got {value!r}"
            )
        return int(float(match.group(1)) * self._BYTE_UNITS[match.group(2).lower()])

    def check(self) -> None:
        budget = self.budget_bytes()
        if budget is not None and budget <= 0:
            raise ValueError(f"zc: option 'op_grouping.memory_budget' must be positive; got {self.memory_budget!r}")
        if self.max_slices is not None and self.max_slices < 2:
            raise ValueError(f"zc: option 'op_grouping.max_slices' must be >= 2; got {self.max_slices}")


@dataclasses.dataclass(frozen=True)
class ZcConfig:
    """The whole configuration of one ``torch.compile(..., backend="zc")``.

    ``dump``: directory for graph dumps (captured graph, graph after each pass, report, generated
    code); ``None`` writes nothing. ``strict``: re-raise a failing pass instead of skipping it.
    ``inductor``: Inductor config patches (``torch._inductor.config`` names) for this compile.
    The remaining fields are the passes, all off by default.
    """

    dump: str | None = None
    strict: bool = False
    inductor: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    cleanup: CleanupConfig = CleanupConfig()
    window_attention: WindowAttentionConfig = WindowAttentionConfig()
    token_skip: TokenSkipConfig = TokenSkipConfig()
    step_cache: StepCacheConfig = StepCacheConfig()
    quantize: QuantizeConfig = QuantizeConfig()
    op_grouping: OpGroupingConfig = OpGroupingConfig()

    @classmethod
    def from_options(
        cls,
        options: Mapping[str, Any] | ZcConfig | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> ZcConfig:
        """Validate ``options`` (a dict or a ``ZcConfig``), then apply ``ZC_*`` overrides.

        ``ZC_<KEY>`` (e.g. ``ZC_DUMP=/tmp/d``, ``ZC_STRICT=1``, ``ZC_CLEANUP=true``,
        ``ZC_INDUCTOR='{"freezing": true}'``) replaces that key's value. The value is read as
        a boolean word (1/0, true/false, yes/no, on/off), else as JSON, else as a plain string.
        """
        if isinstance(options, ZcConfig):
            values = {f.name: getattr(options, f.name) for f in dataclasses.fields(cls)}
        elif options is None:
            values = {}
        elif isinstance(options, Mapping):
            values = dict(options)
        else:
            raise ValueError(
                f"zc: options must be a dict or a zc.ZcConfig, got {type(options).__name__}"
            )
        values.update(_environment_overrides(os.environ if environ is None else environ))
        return _build(cls, values, where="")

    def enabled_passes(self) -> list[str]:
        return [name for name in pass_names() if getattr(self, name).enabled]

    def cache_key(self) -> str:
        """A stable digest of everything that changes the compiled code (not ``dump``)."""
        payload = {
            "inductor": {k: repr(v) for k, v in sorted(self.inductor.items())},
            **{name: dataclasses.asdict(getattr(self, name)) for name in pass_names()},
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=repr).encode()).hexdigest()

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self), default=repr))


def pass_names() -> list[str]:
    """The pass keys of :class:`ZcConfig`, in the order the pass manager runs them."""
    return [
        f.name
        for f in dataclasses.fields(ZcConfig)
        if isinstance(f.default, PassConfig)
    ]


def option_schema() -> dict[str, Any]:
    """Every option key with its type and default, as data (for docs and error messages)."""

    def describe(cls: type) -> dict[str, Any]:
        hints = typing.get_type_hints(cls)
        out = {}
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            if isinstance(default, PassConfig):
                out[f.name] = {"type": "pass", "fields": describe(type(default))}
            else:
                out[f.name] = {"type": _type_name(hints[f.name]), "default": default}
        return out

    return describe(ZcConfig)


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _closest(name: str, valid: list[str]) -> str:
    match = difflib.get_close_matches(name, valid, n=1, cutoff=0.5)
    return f" Did you mean '{match[0]}'?" if match else ""


def _unknown(kind: str, name: str, valid: list[str]) -> ValueError:
    return ValueError(
        f"zc: unknown {kind} '{name}'.{_closest(name, valid)} Valid: {', '.join(valid)}"
    )


def _build(cls: type, values: Mapping[str, Any], where: str) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            raise _unknown("option", f"{where}{key}", [f"{where}{k}" for k in fields])
        default = fields[key].default
        if isinstance(default, PassConfig):
            kwargs[key] = _build_pass(type(default), value, key)
        else:
            kwargs[key] = _coerce(value, hints[key], f"{where}{key}")
    if "inductor" in kwargs:
        _check_inductor_keys(kwargs["inductor"])
    return cls(**kwargs)


def _build_pass(cls: type[PassConfig], value: Any, key: str) -> PassConfig:
    if isinstance(value, cls):
        config = value
    elif value is None or value is False:
        config = cls()
    elif value is True:
        config = cls(enabled=True)
    elif isinstance(value, Mapping):
        config = _build(cls, {"enabled": True, **value}, where=f"{key}.")
    elif cls.shorthand is not None and isinstance(value, (str, int, float, list)):
        config = _build(cls, {"enabled": True, cls.shorthand: value}, where=f"{key}.")
    else:
        accepted = "True, False, a dict of its fields"
        if cls.shorthand:
            accepted += f", or a value for '{cls.shorthand}'"
        raise ValueError(
            f"zc: option '{key}' must be {accepted}; got {type(value).__name__} ({value!r})"
        )
    config.check()
    return config


def _coerce(value: Any, hint: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except ValueError:
                pass
        raise _wrong_type(key, hint, value)
    if hint is str:
        if isinstance(value, os.PathLike):
            return os.fspath(value)
        if isinstance(value, str):
            return value
    elif hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif origin is tuple and typing.get_args(hint)[1:] == (Ellipsis,):
        if isinstance(value, (list, tuple)):
            try:
                return tuple(_coerce(v, typing.get_args(hint)[0], key) for v in value)
            except ValueError:
                pass  # reported below with the whole type
    elif origin is Mapping or hint is dict:
        if isinstance(value, Mapping) and all(isinstance(k, str) for k in value):
            return dict(value)
    else:  # a type the schema does not use yet: refuse rather than guess
        raise TypeError(f"zc: no validator for option type {hint!r} ({key})")
    raise _wrong_type(key, hint, value)


def _wrong_type(key: str, hint: Any, value: Any) -> ValueError:
    return ValueError(
        f"zc: option '{key}' must be {_type_name(hint)}, got {type(value).__name__} ({value!r})"
    )


def _check_inductor_keys(patches: Mapping[str, Any]) -> None:
    import torch._inductor.config as inductor_config

    valid = inductor_config.get_config_copy()
    for name in patches:
        if name not in valid:
            raise ValueError(
                f"zc: unknown Inductor config name '{name}' in option 'inductor'."
                f"{_closest(name, sorted(valid))} Valid names are those of torch._inductor.config."
            )


_TRUE_WORDS = {"1", "true", "yes", "on"}
_FALSE_WORDS = {"0", "false", "no", "off", ""}


def _environment_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    hints = typing.get_type_hints(ZcConfig)
    valid = {f"{ENV_PREFIX}{f.name.upper()}": f.name for f in dataclasses.fields(ZcConfig)}
    overrides = {}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        if name not in valid:
            raise _unknown("environment variable", name, sorted(valid))
        key = valid[name]
        if hints[key] == str | None:  # a path: taken verbatim, empty means unset
            overrides[key] = raw or None
        else:
            overrides[key] = _parse_env_value(raw)
    return overrides


def _parse_env_value(raw: str) -> Any:
    word = raw.strip().lower()
    if word in _TRUE_WORDS:
        return True
    if word in _FALSE_WORDS:
        return False
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw
