"""quantize: merge exactness, kernels vs float references, real MiniLM error bounds, generated
code, calibration phases, save/load of scales, and bad input."""

import os
import re
import subprocess
import sys

import pytest
import torch
import torch._dynamo.utils as dynamo_utils
from torch._inductor.utils import run_and_get_code

from tests.fx_passes.capture import capture_graph
from tests.models.builders import bert_minilm
from zc.config import ZcConfig
from zc.fx_passes import quantize
from zc.fx_passes.pass_manager import PassReport


class NormMLP(torch.nn.Module):
    """LayerNorm feeding two linears (one group), GELU feeding a third: both merge paths."""

    def __init__(self, width=64, hidden=256):
        super().__init__()
        self.norm = torch.nn.LayerNorm(width)
        self.up = torch.nn.Linear(width, hidden)
        self.gate = torch.nn.Linear(width, hidden)
        self.down = torch.nn.Linear(hidden, width)

    def forward(self, x):
        h = self.norm(x)
        return x + self.down(torch.nn.functional.gelu(self.up(h)) * self.gate(h))


SMALL = {"min_weight_size": 1024}


def quantized_graph(model, args, calibration_args, **options):
    """The quantized Dynamo graph (uncompiled) after calibrating on ``calibration_args``."""
    gm, example = capture_graph(model, *args)
    config = ZcConfig.from_options({"quantize": {**SMALL, "calibration_steps": len(calibration_args), **options}}, environ={}).quantize
    report = PassReport("quantize")
    data = next(i for i, e in enumerate(example) if not isinstance(e, torch.nn.Parameter))
    with torch.no_grad():
        executor = quantize.prepare(gm, example, config, lambda g: g, report, lambda g: None)
        for a in calibration_args:
            executor(*[a if i == data else e for i, e in enumerate(example)])
        return executor.phases[1].build(), example, report


def test_merged_scales_are_exact_before_rounding():
    """Folding smoothing into the weight and the step into the multiplier changes nothing."""
    torch.manual_seed(0)
    group_x = torch.randn(32, 64) * torch.linspace(0.1, 20, 64)
    weight = torch.randn(48, 64)
    for alpha in (0.0, 0.5, 1.0):
        amax = group_x.abs().amax(0)
        smooth = amax.pow(alpha) / weight.abs().amax(0).pow(1 - alpha)
        step = float((amax / smooth).max()) / 127
        multiplier = 1 / (smooth * step)
        merged = ((group_x * multiplier) @ (weight * smooth).t()) * step
        torch.testing.assert_close(merged, group_x @ weight.t(), rtol=1e-4, atol=1e-3)


def test_layer_norm_fold_is_exact_before_rounding():
    torch.manual_seed(0)
    norm = torch.nn.LayerNorm(64).eval()
    torch.nn.init.normal_(norm.weight)
    torch.nn.init.normal_(norm.bias)
    m = torch.rand(64) + 0.5
    x = torch.randn(8, 64)
    folded = torch.nn.functional.layer_norm(x, (64,), norm.weight * m, norm.bias * m, norm.eps)
    torch.testing.assert_close(folded, norm(x) * m)


def test_int4_pack_round_trip():
    torch.manual_seed(0)
    w = torch.randn(16, 128)
    packed, scale = quantize.quantize_int4_groups(w, 32)
    assert packed.dtype == torch.uint8 and packed.shape == (16, 64)
    restored = quantize.unpack_int4(packed, scale, torch.float32)
    assert ((restored - w).abs() <= scale.repeat_interleave(32, 1) / 2 + 1e-6).all()


def test_quantized_graph_is_close_to_float_and_merges_into_the_norm():
    torch.manual_seed(0)
    model = NormMLP().eval()
    x = torch.randn(4, 16, 64)
    graph, _, report = quantized_graph(model, (x,), [torch.randn(4, 16, 64) for _ in range(3)])
    with torch.no_grad():
        out = graph(*capture_graph(model, x)[1])[0]
        ref = model(x)
    assert quantize.relative_error(out, ref) < 0.02
    merged = {r["where"]: r["what"] for r in report.rewrites}
    assert set(merged) == {"up", "gate", "down"}
    assert "LayerNorm weight and bias" in merged["up"] and "LayerNorm weight and bias" in merged["gate"]
    (layer_norm,) = [n for n in graph.graph.nodes if n.target is torch.nn.functional.layer_norm]
    assert layer_norm.args[2].op == "get_attr"  # the folded weight; the float norm has no user left
    assert any(n.target is torch._int_mm for n in graph.graph.nodes)


def test_end_to_end_no_standalone_quantize_kernel_between_norm_and_linears():
    """The generated C++ writes the int8 tensor from the kernel that computes the LayerNorm."""
    torch.manual_seed(0)
    model = NormMLP().eval()
    compiled = torch.compile(model, backend="zc", options={"quantize": {**SMALL, "calibration_steps": 2}})
    x = torch.randn(4, 16, 64)
    with torch.no_grad():
        for _ in range(2):
            compiled(torch.randn(4, 16, 64))
        out, (code,) = run_and_get_code(compiled, x)
        ref = model(x)
    assert quantize.relative_error(out, ref) < 0.02
    # kernel name -> its C++ signature line: the one computing the LayerNorm must write int8
    signatures = dict(re.findall(r"^(cpp_fused_\w+) = async_compile.cpp_pybinding\((\[.*?\])", code, re.M))
    norm_kernels = [name for name in signatures if "native_layer_norm" in name]
    assert len(norm_kernels) == 1 and "round" in norm_kernels[0]
    assert "'int8_t*'" in signatures[norm_kernels[0]]
    # every int8 tensor the GEMMs read comes from a kernel that also computes something else
    assert all("round" in name and name != "cpp_fused__to_copy_clamp_round_0" for name, sig in signatures.items()
               if "'int8_t*'" in sig)
    assert code.count("_int_mm(") == 3  # up, gate, down: oneDNN's int8 GEMM


def test_calibration_then_quantized_on_unseen_shapes():
    """Calibrated on one shape, then correct on batch sizes and lengths it never saw."""
    torch.manual_seed(0)
    model = NormMLP().eval()
    compiled = torch.compile(model, backend="zc", options={"quantize": {**SMALL, "calibration_steps": 2}})
    with torch.no_grad():
        float_outs = [compiled(torch.randn(2, 8, 64)) for _ in range(2)]
        for batch, seq in ((2, 8), (3, 5), (1, 17)):
            x = torch.randn(batch, seq, 64)
            assert quantize.relative_error(compiled(x), model(x)) < 0.05
    torch.testing.assert_close(float_outs[0].shape, (2, 8, 64))


def test_no_recompiles_after_warm_up_across_batch_and_sequence():
    """Dynamo's one automatic-dynamic recompile, then none; the calibration is not redone."""
    torch.manual_seed(0)
    model = NormMLP().eval()
    compiled = torch.compile(model, backend="zc", options={"quantize": {**SMALL, "calibration_steps": 1}})
    with torch.no_grad():
        for batch, seq in ((2, 8), (2, 8), (3, 5)):  # calibrate, quantize, go dynamic
            compiled(torch.randn(batch, seq, 64))
        warm = dynamo_utils.counters["stats"]["unique_graphs"]
        for batch, seq in ((5, 17), (4, 9), (7, 3)):  # not 1: Dynamo specialises size 1
            x = torch.randn(batch, seq, 64)
            assert quantize.relative_error(compiled(x), model(x)) < 0.05
    assert dynamo_utils.counters["stats"]["unique_graphs"] == warm


def test_save_and_load_scales_round_trip(tmp_path):
    torch.manual_seed(0)
    model = NormMLP().eval()
    path = tmp_path / "scales.json"
    xs = [torch.randn(2, 8, 64) for _ in range(3)]
    with torch.no_grad():
        saver = torch.compile(model, backend="zc", options={"quantize": {**SMALL, "calibration_steps": 2, "save_scales": str(path)}})
        for x in xs:
            saved_out = saver(x)
        torch._dynamo.reset()
        loader = torch.compile(model, backend="zc", options={"quantize": {**SMALL, "scales": str(path)}})
        loaded_out = loader(xs[-1])  # first call already quantized: no calibration
    torch.testing.assert_close(loaded_out, saved_out)
    assert quantize.relative_error(loaded_out, model(xs[-1]).detach()) < 0.03


def test_scales_that_do_not_fit_are_refused(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "scales.json"
    with torch.no_grad():
        saver = torch.compile(NormMLP().eval(), backend="zc", options={"quantize": {**SMALL, "calibration_steps": 1, "save_scales": str(path)}})
        saver(torch.randn(2, 8, 64))
        saver(torch.randn(2, 8, 64))
        torch._dynamo.reset()
        other = torch.compile(NormMLP(width=32).eval(), backend="zc", options={"quantize": {**SMALL, "scales": str(path)}})
        with pytest.raises(Exception, match="do not fit this graph"):
            other(torch.randn(2, 8, 32))


def test_nan_during_calibration_names_the_layer():
    model = NormMLP().eval()
    compiled = torch.compile(model, backend="zc", options={"quantize": {**SMALL, "calibration_steps": 2}})
    x = torch.randn(2, 8, 64)
    x[0, 0, 0] = float("nan")
    with torch.no_grad(), pytest.raises(Exception, match="NaN or inf at the input of 'up'"):
        compiled(x)


def test_bad_options_and_no_eligible_layer():
    for bad, match in (({"mode": "w4"}, "quantize.mode"), ({"calibration_steps": 0}, "calibration_steps"),
                       ({"group_size": 48}, "group_size"), ({"smooth_alpha": 2.0}, "smooth_alpha"),
                       ({"skip": "up"}, "quantize.skip")):
        with pytest.raises(ValueError, match=match):
            ZcConfig.from_options({"quantize": bad}, environ={})
    gm, example = capture_graph(NormMLP().eval(), torch.randn(2, 4, 64))
    report = PassReport("quantize")
    config = ZcConfig.from_options({"quantize": {"min_weight_size": 10**6}}, environ={}).quantize
    with torch.no_grad():
        assert quantize.prepare(gm, example, config, lambda g: g, report, lambda g: None) is None
    assert report.status == "skipped" and "no eligible linear" in report.skips[-1]["reason"]


def test_skip_patterns_keep_layers_float():
    torch.manual_seed(0)
    graph, _, report = quantized_graph(NormMLP().eval(), (torch.randn(2, 8, 64),), [torch.randn(2, 8, 64)], skip=["down"])
    assert {r["where"] for r in report.rewrites} == {"up", "gate"}
    assert any(s["where"] == "down" and "skip" in s["reason"] for s in report.skips)


def test_error_budget_keeps_a_layer_float():
    torch.manual_seed(0)
    _, _, report = quantized_graph(NormMLP().eval(), (torch.randn(2, 8, 64),), [torch.randn(2, 8, 64)],
                                   layer_error_budget=1e-6)
    assert not report.rewrites
    assert all("kept float" in s["reason"] for s in report.skips if s["where"] in ("up", "gate", "down"))


@pytest.mark.parametrize("mode", ["int8_weight_only", "int4_weight_only"])
@pytest.mark.parametrize("rows", [1, 32])
def test_weight_only_modes(mode, rows):
    torch.manual_seed(0)
    model = NormMLP().eval()
    compiled = torch.compile(model, backend="zc", options={"quantize": {**SMALL, "mode": mode, "group_size": 32}})
    x = torch.randn(1, rows, 64)
    with torch.no_grad():
        out = compiled(x)  # weight-only needs no calibration: quantized from the first call
        ref = model(x)
    assert quantize.relative_error(out, ref) < (0.01 if mode.startswith("int8") else 0.05)


def test_minilm_real_weights_error_bound():
    """all-MiniLM-L6-v2 with its real weights: mean-pooled embeddings stay within cosine 0.99."""
    model, inputs, _ = bert_minilm()
    batch = inputs(8)
    compiled = torch.compile(model, backend="zc", options={"quantize": {"calibration_steps": 2}})
    with torch.no_grad():
        compiled(**inputs(4))
        compiled(**inputs(6))
        out = compiled(**batch).last_hidden_state
        ref = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    pooled, pooled_ref = ((t * mask).sum(1) / mask.sum(1) for t in (out, ref))
    assert torch.nn.functional.cosine_similarity(pooled, pooled_ref).min() > 0.99


def test_triton_w8a8_kernel_matches_reference_under_interpreter():
    """The GPU kernel, run by Triton's interpreter on CPU tensors, against the float reference."""
    script = r"""
import torch
from zc.codegen.quant_kernels import w8a8_linear
torch.manual_seed(0)
for m, k, n, bias in ((5, 64, 32, True), (70, 96, 80, False)):
    x = torch.randint(-127, 128, (m, k), dtype=torch.int8)
    w = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    scale = torch.rand(n) / 100
    b = torch.randn(n) if bias else None
    out = torch.ops.zc.w8a8_linear(x, w, scale, b, torch.float32)
    ref = (x.double() @ w.double().t()) * scale.double() + (0 if b is None else b.double())
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-4)
print("ok")
"""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-2000:]


def test_custom_op_passes_opcheck():
    from zc.codegen.quant_kernels import w8a8_linear  # noqa: F401

    x = torch.randint(-127, 128, (8, 32), dtype=torch.int8)
    w = torch.randint(-127, 128, (16, 32), dtype=torch.int8)
    torch.library.opcheck(torch.ops.zc.w8a8_linear.default, (x, w, torch.rand(16), torch.randn(16), torch.float32))
