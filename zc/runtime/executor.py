"""Executors: what zc returns to Dynamo when a pass needs state across calls.

Two shapes cover the passes that need one:

* :class:`PhasedExecutor` runs phase A for N calls, then phase B (built lazily when it starts):
  calibrate in float with observers, then run the quantized code.
* :class:`PartitionedExecutor` runs a graph that was split into compiled partitions and lets a
  Python policy decide, per partition and per call, whether to run it or to return something
  else (a cached output): the step cache's "recompute the deep branch or reuse it".

State is explicit (:class:`RuntimeState`), resettable (``reset()``) and reported (``report()``).
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any


class RuntimeState(dict):
    """A pass's state across calls: a dict the pass owns, plus call counters zc keeps."""

    def __init__(self) -> None:
        super().__init__()
        self.counters: Counter[str] = Counter()

    def reset(self) -> None:
        self.clear()
        self.counters.clear()


class Executor:
    """Base of zc's executors: callable with Dynamo's flat positional arguments."""

    def __init__(self) -> None:
        self.state = RuntimeState()

    def __call__(self, *args: Any) -> Any:
        raise NotImplementedError

    def reset(self) -> None:
        self.state.reset()

    def report(self) -> dict[str, Any]:
        return {"type": type(self).__name__, "counters": dict(self.state.counters)}


@dataclasses.dataclass
class Phase:
    """One phase of a :class:`PhasedExecutor`.

    ``build`` makes the phase's function when the phase starts (so a quantized graph can be
    compiled after calibration has produced its scales). ``calls`` is how many calls the phase
    serves; ``None`` means every remaining call (only the last phase). ``on_end`` runs once
    when the phase has served its calls, before the next phase is built.
    """

    name: str
    build: Callable[[], Callable[..., Any]]
    calls: int | None = None
    on_end: Callable[[], None] | None = None


class PhasedExecutor(Executor):
    def __init__(self, phases: Sequence[Phase]):
        super().__init__()
        if not phases:
            raise ValueError("PhasedExecutor needs at least one phase")
        for phase in phases[:-1]:
            if phase.calls is None or phase.calls < 1:
                raise ValueError(f"phase '{phase.name}' is not last, so it needs calls >= 1")
        if phases[-1].calls is not None:
            raise ValueError(f"the last phase ('{phases[-1].name}') serves every remaining call: calls=None")
        self.phases = list(phases)
        self._built: dict[str, Callable[..., Any]] = {}
        self._index = 0
        self._calls_in_phase = 0

    @property
    def phase(self) -> str:
        return self.phases[self._index].name

    def __call__(self, *args: Any) -> Any:
        phase = self.phases[self._index]
        if phase.name not in self._built:
            self._built[phase.name] = phase.build()
        result = self._built[phase.name](*args)
        self.state.counters[phase.name] += 1
        self._calls_in_phase += 1
        if phase.calls is not None and self._calls_in_phase == phase.calls:
            if phase.on_end is not None:
                phase.on_end()
            self._index += 1
            self._calls_in_phase = 0
        return result

    def reset(self, rebuild: bool = False) -> None:
        """Start again from the first phase; ``rebuild`` also drops the built functions."""
        super().reset()
        self._index = 0
        self._calls_in_phase = 0
        if rebuild:
            self._built.clear()

    def report(self) -> dict[str, Any]:
        return {**super().report(), "phase": self.phase, "calls_in_phase": self._calls_in_phase}


# A policy decides per partition call: run_partition() computes the partition's outputs; the
# policy may call it, or return other outputs of the same structure (e.g. cached ones).
PartitionPolicy = Callable[[str, tuple, Callable[[], Any], RuntimeState], Any]


@dataclasses.dataclass(frozen=True)
class _Step:
    partition: str
    inputs: tuple[tuple[int, int | None], ...]  # (slot, item index or None) per argument
    output_slot: int


class PartitionedExecutor(Executor):
    """Run compiled partitions in order, wired as a flat plan, with an optional policy.

    ``plan`` lists, per partition call, where its arguments come from: slot ``i`` < number of
    inputs is the executor's ``i``-th argument; later slots hold earlier partitions' results,
    indexed by item when a partition returns a tuple. ``outputs`` wires the final results the
    same way. :func:`zc.runtime.partition.split_and_compile` builds all of this from a graph.
    """

    def __init__(
        self,
        partitions: Mapping[str, Callable[..., Any]],
        plan: Sequence[_Step],
        outputs: Sequence[tuple[int, int | None]],
        num_inputs: int,
        policy: PartitionPolicy | None = None,
    ):
        super().__init__()
        self.partitions = dict(partitions)
        self.plan = list(plan)
        self.outputs = list(outputs)
        self.num_inputs = num_inputs
        self.policy = policy

    def __call__(self, *args: Any) -> Any:
        if len(args) != self.num_inputs:
            raise TypeError(f"expected {self.num_inputs} inputs, got {len(args)}")
        slots: list[Any] = [*args, *([None] * len(self.plan))]

        def fetch(ref: tuple[int, int | None]) -> Any:
            slot, item = ref
            return slots[slot] if item is None else slots[slot][item]

        for step in self.plan:
            inputs = tuple(fetch(ref) for ref in step.inputs)
            compiled = self.partitions[step.partition]

            def run(compiled=compiled, inputs=inputs, name=step.partition):
                self.state.counters[name] += 1
                return compiled(*inputs)

            if self.policy is None:
                slots[step.output_slot] = run()
            else:
                slots[step.output_slot] = self.policy(step.partition, inputs, run, self.state)
        return tuple(fetch(ref) for ref in self.outputs)
