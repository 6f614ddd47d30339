import torch
from torch._inductor.utils import run_and_get_code
from torch.testing import FileCheck

from zc.dump import load_report


def _graph_dir(tmp_path):
    (graph,) = tmp_path.iterdir()
    return graph


def _report(tmp_path):
    return load_report(_graph_dir(tmp_path))


def _cleanup_stage(tmp_path):
    (stage,) = _report(tmp_path)["stages"]
    (cleanup,) = stage["passes"]
    return cleanup


def test_removes_no_op_ops_and_keeps_results(tmp_path):
    def f(x, w):
        y = (x @ w)[:, : x.shape[1]].contiguous() * 1.0
        y = y.expand(4, 8).reshape(4, 8) - 0
        z = torch.cat([y]) / 1
        return torch.tanh(z).to(torch.float32), y.sum()

    x, w = torch.randn(4, 8), torch.randn(8, 8)
    compiled = torch.compile(f, backend="zc", options={"cleanup": True, "dump": str(tmp_path)})
    torch.testing.assert_close(compiled(x, w), f(x, w))
    cleanup = _cleanup_stage(tmp_path)
    assert cleanup["status"] == "applied"
    removed = cleanup["metrics"]["removed"]
    assert removed == {
        "aten.mul.Tensor": 1, "aten.expand.default": 1, "aten.sub.Tensor": 1, "aten.div.Tensor": 1
    }, removed
    after = (_graph_dir(tmp_path) / "02_cleanup.py").read_text()
    assert "aten.mul" not in after and "aten.div" not in after and "aten.tanh" in after


def test_keeps_ops_that_change_values_or_layout(tmp_path):
    def f(x):
        a = x * 2.0          # not an identity
        b = x + 0.0          # -0.0 + 0 is +0.0: not an identity, kept on purpose
        c = x.t().contiguous()  # changes strides: a real copy
        return a, b, c.view(-1)

    x = torch.tensor([[-0.0, 1.0], [2.0, -3.0]])
    compiled = torch.compile(f, backend="zc", options={"cleanup": True, "dump": str(tmp_path)})
    results = compiled(x)
    for got, expected in zip(results, f(x)):
        torch.testing.assert_close(got, expected)
    assert torch.signbit(results[1][0, 0]).item() is False
    assert _cleanup_stage(tmp_path)["status"] == "unchanged"


def test_does_not_make_an_output_alias_an_input(tmp_path):
    def f(x):
        return x.clone(), x * 1

    x = torch.randn(3)
    compiled = torch.compile(f, backend="zc", options={"cleanup": True, "dump": str(tmp_path)})
    copy, scaled = compiled(x)
    copy.add_(1)
    scaled.add_(1)
    torch.testing.assert_close(x, x.clone())
    assert copy.data_ptr() != x.data_ptr() and scaled.data_ptr() != x.data_ptr()
    cleanup = _cleanup_stage(tmp_path)
    assert cleanup["status"] == "unchanged"
    reasons = {s["reason"] for s in cleanup["skips"]}
    assert any("alias of a graph input" in r for r in reasons), reasons


def test_generated_code_is_inductors_fused_cpp():
    def f(x):
        return torch.relu(x * 1.0 + 1.0).sin()

    x = torch.randn(64)
    compiled = torch.compile(f, backend="zc", options={"cleanup": True})
    result, (code,) = run_and_get_code(compiled, x)
    torch.testing.assert_close(result, f(x))
    # One fused C++ kernel: the no-op multiply is gone, add + relu + sin share one loop.
    FileCheck().check("cpp_fused_add_relu_sin_0").check("extern \"C\"").check_not("tmp1 = tmp0 * ").check(".sin()").run(code)
