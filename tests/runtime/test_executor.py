
import pytest
import torch
from torch._inductor.compile_fx import compile_fx

from zc.runtime import PartitionedExecutor, Phase, PhasedExecutor, split_and_compile


class TwoBlocks(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.shallow = torch.nn.Linear(16, 16)
        self.deep = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Linear(64, 16))
        self.head = torch.nn.Linear(16, 4)

    def forward(self, x):
        h = torch.relu(self.shallow(x))
        return (self.head(h + self.deep(h)),)


def test_phased_executor_switches_after_n_calls_and_builds_lazily():
    model = TwoBlocks().eval()
    seen_in_calibration = []

    def observe(*args):
        seen_in_calibration.append(args[0].abs().amax().item())
        return model(*args)

    builds = []

    def build_compiled():
        builds.append("compiled")
        return torch.compile(model, backend="inductor")

    executor = PhasedExecutor(
        [Phase("calibrate", build=lambda: observe, calls=3, on_end=lambda: builds.append("scales")),
         Phase("run", build=build_compiled)]
    )
    inputs = [torch.randn(2, 16) for _ in range(5)]
    with torch.no_grad():
        for i, x in enumerate(inputs):
            assert executor.phase == ("calibrate" if i < 3 else "run")
            torch.testing.assert_close(executor(x), model(x))
    assert len(seen_in_calibration) == 3
    assert builds == ["scales", "compiled"]  # on_end before the next phase is built, once
    assert executor.report()["counters"] == {"calibrate": 3, "run": 2}

    executor.reset()
    assert executor.phase == "calibrate" and executor.report()["counters"] == {}
    with torch.no_grad():
        executor(inputs[0])
    assert len(seen_in_calibration) == 4 and builds == ["scales", "compiled"]


def test_phased_executor_rejects_bad_phase_lists():
    with pytest.raises(ValueError, match="at least one phase"):
        PhasedExecutor([])
    with pytest.raises(ValueError, match="needs calls >= 1"):
        PhasedExecutor([Phase("a", build=lambda: print), Phase("b", build=lambda: print)])
    with pytest.raises(ValueError, match="calls=None"):
        PhasedExecutor([Phase("a", build=lambda: print, calls=2)])


def _deep_block(node: torch.fx.Node) -> str:
    stack = node.meta.get("nn_module_stack", {})
    return "deep" if any("deep" in path for path, _ in stack.values()) else "main"


def _split_backend(policy, captured):
    def backend(gm, example_inputs):
        def assign(node):
            # Ops before the deep block, the deep block, ops after: three partitions.
            kind = _deep_block(node)
            if kind == "deep":
                return 1
            return 0 if not captured.get("seen_deep") else 2

        def assign_in_order(node):
            key = assign(node)
            if key == 1:
                captured["seen_deep"] = True
            return key

        executor = split_and_compile(gm, example_inputs, assign_in_order, compile_fx, policy)
        captured["executor"] = executor
        return executor

    return backend


def test_partitioned_executor_runs_inductor_partitions_like_eager():
    model = TwoBlocks().eval()
    captured = {}
    compiled = torch.compile(model, backend=_split_backend(None, captured), fullgraph=True)
    x = torch.randn(3, 16)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x))
    executor = captured["executor"]
    assert isinstance(executor, PartitionedExecutor)
    assert sorted(executor.partitions) == ["submod_0", "submod_1", "submod_2"]
    assert dict(executor.state.counters) == {"submod_0": 1, "submod_1": 1, "submod_2": 1}


def test_policy_can_reuse_a_partition_output_instead_of_running_it():
    model = TwoBlocks().eval()

    def reuse_deep_every_other_call(name, inputs, run, state):
        if name != "submod_1":
            return run()
        state.counters["calls"] += 1
        if state.counters["calls"] % 2 == 0:
            return state["cached"]
        state["cached"] = run()
        return state["cached"]

    captured = {}
    compiled = torch.compile(model, backend=_split_backend(reuse_deep_every_other_call, captured))
    first, second = torch.randn(3, 16), torch.randn(3, 16)
    with torch.no_grad():
        torch.testing.assert_close(compiled(first), model(first))
        reused = compiled(second)
        h = torch.relu(model.shallow(second))
        expected_with_stale_deep = model.head(h + model.deep(torch.relu(model.shallow(first))))
    torch.testing.assert_close(reused[0], expected_with_stale_deep)
    assert not torch.allclose(reused[0], model(second)[0])
    counters = captured["executor"].state.counters
    assert counters["submod_1"] == 1 and counters["submod_0"] == 2 and counters["submod_2"] == 2
    captured["executor"].reset()
    assert "cached" not in captured["executor"].state


def test_partitioned_executor_checks_arity():
    executor = PartitionedExecutor({}, [], [(0, None)], num_inputs=1)
    assert executor(torch.ones(1))[0].item() == 1
    with pytest.raises(TypeError, match="expected 1 inputs"):
        executor(torch.ones(1), torch.ones(1))


