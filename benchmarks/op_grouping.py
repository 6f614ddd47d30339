"""op_grouping: peak activation memory (measured) and time of eager / Inductor / zc / diffusers' own slicing.

    python -m benchmarks.op_grouping [--quick] [--out DIR] [--only NAME ...]

Workloads (real transformers / diffusers classes, random weights, fp32 CPU):
* ``llama_ffn``: ``LlamaMLP`` + residual at a long sequence (batch 1);
* ``vae_decoder``: ``AutoencoderKL.decode`` of a batch of latents (diffusers' ``enable_slicing``
  decodes them one by one, eagerly; ``enable_tiling`` decodes overlapping tiles and blends them:
  approximate);
* ``vae_decoder_hires``: the same decoder, one latent at twice the size (only row bands can cut it);
* ``unet_motion``: ``UNetMotionModel`` (AnimateDiff-like, small config, 16 frames; diffusers'
  ``enable_forward_chunking`` chunks the feed-forwards).

Peak activation memory is measured, not estimated, two ways, each (workload, variant) in a fresh
subprocess after two calls (compile, warm-up):
* allocator (the headline figure): the peak over one call of the bytes held by tensors allocated
  during it, from the PyTorch profiler's memory events (``profile_memory=True``: every
  allocation and free of the CPU allocator, cumulated in time order). It counts tensors only
  (not oneDNN's scratch space), exactly, whatever their size;
* RSS: glibc's mmap threshold pinned low (so freed buffers go back to the OS), the kernel's
  high-water mark reset (``/proc/self/clear_refs``), ``VmHWM`` after one call minus ``VmRSS``
  before it. It misses allocations under the mmap threshold served from heap pages earlier calls
  left resident (the UNet's small slices read "0.0" this way), so it is kept as a cross-check. Time per call is measured in the parent process, all
variants interleaved in short blocks (the machine is shared and drifts), as the median over 9 rounds
of the ratio to Inductor (3 rounds let one slow round decide: the batch-4 decoder read 1.18x once,
1.02x-1.05x in other runs of the same code).
Timings use ``--threads`` intra-op threads (1 by default): on the 2-core machine shared with three
other jobs, OpenMP kernels with 2 threads stall at their barriers whenever a core is taken, which
penalises a call in proportion to how many kernels it launches (measured: eight 512-row GEMMs
take 1.4x the time of one 4096-row GEMM with 2 threads under load, 0.75x with 1 thread).
Outputs are compared with Inductor's (``max_abs_vs_inductor``, exact when 0) and eager's.
For the decoders, Inductor's time per convolution shape is profiled too
(``inductor_convolution_times``): what computing an activation twice instead of holding it would cost.
Writes ``benchmarks/results/<device>/op_grouping[-quick].json`` and a PNG.

On a machine with a GPU, models and inputs go to it and both memory columns are the CUDA caching
allocator's peak over one call beyond what it held before (``torch.cuda.max_memory_allocated``
after ``reset_peak_memory_stats``, the output included), exact for tensors; Inductor and zc then
emit Triton kernels.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.harness import environment, format_table, select_device, timed_block, write_results  # noqa: E402
from benchmarks.models import small_unet_motion  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ZC_SLICES = 8


class ResidualMLP(torch.nn.Module):
    def __init__(self, mlp: torch.nn.Module):
        super().__init__()
        self.mlp = mlp

    def forward(self, x):
        return self.mlp(x) + x


class Decoder(torch.nn.Module):
    def __init__(self, vae: torch.nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, z):
        return self.vae.decode(z).sample


class MotionUNet(torch.nn.Module):
    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states):
        return self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]


def llama_ffn(quick: bool) -> tuple[torch.nn.Module, tuple, dict[str, Callable]]:
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    hidden, intermediate, tokens = (256, 1024, 4096) if quick else (512, 2048, 8192)
    model = ResidualMLP(LlamaMLP(LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, hidden_act="silu")))
    return model.eval(), (torch.randn(1, tokens, hidden),), {}


def vae_decoder(quick: bool) -> tuple[torch.nn.Module, tuple, dict[str, Callable]]:
    from diffusers import AutoencoderKL

    batch, latent = (4, 32) if quick else (4, 64)
    vae = AutoencoderKL(block_out_channels=(32, 64, 64), down_block_types=("DownEncoderBlock2D",) * 3,
                        up_block_types=("UpDecoderBlock2D",) * 3, latent_channels=4, norm_num_groups=16,
                        layers_per_block=1).eval()

    return Decoder(vae).eval(), (torch.randn(batch, 4, latent, latent),), _vae_own(batch)


def vae_decoder_hires(quick: bool) -> tuple[torch.nn.Module, tuple, dict[str, Callable]]:
    from diffusers import AutoencoderKL

    latent = 64 if quick else 128
    vae = AutoencoderKL(block_out_channels=(32, 64, 64), down_block_types=("DownEncoderBlock2D",) * 3,
                        up_block_types=("UpDecoderBlock2D",) * 3, latent_channels=4, norm_num_groups=16,
                        layers_per_block=1).eval()
    return Decoder(vae).eval(), (torch.randn(1, 4, latent, latent),), _vae_own(1)


def _vae_own(batch: int) -> dict[str, Callable]:
    """diffusers' own memory savers for the decoder: slicing (one latent at a time, for a
    batch) and tiling (overlapping latent tiles of ``sample_size / 4``, blended: approximate)."""

    def sliced(model):
        model.vae.enable_slicing()
        return model

    def tiled(model):
        model.vae.enable_tiling()
        return model

    return ({"diffusers enable_slicing": sliced} if batch > 1 else {}) | {"diffusers enable_tiling": tiled}


def unet_motion(quick: bool) -> tuple[torch.nn.Module, tuple, dict[str, Callable]]:
    frames, size = (16, 16) if quick else (16, 32)
    unet = small_unet_motion()

    def chunked(model):
        model.unet.enable_forward_chunking(chunk_size=1, dim=1)
        return model

    args = (torch.randn(1, 4, frames, size, size), torch.tensor(10), torch.randn(frames, 8, 32))
    return MotionUNet(unet).eval(), args, {"diffusers enable_forward_chunking": chunked}


WORKLOADS: dict[str, Callable[[bool], tuple[torch.nn.Module, tuple, dict[str, Callable]]]] = {
    "llama_ffn": llama_ffn,
    "vae_decoder": vae_decoder,
    "vae_decoder_hires": vae_decoder_hires,
    "unet_motion": unet_motion,
}


def build(name: str, quick: bool) -> tuple[torch.nn.Module, tuple, dict[str, Callable]]:
    """The workload's model and inputs, on the benchmark's device (the GPU when there is one)."""
    torch.manual_seed(0)
    model, args, own = WORKLOADS[name](quick)
    device = select_device()
    # cuDNN's TF32 convolutions (on by default) differ from Inductor's by ~1e-3: fp32 throughout.
    torch.backends.cudnn.allow_tf32 = False
    return model.to(device), tuple(a.to(device) for a in args), own


def variant_names(name: str, quick: bool) -> list[str]:
    _, _, own = build(name, quick)
    # The decoders also without row bands: what batch slicing alone gives.
    plain = ["zc no spatial"] if name.startswith("vae") else []
    return ["eager", "inductor", "zc", *plain, *own]


def prepare(name: str, variant: str, quick: bool) -> tuple[Callable[..., Any], tuple]:
    model, args, own = build(name, quick)
    if variant == "eager":
        return model, args
    if variant == "inductor":
        return torch.compile(model, backend="inductor"), args
    if variant == "zc":
        # Row bands (spatial) are opt-in: on for the decoders, where they are tested exact.
        options = {"op_grouping": {"max_slices": ZC_SLICES, "spatial": name.startswith("vae")}}
        return torch.compile(model, backend="zc", options=options), args
    if variant == "zc no spatial":
        options = {"op_grouping": {"max_slices": ZC_SLICES, "spatial": False}}
        return torch.compile(model, backend="zc", options=options), args
    return own[variant](model), args


def _status(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def child_peak(name: str, variant: str, quick: bool) -> dict[str, Any]:
    """In a fresh process: bytes one call adds to the resident set at its peak (on a GPU: to the
    CUDA caching allocator's allocated bytes, ``torch.cuda.max_memory_allocated``)."""
    run, args = prepare(name, variant, quick)
    with torch.no_grad():
        run(*args)
        run(*args)
        gc.collect()
        if select_device().type == "cuda":
            return cuda_peak(lambda: run(*args))
        peaks = []
        for _ in range(2):
            before = _status("VmRSS")
            with open("/proc/self/clear_refs", "w") as refs:
                refs.write("5")  # resets VmHWM to the current resident set
            out = run(*args)
            peaks.append(_status("VmHWM") - before)
            del out
            gc.collect()
        allocated = max(allocated_peak(lambda: run(*args)) for _ in range(2))
    return {"peak_activation_bytes": max(peaks), "resident_bytes_before_call": before,
            "peak_allocated_bytes": allocated}


def allocated_peak(call: Callable[[], Any]) -> int:
    """Peak bytes held by the tensors allocated during ``call`` (the output included), from the
    profiler's record of every allocation and free of the CPU allocator."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = call()
        del out
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def cuda_peak(call: Callable[[], Any]) -> dict[str, Any]:
    """Peak bytes the CUDA allocator held over one call beyond what it held before (the output
    included): the max of two calls."""
    peaks = []
    for _ in range(2):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = call()
        torch.cuda.synchronize()
        peaks.append(torch.cuda.max_memory_allocated() - before)
        del out
    # No resident-set cross-check on a GPU: the allocator's figure is exact there.
    return {"peak_activation_bytes": max(peaks), "resident_bytes_before_call": before,
            "peak_allocated_bytes": max(peaks)}


def measure_peak(name: str, variant: str, quick: bool, threads: int) -> dict[str, Any]:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    command = [sys.executable, "-m", "benchmarks.op_grouping", "--child", name, variant, "--threads", str(threads)]
    command += ["--quick"] if quick else []
    done = subprocess.run(command, capture_output=True, text=True, env=env,
                          cwd=Path(__file__).resolve().parent.parent)
    if done.returncode != 0:
        raise RuntimeError(f"memory run of {name}/{variant} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def zc_report(name: str, quick: bool) -> dict[str, Any]:
    """op_grouping's report (chains, slice counts, estimated peaks) for the workload's zc compile."""
    import tempfile

    from zc.dump import load_report

    model, args, _ = build(name, quick)
    with tempfile.TemporaryDirectory() as dump, torch.no_grad():
        torch._dynamo.reset()
        options = {"op_grouping": {"max_slices": ZC_SLICES, "spatial": name.startswith("vae")}, "dump": dump}
        torch.compile(model, backend="zc", options=options)(*args)
        passes = [p for graph in sorted(Path(dump).iterdir()) for s in load_report(graph)["stages"]
                  for p in s["passes"] if p["name"] == "op_grouping"]
    return {
        "status": [p["status"] for p in passes],
        "estimated_peak_bytes": [(p["metrics"].get("estimated_peak_bytes_before"),
                                  p["metrics"].get("estimated_peak_bytes_after")) for p in passes],
        "chains": [{k: c.get(k) for k in ("seed", "dim", "units", "slices", "kind")} | {"ops": len(c["ops"])}
                   for p in passes for c in p["metrics"].get("chains", [])],
    }


def convolution_times(call: Callable[[], Any], call_ms: float, calls: int = 5) -> dict[str, Any]:
    """Milliseconds per call of each convolution shape (``aten::convolution``, from the profiler),
    as a share of ``call_ms`` (the unprofiled time of a call: the profiler slows the rest of the
    call, not a convolution): what recomputing one convolution's output would add."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(calls):
            call()
    by_shape: dict[str, float] = {}
    for event in prof.events():
        if event.name == "aten::convolution":
            key = f"{event.input_shapes[0]} * {event.input_shapes[1]}"
            by_shape[key] = by_shape.get(key, 0.0) + event.cpu_time_total / 1e3 / calls
    return {"call_ms": call_ms, "convolutions": [
        {"input * weight": key, "ms": ms, "share_of_call": ms / call_ms}
        for key, ms in sorted(by_shape.items(), key=lambda kv: -kv[1])]}


def run_workload(name: str, quick: bool, rounds: int, threads: int) -> dict[str, Any]:
    names = variant_names(name, quick)
    memory = {}
    for variant in names:  # progress on stderr: a run stopped at a time limit still shows these
        memory[variant] = measure_peak(name, variant, quick, threads)
        print(f"{name} / {variant}: peak {memory[variant]['peak_allocated_bytes'] / 1e6:.2f} MB", file=sys.stderr, flush=True)
    calls, outputs = {}, {}
    torch._dynamo.reset()
    with torch.no_grad():
        for variant in names:
            run, args = prepare(name, variant, quick)
            outputs[variant] = run(*args).clone()
            calls[variant] = (lambda run=run, args=args: run(*args))
        per_round: dict[str, list[float]] = {v: [] for v in names}
        for _ in range(rounds):
            for variant, call in calls.items():
                per_round[variant].append(statistics.median(timed_block(call, select_device(), 0.3)))
    reference = outputs["inductor"]
    scale = outputs["eager"].abs().max().item()
    result = {"variants": {}, "zc_report": zc_report(name, quick)}
    if name.startswith("vae"):
        # Inductor's time per convolution: the price of computing a large activation twice
        # instead of holding it whole (what an exact schedule below a group norm's input needs).
        with torch.no_grad():
            result["inductor_convolution_times"] = convolution_times(calls["inductor"], statistics.median(per_round["inductor"]))
    for variant in names:
        ratio = statistics.median(t / r for t, r in zip(per_round[variant], per_round["inductor"]))
        result["variants"][variant] = {
            "peak_allocated_mb": memory[variant]["peak_allocated_bytes"] / 1e6,
            "allocated_vs_inductor": memory[variant]["peak_allocated_bytes"] / memory["inductor"]["peak_allocated_bytes"],
            "peak_activation_mb": memory[variant]["peak_activation_bytes"] / 1e6,
            "memory_vs_inductor": memory[variant]["peak_activation_bytes"] / max(1, memory["inductor"]["peak_activation_bytes"]),
            "median_ms": statistics.median(per_round[variant]),
            "time_vs_inductor": ratio,
            "max_abs_vs_inductor": (outputs[variant] - reference).abs().max().item(),
            "rel_err_vs_eager": (outputs[variant] - outputs["eager"]).abs().max().item() / scale,
        }
    model, args, _ = build(name, quick)
    result["inputs"] = [list(a.shape) for a in args if isinstance(a, torch.Tensor)]
    return result


def plot(path: Path, results: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = [w for w in WORKLOADS if w in results]
    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    for ax, key, label in ((axes[0], "peak_allocated_mb", "peak allocated MB (measured, profiler)"),
                           (axes[1], "time_vs_inductor", "time / Inductor time")):
        variants = list(dict.fromkeys(v for w in workloads for v in results[w]["variants"]))
        width = 0.8 / len(variants)
        for i, variant in enumerate(variants):
            xs = [m + (i - (len(variants) - 1) / 2) * width for m in range(len(workloads))]
            heights = [results[w]["variants"].get(variant, {}).get(key, float("nan")) for w in workloads]
            bars = ax.bar(xs, heights, width, label=variant)
            ax.bar_label(bars, fmt="%.3g", fontsize=7)
        ax.set_xticks(range(len(workloads)), workloads)
        ax.set_ylabel(label)
    # below both panels, so it never covers a bar (the decoders' tall bars filled every corner)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 4), fontsize=8)
    device = "GPU" if select_device().type == "cuda" else "CPU"
    fig.suptitle(f"op_grouping ({device}, fp32): peak activation memory and time")
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", nargs="*", choices=list(WORKLOADS))
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--child", nargs=2, metavar=("WORKLOAD", "VARIANT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(child_peak(*args.child, args.quick)))
        return
    device = select_device()
    results: dict[str, Any] = {"environment": environment(device), "zc_slices": ZC_SLICES, "threads": args.threads}
    for name in args.only or WORKLOADS:
        results[name] = run_workload(name, args.quick, rounds=9, threads=args.threads)
        block = results[name]
        print(f"\n{name} {block['inputs']}  (zc chains: {block['zc_report']['chains']})")
        rows = [[v, f"{m['peak_allocated_mb']:.2f}", f"{m['allocated_vs_inductor']:.3f}", f"{m['peak_activation_mb']:.1f}",
                 f"{m['median_ms']:.0f}", f"{m['time_vs_inductor']:.2f}", f"{m['max_abs_vs_inductor']:.2g}",
                 f"{m['rel_err_vs_eager']:.2g}"]
                for v, m in block["variants"].items()]
        if "inductor_convolution_times" in block:
            times = block["inductor_convolution_times"]
            print(f"Inductor convolutions (profiled; share of the {times['call_ms']:.0f} ms call): " + ", ".join(
                f"{c['input * weight']} {c['ms']:.1f} ms ({c['share_of_call']:.0%})" for c in times["convolutions"][:4]))
        print(format_table(["variant", "peak alloc. MB", "alloc / inductor", "RSS peak MB", "median ms",
                            "time / inductor", "max |out - inductor|", "rel err vs eager"], rows), flush=True)
    name = "op_grouping" + ("-quick" if args.quick else "")
    path = write_results(args.out, device, name, results)
    plot(path.with_suffix(".png"), results)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
