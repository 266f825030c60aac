"""The flow state machine, built with ``transitions`` from states.TRANSITIONS. [pure]

One synchronous :class:`transitions.Machine` serves every flow. It has one attached model
whose state is set to the flow's current state before each trigger, under a lock; that is
about 9 times cheaper than attaching a model per call (add_model binds every trigger) and
about 20 times cheaper than a machine per call (measured by benchmarks/bench_ledger.py:
~6 us, ~56 us and ~140 us). The machine only decides; the ledger persists.
"""

from __future__ import annotations

import threading
from typing import Any

from transitions import Machine, MachineError

from .errors import InvalidTransition
from .states import TRANSITIONS, Condition, FlowState, FlowTrigger

__all__ = ["FlowMachine", "fire"]


class _FlowModel:
    """What transitions attaches triggers to; lives for one ``fire`` call."""

    state: str

    def __init__(self) -> None:
        self.state = ""


def _condition_check(expected: Condition) -> Any:
    def check(event: Any) -> bool:
        return bool(event.kwargs.get("condition") == expected)

    check.__name__ = f"is_{expected.value}"
    return check


class FlowMachine:
    """Validates and computes transitions of any flow."""

    def __init__(self) -> None:
        spec: list[dict[str, Any]] = []
        for row in TRANSITIONS:
            entry: dict[str, Any] = {
                "trigger": row.trigger.value,
                "source": [s.value for s in row.sources],
                "dest": row.dest.value,
            }
            if row.condition is not None:
                entry["conditions"] = [_condition_check(row.condition)]
            spec.append(entry)
        self._machine = Machine(
            model=None,
            states=[s.value for s in FlowState],
            transitions=spec,
            initial=FlowState.INITIATED.value,
            auto_transitions=False,
            send_event=True,
            ignore_invalid_triggers=False,
            model_override=False,
        )
        self._model = _FlowModel()
        self._machine.add_model(self._model, initial=FlowState.INITIATED.value)
        self._lock = threading.Lock()

    def fire(
        self,
        state: FlowState,
        trigger: FlowTrigger,
        *,
        condition: Condition | None = None,
        flow_id: str | None = None,
    ) -> FlowState:
        """The state after ``trigger`` from ``state``; InvalidTransition if not allowed."""
        with self._lock:
            model = self._model
            model.state = state.value
            try:
                moved = self._machine.events[trigger.value].trigger(model, condition=condition)
            except (MachineError, KeyError) as err:
                raise InvalidTransition(
                    flow_id=flow_id, state=state.value, trigger=trigger.value
                ) from err
            if not moved:
                # a guarded trigger whose condition did not hold: nothing happened
                raise InvalidTransition(flow_id=flow_id, state=state.value, trigger=trigger.value)
            return FlowState(model.state)


_DEFAULT = FlowMachine()


def fire(
    state: FlowState,
    trigger: FlowTrigger,
    *,
    condition: Condition | None = None,
    flow_id: str | None = None,
) -> FlowState:
    """Fire ``trigger`` on the shared machine."""
    return _DEFAULT.fire(state, trigger, condition=condition, flow_id=flow_id)
