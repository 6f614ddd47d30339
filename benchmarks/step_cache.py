"""step_cache: 50-step DDIM on the trained digit UNet and DiT, cached vs uncached, in one process.

    python -m benchmarks.step_cache [--quick] [--out DIR] [--skip-unet] [--skip-dit] [--only V1,V2] [--rounds N] [--batch N]
                                    [--skip-module-guards]

The denoisers are the ones ``benchmarks/train_diffusion.py`` trained on scikit-learn's digits
(weights in ``benchmarks/weights/``). The UNet runs in a real, unmodified ``diffusers``
``DDIMPipeline`` where only ``pipe.unet`` is swapped for ``torch.compile(unet, ...)``; the
class-conditional DiT runs in a plain ``DDIMScheduler`` loop (``DiTPipeline`` needs a VAE).
Every variant generates the same images from the same seed:

* quality: PSNR and SSIM of the final images (in [0, 1]) against the uncached Inductor run,
  over two batches (seeds 0 and 1; ``max_error`` calibrates on a third, seed 1234);
* speed: end-to-end seconds per generation, every variant once per round in turn (so the
  machine's speed drift cancels), ratio to uncached Inductor = median of per-round ratios.

``--skip-module-guards`` compiles every variant (Inductor included) with PyTorch's
``guard_filter_fn=torch.compiler.skip_guard_on_all_nn_modules_unsafe``: Dynamo then stops
checking the 200+ parameters on every call, which is most of the fixed cost of a reused step.
It is unsafe in general (a module changed in place is not noticed), so it is a measurement of
that overhead, not a default; its results go to ``...-skip-module-guards.json``.

Writes ``benchmarks/results/<device>/step_cache[-quick].json``, a PNG of the times and a PNG
of the generated digits per variant.
"""

from __future__ import annotations

import argparse
import copy
import gc
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.harness import environment, format_table, plot_ms, select_device, write_results  # noqa: E402
from benchmarks.train_diffusion import NUM_CLASSES, WEIGHTS  # noqa: E402
from zc.fx_passes import step_cache  # noqa: E402

STEPS = 50
QUALITY_SEEDS = (0, 1)


def psnr(image: torch.Tensor, reference: torch.Tensor) -> float:
    mse = float(((image - reference) ** 2).mean())
    return float("inf") if mse == 0 else 10 * torch.log10(torch.tensor(1.0 / mse)).item()


def ssim(image: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean SSIM (Gaussian window 7, sigma 1.5, data range 1) over images [N, C, H, W]."""
    coords = torch.arange(7, dtype=torch.float64) - 3
    g = torch.exp(-coords ** 2 / (2 * 1.5 ** 2))
    window = (g[:, None] * g[None, :] / g.sum() ** 2)[None, None].to(image.dtype)
    channels = image.shape[1]
    window = window.expand(channels, 1, 7, 7)

    def blur(x):
        return F.conv2d(F.pad(x, (3, 3, 3, 3), mode="reflect"), window, groups=channels)

    c1, c2 = 0.01 ** 2, 0.03 ** 2
    mu_x, mu_y = blur(image), blur(reference)
    var_x = blur(image * image) - mu_x ** 2
    var_y = blur(reference * reference) - mu_y ** 2
    cov = blur(image * reference) - mu_x * mu_y
    value = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return float(value.mean())


def unet_generator(batch: int) -> tuple[str, Callable[[Callable], Callable[[int], torch.Tensor]], torch.nn.Module]:
    from diffusers import DDIMPipeline, DDIMScheduler, UNet2DModel

    unet = UNet2DModel.from_pretrained(WEIGHTS / "digits_unet", torch_dtype=torch.float32).eval()

    def make(denoiser):
        pipe = DDIMPipeline(unet=denoiser, scheduler=DDIMScheduler(num_train_timesteps=1000))
        pipe.set_progress_bar_config(disable=True)

        def generate(seed: int) -> torch.Tensor:
            images = pipe(batch_size=batch, num_inference_steps=STEPS, eta=0.0,
                          generator=torch.Generator().manual_seed(seed), output_type="np").images
            return torch.from_numpy(images).permute(0, 3, 1, 2).double()

        return generate

    return f"UNet2DModel digits 16x16, DDIMPipeline, batch {batch}", make, unet


def dit_generator(batch: int) -> tuple[str, Callable[[Callable], Callable[[int], torch.Tensor]], torch.nn.Module]:
    from diffusers import DDIMScheduler, DiTTransformer2DModel

    dit = DiTTransformer2DModel.from_pretrained(WEIGHTS / "digits_dit", torch_dtype=torch.float32).eval()
    labels = torch.arange(batch) % NUM_CLASSES

    def make(denoiser):
        scheduler = DDIMScheduler(num_train_timesteps=1000)

        def generate(seed: int) -> torch.Tensor:
            scheduler.set_timesteps(STEPS)
            x = torch.randn(batch, 1, 16, 16, generator=torch.Generator().manual_seed(seed))
            for t in scheduler.timesteps:
                eps = denoiser(x, timestep=t.expand(batch), class_labels=labels).sample
                x = scheduler.step(eps, t, x, eta=0.0).prev_sample
            return (x / 2 + 0.5).clamp(0, 1).double()

        return generate

    return f"DiTTransformer2DModel digits 16x16 (8 blocks), DDIM loop, batch {batch}", make, dit


def run_model(name: str, builder, variants: dict[str, dict | None], batch: int, rounds: int,
              compile_options: dict[str, Any]) -> dict[str, Any]:
    workload, make, model = builder(batch)
    print(f"\n{name}: {workload}", flush=True)
    generators, executors, compile_s = {}, {}, {}
    with torch.no_grad():
        for variant, options in variants.items():
            torch.manual_seed(0)
            instance = copy.deepcopy(model)  # no two variants share a module (or a Dynamo cache entry)
            if variant == "eager":
                denoiser = instance
            elif options is None:
                denoiser = torch.compile(instance, backend="inductor", options=dict(compile_options) or None)
            else:
                denoiser = torch.compile(instance, backend="zc", options={**compile_options, "step_cache": options})
            generate = make(denoiser)
            gc.collect()
            before = set(step_cache._live_executors)
            start = time.perf_counter()
            generate(1234)  # compiles; the executor's state starts a new generation next call
            compile_s[variant] = time.perf_counter() - start
            executors[variant] = [e for e in step_cache._live_executors if e not in before]
            generators[variant] = generate
            print(f"  {variant}: first generation {compile_s[variant]:.1f}s", flush=True)

        # quality over two batches of 16 (seeds 0 and 1): PSNR moves by several dB between seeds
        images = {v: torch.cat([g(seed) for seed in QUALITY_SEEDS]) for v, g in generators.items()}
        for variant in generators:
            for executor in executors[variant]:
                executor.reset()
        reuse = {}
        for variant, generate in generators.items():
            generate(0)
            counters = [e.report()["counters"] for e in executors[variant]]
            computed = sum(c.get("deep_computed", 0) for c in counters)
            reused = sum(c.get("deep_reused", 0) for c in counters)
            reuse[variant] = (computed, reused)

        seconds: dict[str, list[float]] = {v: [] for v in generators}
        for _ in range(rounds):
            for variant, generate in generators.items():
                start = time.perf_counter()
                generate(0)
                seconds[variant].append(time.perf_counter() - start)

    reference = "inductor"
    table = {}
    for variant in generators:
        per_round = [r / t for r, t in zip(seconds[reference], seconds[variant])]
        computed, reused = reuse[variant]
        table[variant] = {
            "options": variants[variant],
            "median_s": statistics.median(seconds[variant]),
            "speedup_vs_inductor": statistics.median(per_round),
            "psnr_db_vs_inductor": psnr(images[variant], images[reference]),
            "ssim_vs_inductor": ssim(images[variant], images[reference]),
            "deep_computed_steps": computed if executors[variant] else None,
            "deep_reused_steps": reused if executors[variant] else None,
            # max_error: the interval its calibration (on the seed-1234 generation) chose
            "interval": executors[variant][0].interval if executors[variant] else None,
            "calibration": executors[variant][0].calibrated if executors[variant] else None,
            "first_generation_s": compile_s[variant],
        }
    rows = [
        [v, f"{r['median_s'] * 1e3:.0f}", f"{r['speedup_vs_inductor']:.2f}x",
         "exact" if r["psnr_db_vs_inductor"] == float("inf") else f"{r['psnr_db_vs_inductor']:.1f}",
         f"{r['ssim_vs_inductor']:.4f}",
         "-" if r["deep_computed_steps"] is None else f"{r['deep_computed_steps']}/{r['deep_computed_steps'] + r['deep_reused_steps']}",
         "-" if r["interval"] is None else str(r["interval"])]
        for v, r in table.items()
    ]
    print(format_table(["variant", "ms / generation", "vs inductor", "PSNR dB", "SSIM", "deep computed", "interval"], rows))
    return {"workload": workload, "steps": STEPS, "rounds": rounds, "variants": table,
            "images": {v: images[v][:10].squeeze(1).tolist() for v in images}}


def plot_samples(path: Path, results: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(model, variant, torch.tensor(images)) for model, block in results.items()
            for variant, images in block["images"].items()]
    fig, axes = plt.subplots(len(rows), 1, figsize=(8, 1.0 * len(rows)))
    for ax, (model, variant, images) in zip(axes, rows):
        ax.imshow(torch.cat(list(images), dim=1).numpy(), cmap="gray", vmin=0, vmax=1)
        ax.set_axis_off()
        psnr_db = results[model]["variants"][variant]["psnr_db_vs_inductor"]
        label = f"{model} {variant}" + ("" if psnr_db == float("inf") else f" ({psnr_db:.1f} dB)")
        ax.set_title(label, fontsize=7, loc="left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--skip-unet", action="store_true")
    parser.add_argument("--skip-dit", action="store_true")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads; 1 by default: with the 2 cores shared by other jobs, "
                             "2 threads spin against each other and run ~10x slower")
    parser.add_argument("--only", default=None,
                        help="comma-separated variant names to run (with eager and inductor), e.g. for a "
                             "longer run of a few; results go to step_cache-only.json")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (default 9, 3 with --quick)")
    parser.add_argument("--batch", type=int, default=16,
                        help="images per generation (16 is the reference workload; others write -b<N> results)")
    parser.add_argument("--skip-module-guards", action="store_true",
                        help="compile every variant with guard_filter_fn=skip_guard_on_all_nn_modules_unsafe "
                             "(measures Dynamo's guard overhead; unsafe in general)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = select_device()
    rounds = args.rounds or (3 if args.quick else 9)
    batch = args.batch
    results: dict[str, Any] = {}
    env = environment(device)
    compile_options = ({"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe}
                       if args.skip_module_guards else {})
    linear, quadratic = {"forecast": "linear"}, {"forecast": "quadratic"}
    early = {"schedule_power": 1.3}
    unet_variants = {"eager": None, "inductor": None,
                     "zc interval 3": 3,
                     "zc interval 5 depth 2": {"interval": 5, "depth": 2},
                     "zc interval 5 linear": {"interval": 5, **linear},
                     "zc interval 5 quadratic power 1.3": {"interval": 5, **quadratic, **early},
                     "zc interval 6 quadratic power 1.3": {"interval": 6, **quadratic, **early},
                     "zc interval 7 quadratic power 1.3": {"interval": 7, **quadratic, **early},
                     "zc max_error 0.07 quadratic power 1.3": {"max_error": 0.07, **quadratic, **early}}
    dit_variants = {"eager": None, "inductor": None,
                    "zc interval 3": 3, "zc threshold 0.1": {"threshold": 0.1},
                    "zc interval 6 linear": {"interval": 6, **linear},
                    "zc interval 6 quadratic": {"interval": 6, **quadratic},
                    "zc interval 8 quadratic": {"interval": 8, **quadratic},
                    "zc max_error 0.07 linear": {"max_error": 0.07, **linear}}
    if args.quick:
        unet_variants = {k: v for k, v in unet_variants.items()
                         if k in ("eager", "inductor", "zc interval 3", "zc interval 5 quadratic power 1.3")}
        dit_variants = {k: v for k, v in dit_variants.items()
                        if k in ("eager", "inductor", "zc threshold 0.1", "zc interval 6 linear")}
    if args.only:
        wanted = {"eager", "inductor", *(name.strip() for name in args.only.split(","))}
        unet_variants = {k: v for k, v in unet_variants.items() if k in wanted}
        dit_variants = {k: v for k, v in dit_variants.items() if k in wanted}
    if not args.skip_unet:
        results["unet"] = run_model("unet", unet_generator, unet_variants, batch, rounds, compile_options)
    if not args.skip_dit:
        results["dit"] = run_model("dit", dit_generator, dit_variants, batch, rounds, compile_options)
    name = ("step_cache" + ("-quick" if args.quick else "") + ("-only" if args.only else "")
            + (f"-b{batch}" if batch != 16 else "") + ("-skip-module-guards" if args.skip_module_guards else ""))
    images = {model: block.pop("images") for model, block in results.items()}
    payload = {
        "environment": env,
        "guard_filter_fn": "skip_guard_on_all_nn_modules_unsafe" if args.skip_module_guards else None,
        "note": "CPU shared with other compile jobs; ratios come from interleaved rounds in one process",
        **results,
    }
    path = write_results(args.out, device, name, payload)
    plot_ms(path.with_suffix(".png"), "step_cache: ms per 50-step generation",
            {m: {v: r["median_s"] * 1e3 for v, r in block["variants"].items()} for m, block in results.items()})
    plot_samples(path.with_name(f"{name}-samples.png"),
                 {m: {**block, "images": images[m]} for m, block in results.items()})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
