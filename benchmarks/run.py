"""Eager vs Inductor vs zc on every benchmark model, side by side in one process.

    python -m benchmarks [--quick] [--passes cleanup] [--models llama,vit] [--out DIR]

Prints a table and writes ``<out>/<device>/foundation[-<passes>][-quick].json`` and ``.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import traceback
from pathlib import Path
from typing import Any

import torch

if __package__ in (None, ""):
    # `python benchmarks/run.py` puts benchmarks/ on sys.path, not the repo root above it.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.harness import (  # noqa: E402
    Timing,
    Variant,
    compare,
    environment,
    format_table,
    measure,
    plot_ms,
    select_device,
    warm_up_compiler,
    write_results,
)
from benchmarks.models import MODELS, build  # noqa: E402
from zc import ZcConfig  # noqa: E402
from zc.config import pass_names  # noqa: E402

QUICK_TIMING = Timing(warmup=3, repeats=20, min_seconds=2.0)
FULL_TIMING = Timing(warmup=5, repeats=50, min_seconds=5.0)
RESULTS_ROOT = Path(__file__).resolve().parent / "results"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small shapes and few calls (a few minutes on 2 cores)")
    parser.add_argument("--passes", default="", help="comma list of zc passes to enable (default: none, zc = Inductor)")
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma list of models (default: all of {', '.join(MODELS)})")
    parser.add_argument("--out", type=Path, default=RESULTS_ROOT, help="results root; files go in <out>/<device>/")
    args = parser.parse_args(argv)

    args.models = _comma_list(args.models)
    unknown = [m for m in args.models if m not in MODELS]
    if unknown or not args.models:
        problem = f"unknown model(s) {', '.join(unknown)}" if unknown else "no model selected"
        parser.error(f"{problem}; valid: {', '.join(MODELS)}")
    args.passes = _comma_list(args.passes)
    not_passes = [p for p in args.passes if p not in pass_names()]
    if not_passes:
        parser.error(f"unknown pass(es) {', '.join(not_passes)}; zc's passes: {', '.join(pass_names())}")
    args.zc_options = {name: True for name in args.passes}
    try:
        args.zc_config = ZcConfig.from_options(args.zc_options)
    except ValueError as error:
        parser.error(str(error))
    return args


def _comma_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def benchmark_model(
    name: str, quick: bool, zc_options: dict[str, Any], timing: Timing, device: torch.device
) -> dict[str, Any]:
    workload = build(name, quick).to(device)
    eager = measure(workload, Variant("eager"), timing, device)
    # zc compiles before Inductor: the first compile of a model in a process also pays one-time
    # costs (~1 s here), and those must count against zc, never flatter it.
    zc = measure(workload, Variant("zc", "zc", zc_options), timing, device)
    inductor = measure(workload, Variant("inductor", "inductor"), timing, device)
    return {
        "model": name,
        "inputs": workload.input_shapes(),
        "eager": eager.to_dict(),
        "inductor": {**inductor.to_dict(), **compare(inductor.outputs, eager.outputs)},
        "zc": {**zc.to_dict(), **compare(zc.outputs, eager.outputs)},
        # From each variant's own interleaved eager calls, not from the medians measured minutes
        # apart (see benchmarks/harness.py): above 1, zc is the faster.
        "zc_speedup_vs_eager": zc.speedup_vs_eager,
        "zc_vs_inductor": zc.speedup_vs_eager / inductor.speedup_vs_eager,
    }


TABLE_HEADERS = ["model", "eager ms", "inductor ms", "zc ms", "zc speedup vs eager", "zc speedup vs inductor",
                 "compile s (inductor, zc)", "zc max err vs eager"]


def table_row(row: dict[str, Any]) -> list[str]:
    if "error" in row:
        first_line = row["error"].splitlines()[0]
        return [row["model"], f"failed: {first_line}", *[""] * (len(TABLE_HEADERS) - 2)]
    eager, inductor, zc = row["eager"], row["inductor"], row["zc"]
    error = f"{zc['max_abs_err']:.1e}" + ("" if zc["matches_eager"] else " (MISMATCH)")
    return [
        row["model"],
        f"{eager['median_ms']:.2f}",
        f"{inductor['median_ms']:.2f}",
        f"{zc['median_ms']:.2f}",
        f"{row['zc_speedup_vs_eager']:.2f}x",
        f"{row['zc_vs_inductor']:.2f}x",
        f"{inductor['compile_s']:.1f}, {zc['compile_s']:.1f}",
        error,
    ]


def results_name(passes: list[str], quick: bool) -> str:
    # Runs with passes get their own file, so they never overwrite the all-passes-off baseline.
    return "-".join(["foundation", *(["+".join(passes)] if passes else []), *(["quick"] if quick else [])])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = select_device()
    timing = QUICK_TIMING if args.quick else FULL_TIMING

    measured_on = environment(device)  # before the runs, so the load average is other work's
    warm_up_compiler(device)
    rows = []
    for name in args.models:
        try:
            rows.append(benchmark_model(name, args.quick, args.zc_options, timing, device))
        except Exception as error:  # one broken model must not cost the other rows
            traceback.print_exc()
            rows.append({"model": name, "error": f"{type(error).__name__}: {error}"})

    # The effective passes: ZC_* environment variables can turn on passes the flags did not.
    enabled_passes = args.zc_config.enabled_passes()
    name = results_name(enabled_passes, args.quick)
    json_path = write_results(args.out, device, name, {
        "name": name,
        "quick": args.quick,
        "environment": measured_on,
        "timing": dataclasses.asdict(timing),
        "zc_options": args.zc_options,
        "enabled_passes": enabled_passes,
        "rows": rows,
    })
    ms_by_model = {
        row["model"]: {variant: row[variant]["median_ms"] for variant in ("eager", "inductor", "zc")}
        for row in rows if "error" not in row
    }
    print(format_table(TABLE_HEADERS, [table_row(row) for row in rows]))
    print("speedups: against eager calls alternating with each compiled variant's calls, not the "
          "eager ms column (the machine's speed drifts between the variants' runs)")
    print(f"\nwrote {json_path}")
    if ms_by_model:  # nothing to plot when every model failed
        title = f"{name} on {measured_on['device_name']} (zc passes: {', '.join(enabled_passes) or 'none'})"
        print(f"wrote {plot_ms(json_path.with_suffix('.png'), title, ms_by_model)}")
    return 1 if any("error" in row for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
