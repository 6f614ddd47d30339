"""Dynamo's graph of one call, as a Dynamo-level pass receives it (shared by the pass tests)."""

import torch


def capture_graph(model, *args, dynamic=None, **kwargs):
    """``(gm, example_inputs)`` that Dynamo hands a backend for ``model(*args, **kwargs)``."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append((gm, example_inputs))
        return gm

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=backend, dynamic=dynamic)(*args, **kwargs)
    assert len(graphs) == 1, f"the model should be one graph, Dynamo made {len(graphs)}"
    return graphs[0]
