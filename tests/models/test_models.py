"""With every pass off, zc equals eager on real model classes, compiles once, handles new batch sizes."""

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from tests.models.builders import MODELS

# Inductor reorders float reductions and fuses differently from eager: the tolerance PyTorch's
# own Inductor model tests use for fp32.
TOLERANCE = {"rtol": 1e-4, "atol": 1e-4}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_matches_eager_without_recompiles_and_with_dynamic_batch(name):
    model, make_inputs, extract = MODELS[name]()
    counter = CompileCounterWithBackend("zc")
    compiled = torch.compile(model, backend=counter)
    first, second, third = make_inputs(2), make_inputs(3), make_inputs(4)
    with torch.no_grad():
        torch.testing.assert_close(extract(compiled(**first)), extract(model(**first)), **TOLERANCE)
        compiled(**first)
        assert counter.frame_count == 1, "a second call with the same shapes must not recompile"
        for inputs in (second, third):
            torch.testing.assert_close(extract(compiled(**inputs)), extract(model(**inputs)), **TOLERANCE)
    assert counter.frame_count <= 2, f"new batch sizes compiled {counter.frame_count} times"


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(MODELS))
def test_exact_cleanup_pass_keeps_real_models_equal_to_eager(name, tmp_path):
    from zc.dump import load_report

    model, make_inputs, extract = MODELS[name]()
    compiled = torch.compile(model, backend="zc", options={"cleanup": True, "dump": str(tmp_path)})
    inputs = make_inputs(2)
    with torch.no_grad():
        torch.testing.assert_close(extract(compiled(**inputs)), extract(model(**inputs)), **TOLERANCE)
    for graph in tmp_path.iterdir():
        for stage in load_report(graph)["stages"]:
            assert [p["status"] for p in stage["passes"]] in (["applied"], ["unchanged"])
