import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    torch.manual_seed(0)
    yield
    torch._dynamo.reset()


@pytest.fixture(autouse=True)
def no_zc_environment(monkeypatch):
    """ZC_* variables of the calling shell must not leak into tests of the options."""
    for name in list(os.environ):
        if name.startswith("ZC_"):
            monkeypatch.delenv(name)
