"""window_attention: banded attention vs dense masked attention, side by side in one run.

    python -m benchmarks.window_attention [--quick] [--out DIR] [--skip-approximate]

1. Attention alone, B=1, H=8, D=64, S=4096, window 256 (quick: S=1024): eager SDPA with the
   dense boolean mask; FlexAttention compiled by hand (``torch.compile(flex_attention)`` with a
   ``create_block_mask`` block mask, at its default 128-token blocks and at zc's block size); and
   zc compiling the plain user function (aranges -> window mask -> SDPA) with no user changes.
2. ``MistralForCausalLM`` from a small config (random weights) with ``sliding_window=256``,
   4k-token prefill (quick: 1k): Inductor vs zc. The config has a small hidden size (256, four
   64-dim heads, two key/value heads) so that attention, not the MLP, dominates a long prefill.
3. Approximate mode on the same dimensions as a full-attention ``LlamaForCausalLM``: speed vs
   Inductor (SDPA is_causal) for several windows, and the logits error vs eager.

Timings interleave every variant of a section in short blocks, round after round, and each
ratio is the median of the per-round ratios (the machine's speed drifts; the other helpers' jobs
load its two cores). ``--threads`` (default 1): intra-op threads; on this shared 2-core VM, two
OpenMP threads spin at barriers whenever another job holds a core, which made every kernel ~5x
slower and scattered the timings, so the recorded runs use one thread. Writes ``benchmarks/results/<device>/window_attention[-quick].json`` and a PNG.
"""

from __future__ import annotations

import argparse
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

from benchmarks.harness import (  # noqa: E402
    environment,
    format_table,
    fresh_cache,
    plot_ms,
    select_device,
    interleaved_ms,
    ratios_to,
    write_results,
)

WINDOW = 256


def compiled_first_call(build: Callable[[], Callable[[], Any]]) -> tuple[Callable[[], Any], Any, float]:
    """(call, first output, seconds of the first call: the compile) from a cold Inductor cache."""
    torch._dynamo.reset()
    with fresh_cache():
        call = build()
        start = time.perf_counter()
        out = call()
        seconds = time.perf_counter() - start
    return call, out, seconds


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.float() - expected.float()).norm() / expected.float().norm())


def attention_alone(quick: bool) -> dict[str, Any]:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    from zc.fx_passes.window_attention import CPU_BLOCK_SIZE

    batch, heads, seq, dim = 1, 8, (1024 if quick else 4096), 64
    torch.manual_seed(0)
    q, k, v = (torch.randn(batch, heads, seq, dim) for _ in range(3))

    def user_attention(q, k, v):
        """What a model does: a sliding-window causal mask from positions, then SDPA."""
        pos_q = torch.arange(q.shape[2], device=q.device)[:, None]
        pos_k = torch.arange(k.shape[2], device=q.device)[None, :]
        mask = (pos_k <= pos_q) & (pos_k > pos_q - WINDOW)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    def window_mod(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (kv_idx > q_idx - WINDOW)

    pos = torch.arange(seq)
    dense_mask = (pos[None, :] <= pos[:, None]) & (pos[None, :] > pos[:, None] - WINDOW)
    calls: dict[str, Callable[[], Any]] = {
        "sdpa + dense mask (eager)": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=dense_mask)}
    compile_s, outputs = {}, {}
    with torch.no_grad():
        reference = calls["sdpa + dense mask (eager)"]()
        for block in sorted({128, CPU_BLOCK_SIZE}):
            block_mask = create_block_mask(window_mod, 1, 1, seq, seq, device="cpu", BLOCK_SIZE=block)

            def build(block_mask=block_mask):
                flex = torch.compile(flex_attention)
                return lambda: flex(q, k, v, block_mask=block_mask)

            name = f"flex by hand (block {block})"
            calls[name], outputs[name], compile_s[name] = compiled_first_call(build)

        def build_zc():
            compiled = torch.compile(user_attention, backend="zc", options={"window_attention": True, "strict": True})
            return lambda: compiled(q, k, v)

        calls["zc"], outputs["zc"], compile_s["zc"] = compiled_first_call(build_zc)
        per_round = interleaved_ms(calls, rounds=4 if quick else 8, block_s=0.4)
    speedup_sdpa = ratios_to("sdpa + dense mask (eager)", per_round)
    zc_vs = {name: statistics.median(f / z for f, z in zip(per_round[name], per_round["zc"]))
             for name in calls if name.startswith("flex")}
    return {
        "workload": f"attention alone B={batch} H={heads} D={dim} S={seq} window {WINDOW} (causal), fp32",
        "variants": {
            name: {
                "median_ms": statistics.median(per_round[name]),
                "speedup_vs_sdpa_mask": speedup_sdpa[name],
                "zc_speedup_vs_this": zc_vs.get(name),
                "compile_s": compile_s.get(name),
                "max_abs_error_vs_sdpa": float((outputs[name] - reference).abs().max()) if name in outputs else 0.0,
            }
            for name in calls
        },
    }


def _causal_lm(kind: str, quick: bool, sliding_window: int | None):
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    common = dict(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192)
    torch.manual_seed(0)
    if kind == "mistral":
        config = MistralConfig(sliding_window=sliding_window, **common)
        config._attn_implementation = "sdpa"
        return MistralForCausalLM(config).eval()
    config = LlamaConfig(**common)
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config).eval()


def mistral(quick: bool) -> dict[str, Any]:
    seq = 1024 if quick else 4096
    model = _causal_lm("mistral", quick, WINDOW)
    ids = torch.randint(0, 1024, (1, seq))
    calls, outputs, compile_s = {}, {}, {}
    with torch.no_grad():
        reference = model(ids).logits
        for name, build in (
            ("inductor", lambda: torch.compile(model, backend="inductor")),
            ("zc", lambda: torch.compile(model, backend="zc", options={"window_attention": True, "strict": True})),
        ):
            def make(build=build):
                compiled = build()
                return lambda: compiled(ids).logits

            calls[name], outputs[name], compile_s[name] = compiled_first_call(make)
        per_round = interleaved_ms(calls, rounds=3 if quick else 5, block_s=0.5)
    speedup = ratios_to("inductor", per_round)
    return {
        "workload": (f"MistralForCausalLM config hidden 256, 4 heads x 64 (2 kv heads), intermediate 512, "
                     f"{model.config.num_hidden_layers} layers, sliding_window {WINDOW}, prefill 1 x {seq} tokens "
                     "(random weights, KV cache on as in generation)"),
        "variants": {
            name: {"median_ms": statistics.median(per_round[name]), "speedup_vs_inductor": speedup[name],
                   "compile_s": compile_s[name], "logits_rel_error_vs_eager": rel_error(outputs[name], reference)}
            for name in calls
        },
    }


def approximate(quick: bool) -> dict[str, Any]:
    seq = 1024 if quick else 4096
    windows = (128, 512) if quick else (256, 1024, 2048)
    model = _causal_lm("llama", quick, None)
    ids = torch.randint(0, 1024, (1, seq))
    calls, outputs, compile_s = {}, {}, {}
    with torch.no_grad():
        reference = model(ids).logits
        builds = [("inductor (full causal)", lambda: torch.compile(model, backend="inductor"))]
        builds += [(f"zc window {w}", lambda w=w: torch.compile(model, backend="zc", options={"window_attention": w}))
                   for w in windows]
        builds.append((f"zc window {windows[0]}, sink 4, 2 head groups", lambda: torch.compile(
            model, backend="zc", options={"window_attention": {"window": windows[0], "sink": 4, "head_groups": 2}})))
        for name, build in builds:
            def make(build=build):
                compiled = build()
                return lambda: compiled(ids).logits

            calls[name], outputs[name], compile_s[name] = compiled_first_call(make)
        per_round = interleaved_ms(calls, rounds=3 if quick else 4, block_s=0.5)
    speedup = ratios_to("inductor (full causal)", per_round)
    return {
        "workload": (f"LlamaForCausalLM config (full attention) hidden 256, 4 heads x 64 (2 kv heads), "
                     f"{model.config.num_hidden_layers} layers, prefill 1 x {seq} tokens (random weights); "
                     "zc approximate windows vs Inductor's dense causal SDPA"),
        "variants": {
            name: {
                "median_ms": statistics.median(per_round[name]),
                "speedup_vs_inductor": speedup[name],
                "compile_s": compile_s[name],
                "logits_rel_error_vs_eager": rel_error(outputs[name], reference),
                "top1_agreement": float((outputs[name].argmax(-1) == reference.argmax(-1)).float().mean()),
            }
            for name in calls
        },
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--skip-approximate", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = select_device()
    if device.type != "cpu":
        print("note: this benchmark measures the CPU kernels; running it on CPU tensors")
    results = {"environment": environment(torch.device("cpu")), "attention": attention_alone(args.quick),
               "mistral": mistral(args.quick)}
    if not args.skip_approximate:
        results["approximate"] = approximate(args.quick)
    sections = [s for s in ("attention", "mistral", "approximate") if s in results]
    for section in sections:
        block = results[section]
        print(f"\n{block['workload']}")
        metric_names = list(dict.fromkeys(k for v in block["variants"].values() for k in v if k != "median_ms"))
        rows = [[n, f"{v['median_ms']:.1f}", *(f"{v[k]:.4g}" if isinstance(v.get(k), float) else "-" for k in metric_names)]
                for n, v in block["variants"].items()]
        print(format_table(["variant", "median ms", *metric_names], rows))
    name = "window_attention" + ("-quick" if args.quick else "")
    path = write_results(args.out, torch.device("cpu"), name, results)
    plot_ms(path.with_suffix(".png"), "window_attention: median ms per call (CPU)",
            {s: {n: v["median_ms"] for n, v in results[s]["variants"].items()} for s in sections})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
