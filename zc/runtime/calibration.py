"""Calibration for static quantization: observe the float model's linear inputs for N calls.

The observers run the float Dynamo graph through an FX interpreter (no compile is spent on a
graph that serves only a few calls) and keep, per group of linears sharing an input, the
per-channel absolute maximum and a bounded sample of rows (to measure each layer's error
before committing to it). A calibration is shared by every graph of the same model and
options, so Dynamo's recompile for dynamic shapes does not calibrate again.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.fx

from zc.runtime.executor import Phase, PhasedExecutor

log = logging.getLogger("zc")

SCALES_FORMAT = "zc-quantize-scales"
SCALES_VERSION = 1
ROWS_PER_CALL = 64
MAX_SAMPLE_ROWS = 512


@dataclasses.dataclass
class GroupStats:
    in_features: int
    amax: torch.Tensor | None = None
    rows: list[torch.Tensor] = dataclasses.field(default_factory=list)
    decided: tuple[float, bool, list[str]] | None = None  # (alpha, split, kept float) from a file

    def observe(self, x: torch.Tensor, name: str) -> None:
        flat = x.detach().reshape(-1, self.in_features).float()
        if flat.shape[0] == 0:
            return
        amax = flat.abs().amax(0)
        if not torch.isfinite(amax).all():
            raise ValueError(
                f"zc: quantize calibration saw NaN or inf at the input of '{name}'; "
                "calibrate on inputs for which the float model is finite"
            )
        self.amax = amax if self.amax is None else torch.maximum(self.amax, amax)
        if sum(r.shape[0] for r in self.rows) < MAX_SAMPLE_ROWS:
            picks = torch.linspace(0, flat.shape[0] - 1, min(ROWS_PER_CALL, flat.shape[0])).long()
            self.rows.append(flat[picks].cpu())

    def samples(self) -> torch.Tensor | None:
        return torch.cat(self.rows).to(self.amax.device) if self.rows else None


class Calibration:
    """Statistics per group, filled by ``steps`` observed calls."""

    _registry: dict[tuple, Calibration] = {}

    def __init__(self, groups, steps: int):
        self.groups = {g.key: GroupStats(g.in_features) for g in groups}
        self.steps = steps
        self.calls = 0
        self.seconds = 0.0

    @property
    def complete(self) -> bool:
        return self.calls >= self.steps

    @classmethod
    def shared(cls, gm, groups, config) -> Calibration:
        """One calibration per model (its weights) and options, across Dynamo's recompiles."""
        key = (
            config,
            tuple((g.key, lin.name, lin.weight.data_ptr(), tuple(lin.weight.shape)) for g in groups for lin in g.linears),
        )
        if key not in cls._registry:  # the key names every group, so a hit fits these groups
            cls._registry[key] = cls(groups, config.calibration_steps)
        return cls._registry[key]

    def executor(self, gm: torch.fx.GraphModule, groups, build_quantized: Callable[[], Callable[..., Any]], report) -> PhasedExecutor:
        """Observe the float graph for the remaining steps, then run ``build_quantized()``."""
        watched = {g.input.name: (self.groups[g.key], g.key) for g in groups}
        observer = _Observer(gm, watched)
        progress = _progress(self.steps - self.calls)

        def observe(*args: Any) -> Any:
            start = time.perf_counter()
            with torch.no_grad():
                out = observer.run(*args)
            self.calls += 1
            self.seconds += time.perf_counter() - start
            progress(self.calls)
            return out

        def finished() -> None:
            report.metrics["calibration_calls"] = self.calls
            report.metrics["calibration_seconds"] = round(self.seconds, 3)
            log.info("zc quantize: calibrated %d groups of linears on %d calls in %.1fs",
                     len(self.groups), self.calls, self.seconds)

        return PhasedExecutor([
            Phase("calibrate", build=lambda: observe, calls=self.steps - self.calls, on_end=finished),
            Phase("quantized", build=build_quantized),
        ])


def _progress(total: int) -> Callable[[int], None]:
    """A progress bar on an interactive stderr, a log line per call otherwise."""
    if sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=total, desc="zc quantize: calibrating", unit="call", leave=False)

        def update(done: int) -> None:
            bar.update(1)
            if bar.n >= total:
                bar.close()

        return update
    return lambda done: log.info("zc quantize: calibration call %d/%d", done, total)


def save_scales(path: str, calibration: Calibration, groups, plans) -> None:
    payload = {
        "format": SCALES_FORMAT,
        "version": SCALES_VERSION,
        "groups": {
            g.key: {
                "in_features": g.in_features,
                "linears": [lin.name for lin in g.linears],
                "amax": calibration.groups[g.key].amax.cpu().tolist(),
                "alpha": plans[g.key].alpha,
                "split_outliers": plans[g.key].extra_columns is not None,
                "kept_float": sorted(plans[g.key].kept_float),
            }
            for g in groups
        },
    }
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(payload))


def load_scales(path: str, groups) -> Calibration:
    """A finished calibration from ``path``; refuses a file that does not fit these groups."""
    try:
        payload = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ValueError(f"zc: option 'quantize.scales': no file at {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        payload = None
    if not isinstance(payload, dict) or payload.get("format") != SCALES_FORMAT:
        raise ValueError(f"zc: option 'quantize.scales': {path} is not a zc quantize scales file")
    if payload.get("version") != SCALES_VERSION:
        raise ValueError(f"zc: {path} has scales format version {payload.get('version')}; this zc reads {SCALES_VERSION}")
    saved = payload["groups"]
    expected = {g.key: g for g in groups}
    missing, extra = sorted(set(expected) - set(saved)), sorted(set(saved) - set(expected))
    if missing or extra:
        raise ValueError(
            f"zc: the scales in {path} do not fit this graph: layers without scales {missing or 'none'}, "
            f"scales for layers not in the graph {extra or 'none'}"
        )
    calibration = Calibration(groups, steps=0)
    for key, g in expected.items():
        entry = saved[key]
        names = [lin.name for lin in g.linears]
        if entry["linears"] != names or entry["in_features"] != g.in_features or len(entry["amax"]) != g.in_features:
            raise ValueError(
                f"zc: the scales in {path} do not fit this graph at '{key}': the file has linears "
                f"{entry['linears']} with {entry['in_features']} input features, the graph has {names} "
                f"with {g.in_features}"
            )
        stats = calibration.groups[key]
        stats.amax = torch.tensor(entry["amax"], dtype=torch.float32, device=g.linears[0].weight.device)
        stats.decided = (float(entry["alpha"]), bool(entry["split_outliers"]), list(entry["kept_float"]))
    return calibration


class _Observer(torch.fx.Interpreter):
    def __init__(self, gm: torch.fx.GraphModule, watched: dict[str, tuple[GroupStats, str]]):
        super().__init__(gm, garbage_collect_values=True)
        self.watched = watched

    def run_node(self, n: torch.fx.Node) -> Any:
        out = super().run_node(n)
        if n.name in self.watched:
            stats, name = self.watched[n.name]
            stats.observe(out, name)
        return out
