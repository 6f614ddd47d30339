"""token_skip: later blocks run on the kept tokens only; outputs keep their shapes.

The reference for the rewritten graph is the eager model with hooks on its blocks that do the
same selection by hand (gather before block K+1, scatter after the last block), so a wrong
mask gather, a wrong reshape size or a wrong scatter in the graph shows up as a mismatch.
"""

import math

import pytest
import torch
from torch._inductor.utils import run_and_get_code

from tests.fx_passes.capture import capture_graph
from tests.models.builders import SENTENCES, minilm_path
from zc.config import ZcConfig
from zc.dynamo_backend.backend import zc
from zc.fx_passes import token_skip
from zc.fx_passes.pass_manager import PassReport
from zc.fx_passes.token_skip import (
    assign_to_kept,
    bipartite_plan,
    gather_tokens,
    initial_sizes,
    key_valid_from_mask,
    merge_tokens,
    merged_sizes,
    outside_span,
    scatter_tokens,
    select_tokens,
    unmerge_tokens,
)


def tiny_bert():
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=200, hidden_size=48, num_hidden_layers=4, num_attention_heads=4,
                        intermediate_size=96, max_position_embeddings=64)
    return BertModel(config).eval()


def bert_inputs(batch=2, length=20):
    ids = torch.randint(5, 200, (batch, length))
    ids[:, 0] = 1  # [CLS]
    mask = torch.ones_like(ids)
    mask[1, length - 6:] = 0  # the second sequence is padded
    return {"input_ids": ids, "attention_mask": mask}


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(config).eval()


def run_hooked(model, inputs, handles):
    """The model's outputs on ``inputs`` with the hooks of ``handles`` in place; removes them."""
    with torch.no_grad():
        outputs = model(**inputs)
    for handle in handles:
        handle.remove()
    return outputs


def with_skip_hooks(model, layers, start_layer, keep_ratio, anchor=0, seen=None, span=None):
    """Eager ``model`` whose blocks after ``start_layer`` see only the kept tokens (by hand)."""
    state = {}
    handles = []

    def before(module, args, kwargs, first):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        args = list(args[1:])
        mask = kwargs.get("attention_mask", args[0] if args else None)
        seq = state.get("seq", hidden.shape[1])
        if first:
            state["seq"] = seq
            valid = key_valid_from_mask(mask) if mask is not None else None
            keep = math.ceil(keep_ratio * seq) if keep_ratio else None
            index = (outside_span(hidden, *span) if span else
                     select_tokens(hidden, valid, keep, "similarity", anchor, anchor == -1))
            state.update(base=hidden, valid=valid, index=index)
            hidden = gather_tokens(hidden, state["index"], [1])
            if seen is not None:
                seen.append(state["index"])
        if mask is not None:
            mask = gather_tokens(mask, state["index"], [d for d in (2, 3) if mask.shape[d] == seq])
            if "attention_mask" in kwargs:
                kwargs["attention_mask"] = mask
            else:
                args[0] = mask
        if "position_embeddings" in kwargs:
            kwargs["position_embeddings"] = tuple(gather_tokens(t, state["index"], [1]) for t in kwargs["position_embeddings"])
        return (hidden, *args), kwargs

    def after(module, args, out):
        hidden = out[0] if isinstance(out, tuple) else out
        hidden = scatter_tokens(state["base"], state["index"], hidden)
        return (hidden, *out[1:]) if isinstance(out, tuple) else hidden

    for i in range(start_layer + 1, len(layers)):
        handles.append(layers[i].register_forward_pre_hook(
            lambda m, a, k, first=(i == start_layer + 1): before(m, a, k, first), with_kwargs=True))
    handles.append(layers[-1].register_forward_hook(after))
    return handles


def run_zc(model, inputs, options, calls=1):
    reports = []

    def backend(gm, example_inputs):
        reports.append(gm)
        return zc(gm, example_inputs, options=options)

    compiled = torch.compile(model, backend=backend, fullgraph=True)
    with torch.no_grad():
        outs = [compiled(**inputs) for _ in range(calls)]
    return outs, len(reports)


def test_bert_skip_matches_hand_written_reference_with_padding_and_compiles_once():
    model = tiny_bert()
    inputs = bert_inputs()
    options = {"token_skip": {"start_layer": 1, "keep_ratio": 0.5}, "strict": True}
    (out, again), graphs = run_zc(model, inputs, options, calls=2)
    assert graphs == 1  # a second call reuses the one compiled graph
    seen = []
    handles = with_skip_hooks(model, model.encoder.layer, 1, 0.5, seen=seen)
    expected = run_hooked(model, inputs, handles)
    with torch.no_grad():
        full = model(**inputs)
    assert out.last_hidden_state.shape == full.last_hidden_state.shape
    assert out.pooler_output.shape == full.pooler_output.shape
    torch.testing.assert_close(out.last_hidden_state, expected.last_hidden_state, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.pooler_output, expected.pooler_output, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(again.last_hidden_state, out.last_hidden_state)
    # The skip changed something (so the comparison above is not trivially full vs full)...
    assert not torch.allclose(out.last_hidden_state, full.last_hidden_state, atol=1e-3)
    # ...keeping [CLS] and sending the padding of the second sequence to the skipped side first.
    index = seen[0]
    assert index.shape == (2, 10) and bool((index[:, 0] == 0).all())
    assert int((index[1] >= 14).sum()) == 0


def with_merge_hooks(layers, stages, matching="bipartite", before_mlp=False, mask=None):
    """Eager ``layers`` where, before the block after each ``(K, keep)`` stage, every token's
    state is replaced by its merged group's state, and all tokens run on. ``before_mlp`` (BERT):
    at each ``(K, keep)`` the output of block K's attention is replaced instead (between
    attention and MLP), and ``mask`` is the model's 4-D attention mask (the hook sees none); for
    a ViT, whose merge point is after the residual add inside the block, the block's forward is
    replaced by a hand-written one that merges there.

    Attention over ``size`` identical copies of a merged token is exactly attention over that
    token with ``log(size)`` added to its logits, and a block's other ops work per token, so this
    is an independent reference for proportional attention (and for merging at several blocks):
    the rewritten graph runs each group once with the bias, this runs all copies with no bias.
    """
    state = {}
    handles = []

    def merged_copies(hidden, keep, mask):
        batch, seq, _ = hidden.shape
        if not state:
            valid = key_valid_from_mask(mask) if mask is not None else None
            state.update(positions=torch.arange(seq).expand(batch, seq), assign=torch.arange(seq).expand(batch, seq),
                         sizes=initial_sizes(hidden, valid), valid=valid)
        current = gather_tokens(hidden, state["positions"], [1])
        if matching == "bipartite":
            index, assign = bipartite_plan(current, state["sizes"], keep, False)
        else:
            valid = None if state["valid"] is None else gather_tokens(state["valid"], state["positions"], [1])
            index = select_tokens(current, valid, keep, "similarity", 0, False)
            assign = assign_to_kept(current, index)
        merged = merge_tokens(current, state["sizes"], index, assign)
        state["sizes"] = merged_sizes(state["sizes"], assign, keep)
        state["positions"] = gather_tokens(state["positions"], index, [1])
        state["assign"] = torch.gather(assign, 1, state["assign"])
        return unmerge_tokens(state["assign"], merged)

    def before(module, args, kwargs, keep):
        hidden = args[0] if args else kwargs["hidden_states"]
        hidden = merged_copies(hidden, keep, kwargs.get("attention_mask", args[1] if len(args) > 1 else None))
        if args:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}

    def after_attention(module, args, out, keep):
        return (merged_copies(out[0], keep, mask), *out[1:])

    class Restore:
        def __init__(self, layer):
            self.layer = layer

        def remove(self):
            del self.layer.forward

    def vit_block(layer, keep):
        def forward(hidden_states, attention_mask=None, **kwargs):  # ViTLayer.forward (eval: no dropout)
            attended, _ = layer.attention(layer.layernorm_before(hidden_states), attention_mask, **kwargs)
            hidden = merged_copies(attended + hidden_states, keep, None)
            return layer.mlp(layer.layernorm_after(hidden)) + hidden
        layer.forward = forward
        return Restore(layer)

    for start, keep in stages:
        if before_mlp and hasattr(layers[start], "layernorm_after"):
            handles.append(vit_block(layers[start], keep))
        elif before_mlp:
            handles.append(layers[start].attention.register_forward_hook(
                lambda m, a, o, keep=keep: after_attention(m, a, o, keep)))
        else:
            handles.append(layers[start + 1].register_forward_pre_hook(
                lambda m, a, k, keep=keep: before(m, a, k, keep), with_kwargs=True))
    return handles


def tiny_vit():
    from transformers import ViTConfig, ViTModel

    config = ViTConfig(image_size=16, patch_size=4, num_channels=1, hidden_size=32, num_hidden_layers=4,
                       num_attention_heads=2, intermediate_size=64)
    return ViTModel(config, add_pooling_layer=False).eval()


@pytest.mark.parametrize("case", ["bert schedule bipartite", "bert one-shot score", "vit schedule bipartite",
                                  "bert schedule before mlp", "vit schedule before mlp"])
def test_merge_with_proportional_attention_matches_token_copies(case):
    """Merging with proportional attention (the bias added to BERT's gathered padding mask, or
    an ``attn_mask`` created for a ViT's SDPA, which had none) at one or several blocks equals the
    eager model running every token on as a copy of its group's state; also merging inside the
    blocks, between attention and MLP (``reduce_before="mlp"``, from block 0's MLP on)."""
    if case.startswith("bert"):
        model, inputs = tiny_bert(), bert_inputs()
        layers, seq = model.encoder.layer, 20
    else:
        model, inputs = tiny_vit(), {"pixel_values": torch.randn(2, 1, 16, 16)}
        layers, seq = model.layers, 17
    mask = None
    if "before mlp" in case:  # BERT's MLP tokens per block: 15, 10, 10, 6 (block 0's attention sees all 20)
        schedule = [0.75, 0.5, 0.5, 0.3]
        options = {"schedule": schedule, "strategy": "merge", "reduce_before": "mlp"}
        stages = [(i, math.ceil(r * seq)) for i, r in enumerate(schedule) if r < (schedule[i - 1] if i else 1)]
        if case.startswith("bert"):
            mask = inputs["attention_mask"][:, None, None, :].bool().expand(-1, 1, seq, seq)
    elif "schedule" in case:
        schedule = [1.0, 0.75, 0.5, 0.3]
        options = {"schedule": schedule, "strategy": "merge"}
        stages = [(i - 1, math.ceil(r * seq)) for i, r in enumerate(schedule) if i and r < schedule[i - 1]]
    else:
        options = {"start_layer": 1, "keep_ratio": 0.5, "strategy": "merge", "matching": "score"}
        stages = [(1, math.ceil(0.5 * seq))]
    (out,), _ = run_zc(model, inputs, {"token_skip": options, "strict": True})
    handles = with_merge_hooks(layers, stages, "score" if "score" in case else "bipartite", "before mlp" in case, mask)
    expected = run_hooked(model, inputs, handles)
    with torch.no_grad():
        full = model(**inputs)
    assert out.last_hidden_state.shape == full.last_hidden_state.shape
    torch.testing.assert_close(out.last_hidden_state, expected.last_hidden_state, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(out.last_hidden_state, full.last_hidden_state, atol=1e-3)
    if case != "vit schedule bipartite":
        return
    # Without the bias the rewritten graph no longer matches the copies.
    torch._dynamo.reset()
    (plain,), _ = run_zc(model, inputs, {"token_skip": {**options, "proportional_attention": False}, "strict": True})
    assert not torch.allclose(plain.last_hidden_state, expected.last_hidden_state, atol=1e-3)


def test_skip_schedule_matches_nested_hand_written_reference():
    """Tokens leave at several blocks: each stage selects among the tokens still running, the
    mask is gathered by their original positions, and the outputs are scattered back in turn."""
    model, inputs = tiny_bert(), bert_inputs()
    layers, stages = model.encoder.layer, {0: 15, 1: 10}  # schedule (1, .75, .5, .5) on 20 tokens
    (out,), _ = run_zc(model, inputs, {"token_skip": {"schedule": [1, 0.75, 0.5, 0.5]}, "strict": True})
    state = {"left": []}

    def before(module, args, kwargs, block):
        hidden, mask, *rest = args
        if "mask" not in state:
            state.update(mask=mask, valid=key_valid_from_mask(mask), positions=torch.arange(20).expand(2, 20))
        if block - 1 in stages:
            index = select_tokens(hidden, state["valid"], stages[block - 1], "similarity", 0, False)
            state["left"].append((hidden, index))
            state["valid"] = gather_tokens(state["valid"], index, [1])
            state["positions"] = gather_tokens(state["positions"], index, [1])
            hidden = gather_tokens(hidden, index, [1])
        return (hidden, gather_tokens(state["mask"], state["positions"], [2, 3]), *rest), kwargs

    def after(module, args, out):
        hidden = out[0] if isinstance(out, tuple) else out
        for base, index in reversed(state["left"]):
            hidden = scatter_tokens(base, index, hidden)
        return (hidden, *out[1:]) if isinstance(out, tuple) else hidden

    handles = [layers[i].register_forward_pre_hook(lambda m, a, k, i=i: before(m, a, k, i), with_kwargs=True)
               for i in range(1, 4)]
    handles.append(layers[-1].register_forward_hook(after))
    expected = run_hooked(model, inputs, handles)
    assert [index.shape[1] for _, index in state["left"]] == [15, 10]
    torch.testing.assert_close(out.last_hidden_state, expected.last_hidden_state, rtol=1e-4, atol=1e-4)


def test_keep_ratio_one_and_short_sequences_run_the_original_graph():
    model = tiny_bert()
    inputs = bert_inputs()
    with torch.no_grad():
        full = model(**inputs)
    (out,), _ = run_zc(model, inputs, {"token_skip": {"start_layer": 1, "keep_ratio": 1.0}, "strict": True})
    (plain,), _ = run_zc(model, inputs, {"strict": True})
    torch.testing.assert_close(out.last_hidden_state, plain.last_hidden_state, rtol=0, atol=0)
    torch.testing.assert_close(out.last_hidden_state, full.last_hidden_state, rtol=1e-4, atol=1e-4)

    gm, example = capture_graph(model, **inputs)
    report = PassReport("token_skip")
    config = ZcConfig.from_options({"token_skip": {"start_layer": 1, "keep_ratio": 0.97}}, environ={}).token_skip
    with torch.no_grad():  # ceil(0.97 * 20) = 20: every token kept
        assert token_skip.prepare(gm, example, config, lambda g: g, report, lambda g: None) is None
    assert report.status == "unchanged" and "keeps all 20 tokens" in report.skips[-1]["reason"]


def test_llama_keeps_first_and_last_token_and_gathers_rotary_and_causal_mask():
    model = tiny_llama()
    ids = torch.randint(0, 128, (2, 24))
    inputs = {"input_ids": ids, "use_cache": False}
    (out,), _ = run_zc(model, inputs, {"token_skip": {"start_layer": 1, "keep_ratio": 0.5}, "strict": True})
    seen = []
    handles = with_skip_hooks(model, model.model.layers, 1, 0.5, anchor=-1, seen=seen)
    expected = run_hooked(model, inputs, handles)
    assert out.logits.shape == (2, 24, 128)
    torch.testing.assert_close(out.logits, expected.logits, rtol=1e-4, atol=1e-4)
    index = seen[0]
    assert bool((index[:, 0] == 0).all()) and bool((index[:, -1] == 23).all())


def test_vision_token_withdrawal_drops_a_span_after_block_k():
    model = tiny_llama()
    inputs = {"input_ids": torch.randint(0, 128, (2, 24)), "use_cache": False}
    options = {"token_skip": {"start_layer": 1, "withdraw_start": 4, "withdraw_end": 16}, "strict": True}
    (out,), _ = run_zc(model, inputs, options)
    seen = []
    handles = with_skip_hooks(model, model.model.layers, 1, None, anchor=-1, seen=seen, span=(4, 16))
    expected = run_hooked(model, inputs, handles)
    assert seen[0].shape == (2, 12) and seen[0][0].tolist() == [0, 1, 2, 3, *range(16, 24)]
    torch.testing.assert_close(out.logits, expected.logits, rtol=1e-4, atol=1e-4)


def test_vision_token_withdrawal_finds_the_span_from_the_image_token_id():
    model = tiny_llama()
    ids = torch.randint(0, 120, (2, 24))
    ids[:, 4:16] = 127  # the "image tokens"
    inputs = {"input_ids": ids, "use_cache": False}
    options = {"token_skip": {"start_layer": 1, "withdraw_token_id": 127}, "strict": True}
    compiled = torch.compile(model, backend="zc", options=options, fullgraph=True)
    with torch.no_grad():
        out = compiled(**inputs)
    handles = with_skip_hooks(model, model.model.layers, 1, None, anchor=-1, span=(4, 16))
    expected = run_hooked(model, inputs, handles)
    torch.testing.assert_close(out.logits, expected.logits, rtol=1e-4, atol=1e-4)
    # the image tokens may move, their number may not: it is compiled into the shapes
    moved = torch.randint(0, 120, (2, 24))
    moved[:, 8:20] = 127
    handles = with_skip_hooks(model, model.model.layers, 1, None, anchor=-1, span=(8, 20))
    with torch.no_grad():
        torch.testing.assert_close(compiled(input_ids=moved, use_cache=False).logits,
                                   model(input_ids=moved, use_cache=False).logits, rtol=1e-4, atol=1e-4)
    for h in handles:
        h.remove()
    fewer = moved.clone()
    fewer[:, 8] = 3
    with torch.no_grad(), pytest.raises(RuntimeError, match="withdraw_token_id"):
        compiled(input_ids=fewer, use_cache=False)


def test_generated_code_gathers_and_scatters_inside_the_compiled_graph():
    model = tiny_bert()
    inputs = bert_inputs()
    compiled = torch.compile(model, backend="zc", options={"token_skip": {"start_layer": 2, "keep_ratio": 0.5},
                                                           "strict": True})
    with torch.no_grad():
        _, codes = run_and_get_code(compiled, **inputs)
    code = "\n".join(codes)
    assert code.count("def call(") == 1  # one compiled graph, no Python loop around pieces
    assert "topk" in code  # the selection runs inside it
    # the gathered / scattered rows are indirect loads and stores of the fused C++ kernels
    assert "TORCH_CHECK((0 <= tmp" in code or "indirect" in code or "static_cast<int64_t>(tmp" in code


def test_bad_options_and_graphs_without_blocks():
    for bad, match in (({"keep_ratio": 0.0}, "keep_ratio"), ({"keep_ratio": 1.5}, "keep_ratio"),
                       ({"start_layer": -1}, "start_layer"), ({"score": "attention"}, "token_skip.score"),
                       ({"strategy": "drop"}, "token_skip.strategy"), ({"withdraw_start": 3}, "go together"),
                       ({"withdraw_start": 5, "withdraw_end": 5}, "withdraw_start"),
                       ({"withdraw_token_id": 7, "withdraw_start": 1, "withdraw_end": 3}, "withdraw_token_id"),
                       ({"reduce_before": "ffn"}, "token_skip.reduce_before"),
                       ({"schedule": [0.5, 0.5, 0.5, 0.5]}, "first block's 1.0"),
                       ({"schedule": [0.5, 0.75], "reduce_before": "mlp"}, "token_skip.schedule")):
        with pytest.raises(ValueError, match=match):
            ZcConfig.from_options({"token_skip": bad}, environ={})
    # inside blocks, block 0's MLP may already run on fewer tokens
    ZcConfig.from_options({"token_skip": {"schedule": [0.5, 0.5], "reduce_before": "mlp"}}, environ={})
    model = tiny_bert()
    compiled = torch.compile(model, backend="zc", options={"token_skip": {"start_layer": 3}})
    with torch.no_grad(), pytest.raises(Exception, match=r"token_skip.start_layer' must be in 0..2"):
        compiled(**bert_inputs())

    mlp = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8)).eval()
    gm, example = capture_graph(mlp, torch.randn(2, 5, 8))
    report = PassReport("token_skip")
    config = ZcConfig.from_options({"token_skip": {"start_layer": 0}}, environ={}).token_skip
    with torch.no_grad():
        assert token_skip.prepare(gm, example, config, lambda g: g, report, lambda g: None) is None
    assert report.status == "skipped" and "no stack of repeated blocks" in report.skips[-1]["reason"]


@pytest.mark.slow
def test_real_minilm_embeddings_stay_close():
    from transformers import AutoTokenizer, BertModel

    model = BertModel.from_pretrained(minilm_path()).eval()
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    text = " ".join(SENTENCES)
    encoded = tokenizer([text, " ".join(reversed(SENTENCES))], padding="max_length", max_length=128,
                        truncation=True, return_tensors="pt")
    inputs = dict(encoded)

    def embed(out):
        mask = inputs["attention_mask"].unsqueeze(-1).float()
        return torch.nn.functional.normalize((out.last_hidden_state * mask).sum(1) / mask.sum(1), dim=-1)

    with torch.no_grad():
        full = embed(model(**inputs))
    cosines = {}
    for strategy in ("skip", "merge"):
        (out,), _ = run_zc(model, inputs, {"token_skip": {"start_layer": 2, "keep_ratio": 0.7, "strategy": strategy},
                                            "strict": True})
        cosines[strategy] = (embed(out) * full).sum(-1)
        torch._dynamo.reset()
    # Measured on these two 128-token texts: skip 0.56-0.58 (skipped tokens keep their block-2
    # state, far from the last layer's for mean pooling), merge 0.9+; see benchmarks/token_skip.py.
    assert bool((cosines["merge"] > 0.9).all()), cosines
    assert bool((cosines["skip"] > 0.45).all()), cosines
    assert bool((cosines["merge"] > cosines["skip"]).all()), cosines


def test_max_error_picks_a_schedule_within_the_budget_from_calibration_calls():
    from zc.fx_passes.token_skip import output_error

    model = tiny_bert()
    gm, example = capture_graph(model, **bert_inputs())

    def prepared(max_error, calls, measure="outputs"):
        report = PassReport("token_skip")
        config = ZcConfig.from_options({"token_skip": {"strategy": "merge", "max_error": max_error, "calibration_calls":
                                                       calls, "error_measure": measure}}, environ={}).token_skip
        # compile_rest is the identity here: the chosen graph runs eagerly (see the slow test for Inductor)
        return token_skip.prepare(gm, example, config, lambda g: g, report, lambda g: None), report

    # random weights: the tiny model's outputs move this much with one merge at ratio 0.5
    executor, report = prepared(0.2, 1)
    with torch.no_grad():
        full = gm(*example)
        during = executor(*example)
        after = executor(*example)
    torch.testing.assert_close(during, full)  # the calibration call runs the full graph
    chosen = report.metrics["calibration"]
    assert report.status == "applied" and chosen["schedule"] is not None, report
    assert chosen["error"] <= 0.2 and chosen["candidates_run"] >= 2, chosen
    assert report.metrics["block_token_fraction"] < 1.0 and report.rewrites
    assert output_error(after, full) <= 0.2 + 1e-5
    assert not torch.allclose(after[0], full[0], atol=1e-3)

    # a budget no candidate meets: the full graph runs, and the report says why
    executor, report = prepared(1e-6, 1)
    with torch.no_grad():
        executor(*example)
        torch.testing.assert_close(executor(*example), full)
    assert report.status == "unchanged" and "no candidate schedule" in report.skips[-1]["reason"], report

    # the budget on the token-averaged outputs (pooled embeddings)
    executor, report = prepared(0.2, 1, "token_mean")
    with torch.no_grad():
        executor(*example)
        pooled = executor(*example)
    assert report.status == "applied" and "token_mean" in report.metrics["calibration"]["error_measure"]
    assert output_error(pooled, full, "token_mean") <= 0.2 + 1e-5

    # inside blocks the candidates may start at block 0's MLP
    config = ZcConfig.from_options({"token_skip": {"strategy": "merge", "max_error": 0.2, "calibration_calls": 1,
                                                   "reduce_before": "mlp"}}, environ={}).token_skip
    report = PassReport("token_skip")
    executor = token_skip.prepare(gm, example, config, lambda g: g, report, lambda g: None)
    with torch.no_grad():
        executor(*example)
        inside = executor(*example)
    chosen = report.metrics["calibration"]
    assert report.status == "applied" and chosen["error"] <= 0.2 and "mlp_tokens_per_block" in report.metrics
    assert output_error(inside, full) <= 0.2 + 1e-5
    assert any(s[0] < 1 for family in token_skip.candidate_families(4, inside=True) for s in family)
    assert all(s[0] == 1 for family in token_skip.candidate_families(4) for s in family)

    with pytest.raises(ValueError, match="token_skip.error_measure"):
        ZcConfig.from_options({"token_skip": {"max_error": 0.1, "error_measure": "kl"}}, environ={})
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="token_skip.max_error"):
            ZcConfig.from_options({"token_skip": {"max_error": bad}}, environ={})
    with pytest.raises(ValueError, match="token_skip.schedule"):
        ZcConfig.from_options({"token_skip": {"max_error": 0.1, "schedule": [1, 0.5, 0.5, 0.5]}}, environ={})


@pytest.mark.slow
def test_max_error_through_torch_compile(tmp_path):
    from zc.dump import load_report
    from zc.fx_passes.token_skip import output_error

    model = tiny_bert()
    calibration = [bert_inputs() for _ in range(2)]
    options = {"token_skip": {"strategy": "merge", "max_error": 0.2, "calibration_calls": 2},
               "strict": True, "dump": str(tmp_path)}
    compiled = torch.compile(model, backend="zc", options=options, fullgraph=True)
    with torch.no_grad():
        full = [model(**inputs).last_hidden_state for inputs in calibration]
        during = [compiled(**inputs).last_hidden_state for inputs in calibration]
        after = [compiled(**inputs).last_hidden_state for inputs in calibration]
    for got, expected in zip(during, full):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    report = next(p for p in load_report(next(tmp_path.iterdir()))["graph_passes"] if p["name"] == "token_skip")
    assert report["status"] == "applied" and report["metrics"]["calibration"]["error"] <= 0.2, report
    for got, expected in zip(after, full):
        assert output_error(got, expected) <= 0.2 + 1e-4


@pytest.mark.parametrize("family", ["bert", "vit", "llama"])
def test_reduce_before_mlp_cuts_each_block_between_attention_and_mlp(family):
    """The MLP part of a block starts at its first module after the attention that reads one
    hidden state: BERT's ``intermediate``, the ViT's ``layernorm_after`` (not the dropout before
    its residual add), Llama's ``post_attention_layernorm``; the report gives both counts and the
    rewritten graph compiles once."""
    from zc.fx_passes.token_skip import block_stack, mlp_start

    torch.manual_seed(0)
    model, inputs, first_mlp_module = {
        "bert": (tiny_bert(), bert_inputs(), "intermediate"),
        "vit": (tiny_vit(), {"pixel_values": torch.randn(2, 1, 16, 16)}, "layernorm_after"),
        "llama": (tiny_llama(), {"input_ids": torch.randint(0, 128, (2, 24)), "use_cache": False},
                  "post_attention_layernorm"),
    }[family]
    gm, example = capture_graph(model, **inputs)
    prefix, block_of = block_stack(gm)
    for block in range(4):
        cut = mlp_start(gm, block_of, prefix, block)
        path = list(cut.meta["nn_module_stack"].values())[-1][0]
        assert first_mlp_module in path and block_of[cut] == block, path
    report = PassReport("token_skip")
    config = ZcConfig.from_options({"token_skip": {"strategy": "skip", "start_layer": 1, "keep_ratio": 0.5,
                                                   "reduce_before": "mlp"}}, environ={}).token_skip
    with torch.no_grad():
        rewritten = token_skip.prepare(gm, example, config, lambda g: g, report, lambda g: None)
        assert rewritten is not None and report.status == "applied", report
    seq = report.metrics["tokens"]
    keep = math.ceil(0.5 * seq)
    assert report.metrics["tokens_per_block"] == [seq, seq, seq, keep]
    assert report.metrics["mlp_tokens_per_block"] == [seq, seq, keep, keep]
    if family == "bert":  # through torch.compile: one graph for two calls
        (out, again), graphs = run_zc(model, inputs, {"token_skip": {"strategy": "merge", "reduce_before": "mlp",
                                                                     "schedule": [0.75, 0.5, 0.5, 0.3]},
                                                      "strict": True}, calls=2)
        assert graphs == 1
        torch.testing.assert_close(again.last_hidden_state, out.last_hidden_state)
