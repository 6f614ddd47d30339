"""Measurement helpers shared by every benchmark script: variants, timing, accuracy, results.

A benchmark builds a :class:`~benchmarks.models.Workload`, runs :func:`measure` once per
:class:`Variant` (eager, a ``torch.compile`` backend with its options), compares outputs with
:func:`compare`, then prints with :func:`format_table` and saves with :func:`write_results` and
:func:`plot_ms`.

Timings on a shared (virtual) machine drift between fast and slow phases that last seconds to
minutes, moving eager and compiled code alike by up to ~40% (seen on the 2-core CI machine).
Variants compiled one after another can therefore not be compared by their raw medians alone:
:func:`measure` alternates short blocks of a compiled variant's calls with blocks of eager calls,
and speedups are taken against those (:attr:`Measurement.speedup_vs_eager`): for identical
code they stay within ~5% of each other where the raw medians differ by up to 40%.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch._inductor.utils import fresh_cache

import zc
from benchmarks.models import Workload

# Outputs within this tolerance of eager count as matching. fp32 Inductor code reorders
# reductions, so it differs from eager by ~1e-5 on these models; 1e-3 leaves room for that
# while still catching a wrong rewrite.
MATCH_TOLERANCE = {"rtol": 1e-3, "atol": 1e-3}

# Length of each block of same-variant calls when eager and compiled calls alternate: short next
# to the machine's phases, long enough that switching (cold caches) costs little. Alternating
# single calls slows the calls by ~5-10% on the 2-core machine.
INTERLEAVE_BLOCK_SECONDS = 0.05


@dataclasses.dataclass(frozen=True)
class Timing:
    """``warmup`` untimed calls, then timed calls until there are at least ``repeats`` of them
    and they took at least ``min_seconds`` (not counting interleaved eager calls).

    The time floor spreads short calls over more than one of the machine's fast or slow phases.
    """

    warmup: int
    repeats: int
    min_seconds: float


@dataclasses.dataclass(frozen=True)
class Variant:
    """One way to run a model: eager (``backend=None``) or ``torch.compile`` with a backend."""

    name: str
    backend: str | None = None
    options: Mapping[str, Any] | None = None

    def prepare(self, model: torch.nn.Module) -> Callable[..., Any]:
        if self.backend is None:
            return model
        return torch.compile(model, backend=self.backend, options=dict(self.options or {}))


@dataclasses.dataclass
class Measurement:
    """The result of :func:`measure`.

    For a compiled variant: ``compile_s`` is the time of its first call, ``eager_alongside_ms``
    the median of the eager calls alternating with its timed calls, and ``speedup_vs_eager`` the
    median over adjacent block pairs of eager median ms / compiled median ms: each ratio is
    taken within ~0.1 s, inside one phase of the machine (all three are ``None`` for eager).
    ``outputs`` are the first call's tensors, kept out of JSON.
    """

    variant: str
    compile_s: float | None
    median_ms: float
    min_ms: float
    calls: int
    eager_alongside_ms: float | None
    speedup_vs_eager: float | None
    outputs: list[torch.Tensor] = dataclasses.field(repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "outputs"}


def select_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def warm_up_compiler(device: torch.device) -> None:
    """Compile and run a tiny function once, so that the process's one-time costs (lazy imports,
    the compile worker pool, the C++ toolchain probe) are not charged to the first variant that
    :func:`measure` compiles."""
    with fresh_cache(), torch.no_grad():
        torch.compile(lambda x: (x * 2).sin().sum(), backend="inductor")(torch.ones(8, device=device))


def measure(workload: Workload, variant: Variant, timing: Timing, device: torch.device) -> Measurement:
    """Run ``variant`` of ``workload``: the first call (the compile, for a compiled variant) is
    timed on its own, then come the warmup and timed calls of ``timing``; a compiled variant's
    timed calls alternate, in blocks, with timed eager calls (see the module docstring).

    A compiled variant starts from a reset Dynamo and an empty Inductor cache, so its first
    call is a cold compile and never reuses kernels another variant compiled earlier in the
    process (which would flatter whichever variant runs second).
    """
    compiled = variant.backend is not None
    torch._dynamo.reset()
    with fresh_cache() if compiled else contextlib.nullcontext(), torch.no_grad():
        run = variant.prepare(workload.model)

        def call() -> Any:
            return run(*workload.args, **workload.kwargs)

        def call_eager() -> Any:
            return workload.model(*workload.args, **workload.kwargs)

        synchronize(device)
        start = time.perf_counter()
        outputs = call()
        synchronize(device)
        first_call_s = time.perf_counter() - start
        for _ in range(timing.warmup):
            call()
        blocks, eager_blocks = [], []
        while sum(map(len, blocks)) < timing.repeats or sum(map(sum, blocks)) < timing.min_seconds * 1e3:
            blocks.append(timed_block(call, device))
            if compiled:
                eager_blocks.append(timed_block(call_eager, device))

    times_ms = [t for block in blocks for t in block]
    return Measurement(
        variant=variant.name,
        compile_s=first_call_s if compiled else None,
        median_ms=statistics.median(times_ms),
        min_ms=min(times_ms),
        calls=len(times_ms),
        eager_alongside_ms=statistics.median([t for block in eager_blocks for t in block]) if compiled else None,
        speedup_vs_eager=statistics.median(
            statistics.median(eager) / statistics.median(own) for own, eager in zip(blocks, eager_blocks)
        ) if compiled else None,
        # Cloned so that no later call can overwrite them (CUDA graphs reuse output buffers).
        outputs=[t.detach().clone() for t in tensor_leaves(outputs)],
    )


def timed_block(
    function: Callable[[], Any], device: torch.device, seconds: float = INTERLEAVE_BLOCK_SECONDS
) -> list[float]:
    """ms of each of the calls of ``function`` made until ``seconds`` are up."""
    times_ms: list[float] = []
    while not times_ms or sum(times_ms) < seconds * 1e3:
        synchronize(device)
        start = time.perf_counter()
        function()
        synchronize(device)
        times_ms.append((time.perf_counter() - start) * 1e3)
    return times_ms


def interleaved_ms(calls: dict[str, Callable[[], Any]], rounds: int, block_s: float = 0.3) -> dict[str, list[float]]:
    """Per round, a block of each variant in turn; returns each variant's per-round median ms."""
    device = select_device()
    out: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            out[name].append(statistics.median(timed_block(call, device, block_s)))
    return out


def ratios_to(reference: str, per_round: dict[str, list[float]]) -> dict[str, float]:
    """Each variant's speed-up over ``reference``: the median of its per-round ratios."""
    return {
        name: statistics.median(r / t for r, t in zip(per_round[reference], times))
        for name, times in per_round.items()
    }


def tensor_leaves(outputs: Any) -> list[torch.Tensor]:
    return [leaf for leaf in pytree.tree_leaves(outputs) if isinstance(leaf, torch.Tensor)]


def compare(actual: Sequence[torch.Tensor], expected: Sequence[torch.Tensor]) -> dict[str, Any]:
    """Errors of ``actual`` against ``expected`` over every output tensor.

    ``rel_err`` is the largest absolute error divided by the largest ``|expected|``: relative
    to the output's scale, so that elements near zero do not blow it up.
    """
    if [t.shape for t in actual] != [t.shape for t in expected]:
        raise ValueError(
            f"outputs differ in structure: {[tuple(t.shape) for t in actual]} vs "
            f"{[tuple(t.shape) for t in expected]}"
        )
    max_abs_err = 0.0
    max_abs_expected = 0.0
    for a, e in zip(actual, expected):
        a, e = a.double(), e.double()
        max_abs_err = max(max_abs_err, (a - e).abs().max().item())
        max_abs_expected = max(max_abs_expected, e.abs().max().item())
    return {
        "max_abs_err": max_abs_err,
        "rel_err": max_abs_err / max_abs_expected if max_abs_expected else max_abs_err,
        "matches_eager": all(torch.allclose(a, e, **MATCH_TOLERANCE) for a, e in zip(actual, expected)),
    }


def environment(device: torch.device) -> dict[str, Any]:
    """What the numbers were measured on and with."""
    info = {
        "device": str(device),
        "device_name": device_name(device),
        "cpu": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "zc_version": zc.__version__,
        "git_commit": _git_commit(),
        "python_version": platform.python_version(),
        # Other work on the machine inflates and scatters the timings: worth knowing when reading them.
        "load_average_1m_at_start": os.getloadavg()[0],
    }
    if device.type == "cuda":
        info["cuda_version"] = torch.version.cuda
    return info


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()


def device_slug(device: torch.device) -> str:
    """A folder name for the device: ``cpu-amd-epyc-7b13``, ``cuda-nvidia-h100-80gb-hbm3``."""
    name = re.sub(r"\((r|tm)\)", "", device_name(device), flags=re.IGNORECASE)
    name = name.split("@")[0]  # drop the clock speed of Intel names
    name = re.sub(r"\b(cpu|processor)\b", "", name, flags=re.IGNORECASE)
    return f"{device.type}-{re.sub(r'[^a-z0-9]+', '-', name.lower()).strip('-')}"


def _git_commit() -> str | None:
    """HEAD of the checkout, with ``-dirty`` when it has uncommitted changes."""
    repo = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=repo, capture_output=True,
                               text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return f"{commit}-dirty" if dirty else commit


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table, columns padded so it also reads well in a terminal."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def write_results(out_root: Path, device: torch.device, name: str, payload: Mapping[str, Any]) -> Path:
    """Write ``payload`` (plus a timestamp) to ``<out_root>/<device slug>/<name>.json``."""
    path = Path(out_root) / device_slug(device) / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    stamped = {"timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), **payload}
    path.write_text(json.dumps(stamped, indent=2) + "\n")
    return path


def plot_ms(path: Path, title: str, ms_by_model: Mapping[str, Mapping[str, float]]) -> Path:
    """Grouped bars of ms per call, one group per model, one bar per variant.

    The y axis is logarithmic: the models' call times span an order of magnitude or more.
    """
    import matplotlib

    matplotlib.use("Agg")  # no display needed, and none on a benchmark server
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    models = list(ms_by_model)
    variants = list(dict.fromkeys(v for per_model in ms_by_model.values() for v in per_model))
    width = 0.8 / len(variants)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(models)), 4.5))
    for i, variant in enumerate(variants):
        xs = [m + (i - (len(variants) - 1) / 2) * width for m in range(len(models))]
        heights = [ms_by_model[model].get(variant, float("nan")) for model in models]
        bars = ax.bar(xs, heights, width, label=variant)
        ax.bar_label(bars, fmt="%.3g", fontsize=7)
    ax.set_xticks(range(len(models)), models, rotation=15)
    ax.set_yscale("log")
    plain = matplotlib.ticker.FuncFormatter(lambda value, _: f"{value:g}")
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain)
    ax.set_ylabel("ms per call (median, log scale)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
