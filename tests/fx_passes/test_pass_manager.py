import re

import pytest
import torch
from expecttest import assert_expected_inline
from torch._inductor.utils import fresh_cache

import zc.fx_passes.cleanup as cleanup
from zc.config import ZcConfig
from zc.dump import GraphDump, load_report
from zc.fx_passes.pass_manager import PassManager, PassReport, ZcWarning
from zc.runtime import Phase, PhasedExecutor

aten = torch.ops.aten


@pytest.fixture(autouse=True)
def fresh_inductor_cache():
    # These tests swap a pass's implementation at run time, which no cache key can see.
    with fresh_cache():
        yield


def _model_and_input():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    return model.eval(), torch.randn(4, 8)


def _half_done_then_raise(gm, ctx):
    # Damage the graph first: the manager must roll this back before compiling.
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is aten.relu.default:
            node.target = aten.neg.default
    raise RuntimeError("boom")


def test_failing_pass_is_rolled_back_and_skipped_with_a_warning(monkeypatch, tmp_path):
    monkeypatch.setattr(cleanup, "apply", _half_done_then_raise)
    model, x = _model_and_input()
    compiled = torch.compile(model, backend="zc", options={"cleanup": True, "dump": str(tmp_path)})
    with torch.no_grad(), pytest.warns(ZcWarning, match=r"pass 'cleanup' failed .* RuntimeError: boom"):
        result = compiled(x)
    with torch.no_grad():
        torch.testing.assert_close(result, model(x))
    (graph,) = tmp_path.iterdir()
    (stage,) = load_report(graph)["stages"]
    assert stage["passes"][0]["status"] == "failed"
    assert stage["passes"][0]["error"] == "RuntimeError: boom"
    assert "aten.relu" in (graph / "02_cleanup.py").read_text()


def test_strict_reraises_the_pass_error(monkeypatch):
    monkeypatch.setattr(cleanup, "apply", _half_done_then_raise)
    model, x = _model_and_input()
    compiled = torch.compile(model, backend="zc", options={"cleanup": True, "strict": True})
    with torch.no_grad(), pytest.raises(Exception, match="boom"):
        compiled(x)


def test_uuid_changes_with_options_so_inductor_caches_stay_correct():
    def uuid(options):
        return PassManager(ZcConfig.from_options(options, environ={}), "g", GraphDump(None, "g"), []).uuid()

    assert uuid({}) == uuid({"dump": "/tmp/elsewhere"})
    assert uuid({}) != uuid({"cleanup": True})


def test_uncacheable_pass_turns_inductor_caching_off(monkeypatch):
    manager = PassManager(ZcConfig.from_options({"cleanup": True}, environ={}), "g", GraphDump(None, "g"), [])
    assert manager.uuid() is not None
    monkeypatch.setattr(cleanup, "CACHEABLE", False, raising=False)
    assert manager.uuid() is None


def test_context_maps_weight_placeholders_to_the_real_parameters(monkeypatch):
    model, x = _model_and_input()
    found = []

    def collect_weights(gm, ctx):
        for node in gm.graph.nodes:
            if node.op == "placeholder":
                found.append(ctx.constant_value(gm, node))
        return PassReport("cleanup", status="unchanged")

    monkeypatch.setattr(cleanup, "apply", collect_weights)
    with torch.no_grad():
        torch.compile(model, backend="zc", options={"cleanup": True})(x)
    parameters = [p for p in found if p is not None]
    assert {id(p) for p in parameters} == {id(p) for p in model.parameters()}
    assert sum(p is None for p in found) == 1  # the activation input is not a constant


def test_a_pass_can_wrap_the_compiled_graph_in_a_runtime_executor(monkeypatch):
    model, x = _model_and_input()
    phases = []

    def calibrate_then_compiled(gm, ctx):
        def wrap(compiled):
            def observe(*args):
                phases.append("calibrate")
                return compiled(*args)

            return PhasedExecutor([Phase("calibrate", build=lambda: observe, calls=2),
                                   Phase("run", build=lambda: compiled)])

        ctx.runtime_wrappers.append(wrap)
        return PassReport("cleanup", status="unchanged")

    monkeypatch.setattr(cleanup, "apply", calibrate_then_compiled)
    compiled = torch.compile(model, backend="zc", options={"cleanup": True})
    with torch.no_grad():
        for _ in range(4):
            torch.testing.assert_close(compiled(x), model(x))
    assert phases == ["calibrate", "calibrate"]


def test_training_graphs_get_only_exact_passes(tmp_path):
    model, x = _model_and_input()
    compiled = torch.compile(model, backend="zc", options={"cleanup": True, "dump": str(tmp_path)})
    compiled(x).sum().backward()  # autograd on: AOTAutograd compiles forward and backward graphs
    assert all(p.grad is not None for p in model.parameters())
    (graph,) = tmp_path.iterdir()
    stages = [s["stage"] for s in load_report(graph)["stages"]]
    assert stages[0] == "forward"
    assert (graph / "01_aten_forward.py").exists()


def test_dynamo_level_passes_step_aside_under_autograd(tmp_path):
    model, x = _model_and_input()
    options = {"quantize": {"min_weight_size": 1}, "token_skip": True, "dump": str(tmp_path)}
    compiled = torch.compile(model, backend="zc", options=options)
    with pytest.warns(ZcWarning, match="compiled as a training graph"):
        out = compiled(x)
    out.sum().backward()
    torch.testing.assert_close(out, model(x))
    (graph,) = tmp_path.iterdir()
    passes = {p["name"]: p for p in load_report(graph)["graph_passes"]}
    assert set(passes) == {"quantize", "token_skip"}
    for name, report in passes.items():
        assert report["status"] == "skipped"
        assert report["skips"][0]["reason"].startswith(f"autograd is on: {name} rewrites inference graphs only")


def test_report_skeleton(tmp_path):
    model, x = _model_and_input()
    compiled = torch.compile(model, backend="zc", options={"cleanup": True, "dump": str(tmp_path)})
    with torch.no_grad():
        compiled(x)
    (graph,) = tmp_path.iterdir()
    files = sorted(str(p.relative_to(graph)) for p in graph.rglob("*") if p.is_file())
    assert files[:4] == ["00_captured.py", "01_aten.py", "02_cleanup.py", "code/inference.py"]
    assert any(f.startswith("code/kernels/cpp_fused") and f.endswith(".cpp") for f in files)
    assert files[-2:] == ["report.json", "report.md"]
    report = (graph / "report.md").read_text()
    report = re.sub(r"graph_\d+", "graph_N", report)
    report = re.sub(r"\d+\.\d+ s\b|\| \d+\.\d+ \|", "<time>", report)
    report = re.sub(r"zc \S+, torch \S+", "zc <version>, torch <version>", report)
    report = re.sub(r"compile id: \S+", "compile id: <id>", report)
    assert_expected_inline(
        report,
        """\
# zc report: graph_N

- dynamo compile id: <id>
- device: cpu
- zc <version>, torch <version>
- enabled passes: cleanup
- compile time: <time>

## inference graph

ATen nodes: 11 before zc's passes, 11 after.

| pass | status | rewrites | skips | seconds |
|---|---|---|---|---|
| cleanup | unchanged | 0 | 0 <time>
""",
    )
    captured = (graph / "00_captured.py").read_text()
    assert "torch._C._nn.linear" in captured or "linear" in captured
    assert "torch.ops.aten.addmm" in (graph / "01_aten.py").read_text()


def test_nothing_is_written_or_printed_without_dump(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    model, x = _model_and_input()
    with torch.no_grad():
        torch.compile(model, backend="zc")(x)
    assert list(tmp_path.iterdir()) == []
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


def test_logger_carries_one_summary_line_per_graph(caplog):
    model, x = _model_and_input()
    with caplog.at_level("INFO", logger="zc"), torch.no_grad():
        torch.compile(model, backend="zc", options={"cleanup": True})(x)
    lines = [r.getMessage() for r in caplog.records if r.name == "zc"]
    assert len(lines) == 1
    assert re.match(r"zc graph_\d+ \(dynamo \S+\) on cpu: inference: \d+->\d+ nodes, cleanup=unchanged; compiled in", lines[0])


def test_environment_dump_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("ZC_DUMP", str(tmp_path / "env-dump"))
    model, x = _model_and_input()
    with torch.no_grad():
        torch.compile(model, backend="zc")(x)
    (graph,) = (tmp_path / "env-dump").iterdir()
    assert (graph / "00_captured.py").exists() and (graph / "code" / "inference.py").exists()


