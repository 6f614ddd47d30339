"""zc: a torch.compile backend. Use it as ``torch.compile(model, backend="zc", options={...})``.

No import is needed for that: the backend is registered through the ``torch_dynamo_backends``
entry point. This package exposes the option schema, the typed config, and dump helpers.
"""

__version__ = "0.1.0"

from zc.config import (  # noqa: E402
    CleanupConfig,
    OpGroupingConfig,
    QuantizeConfig,
    StepCacheConfig,
    TokenSkipConfig,
    WindowAttentionConfig,
    ZcConfig,
    option_schema,
)
from zc.dump import load_report, render_report  # noqa: E402

__all__ = [
    "CleanupConfig",
    "OpGroupingConfig",
    "QuantizeConfig",
    "StepCacheConfig",
    "TokenSkipConfig",
    "WindowAttentionConfig",
    "ZcConfig",
    "load_report",
    "option_schema",
    "render_report",
]
