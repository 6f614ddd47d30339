"""State that lives across calls: executors that sequence compiled code (see executor.py)."""

from zc.runtime.executor import (
    Executor,
    PartitionedExecutor,
    PartitionPolicy,
    Phase,
    PhasedExecutor,
    RuntimeState,
)
from zc.runtime.partition import split_and_compile

__all__ = [
    "Executor",
    "PartitionPolicy",
    "PartitionedExecutor",
    "Phase",
    "PhasedExecutor",
    "RuntimeState",
    "split_and_compile",
]
