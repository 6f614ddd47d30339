"""window_attention: exactness on masks real transformers models build (Mistral, Qwen2) with
padding and KV caches, the dense fallback, dynamic shapes without recompiles, the generated flex
kernel, approximate windows, and bad input.

Most tests run the rewritten Dynamo graph eagerly (FlexAttention's eager implementation honours
the block mask and the mask_mod), which checks the rewrite without an Inductor compile; two
tests compile end to end through zc and Inductor.
"""

import pytest
import torch
import torch._dynamo.utils as dynamo_utils
from torch._inductor.utils import run_and_get_code
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

from tests.fx_passes.capture import capture_graph
from zc.config import ZcConfig
from zc.fx_passes import window_attention
from zc.fx_passes.pass_manager import PassReport

WINDOW = 16
BLOCK = 16  # small blocks so that short test sequences have skippable blocks


def mistral(window=WINDOW, layers=2, attention="sdpa"):
    config = MistralConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                           num_attention_heads=4, num_key_value_heads=2, sliding_window=window,
                           max_position_embeddings=512)
    config._attn_implementation = attention
    return MistralForCausalLM(config).eval()


def qwen2(window=WINDOW):
    config = Qwen2Config(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, use_sliding_window=True,
                         sliding_window=window, max_window_layers=0, max_position_embeddings=512)
    config._attn_implementation = "sdpa"
    return Qwen2ForCausalLM(config).eval()


def prepare(gm, example, options):
    """The pass on a captured graph, its 'compiled' graph being the rewritten FX graph itself."""
    config = ZcConfig.from_options({"window_attention": options}, environ={}).window_attention
    report = PassReport("window_attention")
    with torch.no_grad():
        executor = window_attention.prepare(gm, example, config, lambda g, inputs=None: g, report, lambda g: None)
    return executor, report


def rewrite(model, kwargs, dynamic=None, **options):
    """(original graph, executor or None, example inputs, report) with the rewritten graph run eagerly."""
    gm, example = capture_graph(model, dynamic=dynamic, **kwargs)
    executor, report = prepare(gm, example, {"block_size": BLOCK, **options})
    return gm, executor, example, report


def assert_exact(gm, executor, example):
    with torch.no_grad():
        expected = gm(*example)
        got = executor(*example)
    for e, g in zip(expected, got):
        if isinstance(e, torch.Tensor) and e.is_floating_point():
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


def logits(outputs):
    return next(o for o in outputs if isinstance(o, torch.Tensor) and o.dim() == 3 and o.shape[-1] == 97)


def flex_calls(executor):
    return [n for n in executor.compiled.graph.nodes if n.target is torch.ops.higher_order.flex_attention]


@pytest.mark.parametrize("use_cache", [False, True])
def test_mistral_prefill_is_exact_and_banded(use_cache):
    ids = torch.randint(0, 97, (1, 64))
    gm, executor, example, report = rewrite(mistral(), {"input_ids": ids, "use_cache": use_cache})
    assert executor is not None, report.skips
    assert report.status == "applied" and len(report.rewrites) == 2
    assert len(flex_calls(executor)) == 2
    # Grouped-query attention: flex reads the 2 key/value heads, transformers' repeat_kv copy is gone.
    assert all(c.args[1].meta["example_value"].shape[1] == 2 for c in flex_calls(executor))
    assert not any(n.target in window_attention.SDPA_TARGETS for n in executor.compiled.graph.nodes)
    assert_exact(gm, executor, example)
    # One block mask per shape, shared by both layers: 4x4 blocks, each query block sees at
    # most two key blocks (its own and the previous: window 16 = one block).
    kv_num_blocks = executor.block_masks[next(iter(executor.block_masks))][0]
    full = executor.block_masks[next(iter(executor.block_masks))][2] if executor.specs[0].full_blocks else 0
    assert int((kv_num_blocks + full).max()) == 2
    # Without a cache transformers checks packed sequences (a cumsum over positions): that term
    # stays in the mask as a leaf, so no block is marked full; with a cache the mask is index-only.
    assert executor.specs[0].full_blocks == use_cache


def test_qwen2_prefill_is_exact():
    ids = torch.randint(0, 97, (2, 48))
    gm, executor, example, report = rewrite(qwen2(), {"input_ids": ids})
    assert executor is not None and len(report.rewrites) == 2, report.skips
    assert_exact(gm, executor, example)


def test_gemma3_sliding_layers_with_padding_are_exact():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=WINDOW,
                              layer_types=["sliding_attention", "full_attention"], max_position_embeddings=512)
    config._attn_implementation = "sdpa"
    ids = torch.randint(0, 97, (2, 64))
    attention_mask = torch.ones(2, 64, dtype=torch.long)
    attention_mask[0, :5] = 0
    gm, executor, example, report = rewrite(Gemma3ForCausalLM(config).eval(), {"input_ids": ids, "attention_mask": attention_mask})
    assert executor is not None, report.skips
    # The sliding layer and the full (causal + padding) layer both become flex: the causal
    # structure alone skips the blocks above the diagonal.
    assert len(report.rewrites) == 2
    assert_exact(gm, executor, example)


def test_padding_with_window_is_exact():
    ids = torch.randint(0, 97, (2, 64))
    attention_mask = torch.ones(2, 64, dtype=torch.long)
    attention_mask[1, :9] = 0  # left padding
    gm, executor, example, report = rewrite(mistral(), {"input_ids": ids, "attention_mask": attention_mask})
    assert executor is not None and len(report.rewrites) == 2, report.skips
    assert "attention_mask" in report.rewrites[0]["what"]  # the padding mask is read by the mask_mod
    assert not executor.specs[0].full_blocks
    with torch.no_grad():
        expected = logits(gm(*example))
        got = logits(executor(*example))
    # Padded query rows see no key at all: both SDPA on CPU and flex return zeros there.
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_eager_matmul_softmax_matmul_attention_is_exact():
    """transformers' eager attention (additive where(mask, 0, min) before the softmax)."""
    ids = torch.randint(0, 97, (2, 64))
    attention_mask = torch.ones(2, 64, dtype=torch.long)
    attention_mask[1, :9] = 0
    gm, executor, example, report = rewrite(mistral(attention="eager"), {"input_ids": ids, "attention_mask": attention_mask})
    assert executor is not None and len(report.rewrites) == 2, report.skips
    assert not any(n.target is torch.nn.functional.softmax for n in executor.compiled.graph.nodes)
    with torch.no_grad():
        expected = logits(gm(*example))
        got = logits(executor(*example))
    # Rows that see no key (the first padding query) differ by convention: eager softmax
    # averages every value there, flex returns zeros. Every other row matches.
    torch.testing.assert_close(got[0], expected[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1, 9:], expected[1, 9:], rtol=1e-5, atol=1e-5)


def test_gemma2_eager_attention_with_logit_softcapping_is_exact():
    """Gemma2 (eager attention only): tanh softcapping between the scores and the mask becomes
    flex's score_mod; its sliding layer and its full causal layer both become flex."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    def gemma2(softcap):
        config = Gemma2Config(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=WINDOW,
                              attn_logit_softcapping=softcap, max_position_embeddings=512)
        config._attn_implementation = "eager"
        return Gemma2ForCausalLM(config).eval()

    model, uncapped = gemma2(1.0), gemma2(None)
    with torch.no_grad():
        for layer in model.model.layers:  # scores large enough for the cap to matter
            layer.self_attn.q_proj.weight.mul_(40)
    uncapped.load_state_dict(model.state_dict())
    ids = torch.randint(0, 97, (1, 64))
    with torch.no_grad():
        assert (model(ids).logits - uncapped(ids).logits).abs().max() > 1e-4  # 10x the tolerance below
    gm, executor, example, report = rewrite(model, {"input_ids": ids})
    assert executor is not None and len(report.rewrites) == 2, report.skips
    assert "tanh" in executor.compiled.zc_window_score_mod_0.code
    assert_exact(gm, executor, example)


def test_chunked_prefill_and_single_token_decode_with_kv_cache():
    model = mistral()
    ids = torch.randint(0, 97, (1, 80))
    with torch.no_grad():
        cache = DynamicCache(config=model.config)
        model(ids[:, :40], past_key_values=cache, use_cache=True)
    # A 24-token chunk after 40 cached tokens: query positions are offset by the cache.
    gm, executor, example, report = rewrite(model, {"input_ids": ids[:, 40:64], "past_key_values": cache})
    assert executor is not None, report.skips
    assert_exact(gm, executor, example)
    # One token: the cache holds the window, so every key is visible and nothing is banded.
    gm, executor, example, report = rewrite(model, {"input_ids": ids[:, 40:41], "past_key_values": cache})
    assert executor is None
    assert report.skips and all("dense SDPA kept" in s["reason"] or "no attention mask" in s["reason"] for s in report.skips)


def test_window_not_shorter_than_sequence_keeps_dense_attention():
    ids = torch.randint(0, 97, (2, 40))
    # No padding: transformers itself passes no mask (is_causal).
    _, executor, _, report = rewrite(mistral(window=64), {"input_ids": ids})
    assert executor is None and all("no attention mask" in s["reason"] for s in report.skips)
    # Padding: a mask is built, but with 128-token blocks every block is needed: SDPA stays.
    attention_mask = torch.ones(2, 40, dtype=torch.long)
    attention_mask[0, :3] = 0
    gm, example = capture_graph(mistral(window=64), input_ids=ids, attention_mask=attention_mask)
    executor, report = prepare(gm, example, True)
    assert executor is None
    assert report.skips and all("covers every key block" in s["reason"] for s in report.skips), report.skips


class BidirectionalBand(torch.nn.Module):
    """An encoder's local attention: keys within 8 positions either side, plus a padding mask."""

    def forward(self, q, k, v, padding):
        distance = torch.arange(q.shape[2])[:, None] - torch.arange(k.shape[2])[None, :]
        mask = (abs(distance) <= 8) & padding[:, None, None, :].bool()
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def test_bidirectional_band_from_distances_is_exact():
    q, k, v = (torch.randn(2, 2, 96, 8) for _ in range(3))
    padding = torch.ones(2, 96, dtype=torch.long)
    padding[1, 80:] = 0
    gm, example = capture_graph(BidirectionalBand(), q=q, k=k, v=v, padding=padding)
    executor, report = prepare(gm, example, {"block_size": BLOCK})
    assert executor is not None, report.skips
    assert_exact(gm, executor, example)
    kv_num_blocks = next(iter(executor.block_masks.values()))[0]
    assert int(kv_num_blocks.max()) == 3  # a 16-row block sees its own key block and one each side


class DenseMaskAttention(torch.nn.Module):
    """Attention whose mask is an input: nothing proves it banded."""

    def forward(self, q, k, v, mask):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def test_unprovable_mask_is_reported_and_left_alone():
    q = torch.randn(1, 2, 32, 8)
    mask = torch.ones(32, 32, dtype=torch.bool).tril()
    gm, example = capture_graph(DenseMaskAttention(), q=q, k=q, v=q, mask=mask)
    executor, report = prepare(gm, example, True)
    assert executor is None
    assert report.status == "skipped"
    assert "mask not provably banded" in report.skips[0]["reason"] and "l_mask_" in report.skips[0]["reason"]


def test_bad_options():
    for options, match in [
        (0, "window_attention.window"),
        ([16, -1], "window_attention.window"),
        ({"window": 16, "head_groups": 0}, "window_attention.head_groups"),
        ({"window": 16, "sink": -2}, "window_attention.sink"),
        ({"block_size": 20}, "window_attention.block_size"),
        ({"sink": 4}, "window_attention.sink"),
    ]:
        with pytest.raises(ValueError, match=match):
            ZcConfig.from_options({"window_attention": options}, environ={})
    ids = torch.randint(0, 97, (1, 32))
    with pytest.raises(ValueError, match="window_attention.window.*3 windows.*2 attention calls"):
        rewrite(mistral(), {"input_ids": ids}, window=[8, 8, 8])
    with pytest.raises(ValueError, match="window_attention.head_groups"):
        rewrite(mistral(), {"input_ids": ids}, window=8, head_groups=3)


def llama():
    config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config).eval()


def test_approximate_window_equals_a_sliding_window_model():
    """A full-attention Llama with window W computes what the same weights do as a Mistral
    with sliding_window=W (same architecture apart from the mask)."""
    torch.manual_seed(0)
    full = llama()
    sliding = mistral(window=WINDOW)
    sliding.load_state_dict(full.state_dict())
    ids = torch.randint(0, 97, (1, 64))
    gm, executor, example, report = rewrite(full, {"input_ids": ids}, window=WINDOW)
    assert executor is not None and len(report.rewrites) == 2
    with torch.no_grad():
        got = logits(executor(*example))
        expected = sliding(ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_approximate_head_groups_and_sink():
    torch.manual_seed(0)
    ids = torch.randint(0, 97, (1, 64))
    gm, executor, example, report = rewrite(llama(), {"input_ids": ids}, window=[16, 32], head_groups=2, sink=4)
    assert executor is not None
    assert "window [8, 16], sink 4" in report.rewrites[0]["what"]
    mask_mod = executor.compiled.get_submodule("zc_window_mask_0")
    q_idx, kv_idx = torch.tensor(40), torch.tensor(list(range(64)))
    visible = [[bool(mask_mod(torch.tensor(0), torch.tensor(h), q_idx, kv)) for kv in kv_idx] for h in (0, 3)]
    assert [i for i, v in enumerate(visible[0]) if v] == list(range(4)) + list(range(33, 41))  # window 8 + sink
    assert [i for i, v in enumerate(visible[1]) if v] == list(range(4)) + list(range(25, 41))  # window 16 + sink


def test_end_to_end_flex_kernel_exact_and_no_recompiles_across_lengths():
    """zc + Inductor with dynamic shapes: one graph for every length, one block mask per length,
    and the generated code runs Inductor's flex attention template instead of SDPA."""
    model = mistral()
    compiled = torch.compile(model, backend="zc", dynamic=True,
                             options={"window_attention": {"block_size": BLOCK}, "strict": True})
    with torch.no_grad():
        ids = torch.randint(0, 97, (1, 48))
        got, code = run_and_get_code(lambda: compiled(ids).logits)
        torch.testing.assert_close(got, model(ids).logits, rtol=1e-4, atol=1e-4)
        graphs = dynamo_utils.counters["stats"]["unique_graphs"]
        for length in (64, 80, 64):
            ids = torch.randint(0, 97, (1, length))
            torch.testing.assert_close(compiled(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)
    assert dynamo_utils.counters["stats"]["unique_graphs"] == graphs
    source = "\n".join(code)
    assert "scaled_dot_product" not in source
    assert "flex_attention" in source


def test_end_to_end_padded_batch_reads_the_padding_mask_in_the_flex_kernel():
    """A left-padded batch through Inductor (static shapes): the C++ flex kernel reads the
    padding mask input. With dynamic shapes the C++ template cannot read a dynamic-shape
    buffer (torch 2.13), so the pass keeps SDPA there and says so."""
    model = mistral()
    attention_mask = torch.ones(2, 64, dtype=torch.long)
    attention_mask[1, :5] = 0
    batch = {"input_ids": torch.randint(0, 97, (2, 64)), "attention_mask": attention_mask}
    compiled = torch.compile(model, backend="zc", options={"window_attention": {"block_size": BLOCK}, "strict": True})
    with torch.no_grad():
        got, code = run_and_get_code(lambda: compiled(**batch).logits)
        torch.testing.assert_close(got, model(**batch).logits, rtol=1e-4, atol=1e-4)
    source = "\n".join(code)
    assert "scaled_dot_product" not in source and "flex_attention" in source
    # Dynamic shapes: the padding mask's shape is symbolic (and Dynamo may also lift the
    # attention scale into a graph value); either way the pass steps aside, with the reason.
    _, executor, _, report = rewrite(model, batch, dynamic=True)
    assert executor is None and report.skips
    assert all("dynamic" in s["reason"] or "graph value" in s["reason"] for s in report.skips)


def test_block_mask_built_in_row_bands_equals_create_block_mask(monkeypatch):
    from torch.nn.attention.flex_attention import create_block_mask

    def window(b, h, q, kv):
        return (kv <= q) & (kv > q - 40)

    structure = window_attention.trace_mask([window_attention.Term(lambda c, env: window(*c))], [], lambda c: c)
    monkeypatch.setattr(window_attention, "MASK_ELEMENTS_PER_CHUNK", 4096)  # several bands of rows
    for full_blocks in (True, False):
        spec = window_attention.BlockSpec(structure, [], (1, 1, 300, 300), full_blocks, (1, 1, 300, 300),
                                          torch.device("cpu"), 32)
        built = spec.build({})
        ref = create_block_mask(window, 1, 1, 300, 300, device="cpu", BLOCK_SIZE=32, separate_full_blocks=full_blocks)
        expected = [ref.kv_num_blocks, ref.kv_indices, ref.full_kv_num_blocks, ref.full_kv_indices,
                    ref.q_num_blocks, ref.q_indices, ref.full_q_num_blocks, ref.full_q_indices]
        expected = [t for t in expected if t is not None]
        assert len(built) == len(expected) == (8 if full_blocks else 4)
        for got, want in zip(built, expected):
            torch.testing.assert_close(got, want)
