"""The ``backend="zc"`` function that Dynamo calls (registered through the entry point)."""

from zc.dynamo_backend.backend import zc

__all__ = ["zc"]
