"""machine.fire against states.next_state and the hand-written table, for every combination."""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor

import pytest

from flowengine import machine
from flowengine.errors import FlowError, InvalidTransition
from flowengine.machine import FlowMachine, fire
from flowengine.states import Condition, FlowState, FlowTrigger, next_state

from .helpers_flows import ALL_COMBOS, EXPECTED, combo_id


@pytest.mark.parametrize("combo", ALL_COMBOS, ids=combo_id)
def test_fire_agrees_with_next_state_and_the_table(
    combo: tuple[FlowState, FlowTrigger, Condition | None],
) -> None:
    state, trigger, condition = combo
    expected = EXPECTED.get(combo)
    assert next_state(state, trigger, condition) is expected
    if expected is None:
        with pytest.raises(InvalidTransition) as info:
            fire(state, trigger, condition=condition, flow_id="f1")
        err = info.value
        assert (err.state, err.trigger, err.flow_id) == (state.value, trigger.value, "f1")
        assert err.code == "invalid_transition"
        assert isinstance(err, FlowError)
        assert state.value in str(err)
        assert trigger.value in str(err)
    else:
        result = fire(state, trigger, condition=condition, flow_id="f1")
        assert result is expected
        assert isinstance(result, FlowState)


def test_a_forbidden_trigger_leaves_the_shared_machine_usable() -> None:
    with pytest.raises(InvalidTransition):
        fire(FlowState.FAILED, FlowTrigger.STORE)
    with pytest.raises(InvalidTransition):
        # guarded trigger whose guard does not hold: no exception inside transitions
        fire(FlowState.REFRESHING, FlowTrigger.REFRESH_FAILED)
    assert fire(FlowState.EXCHANGED, FlowTrigger.STORE) is FlowState.STORED
    assert (
        fire(FlowState.REFRESHING, FlowTrigger.REFRESH_FAILED, condition=Condition.PERMANENT)
        is FlowState.EXPIRED
    )


def test_separate_machines_agree() -> None:
    other = FlowMachine()
    for state, trigger, condition in ALL_COMBOS:
        try:
            a: FlowState | None = other.fire(state, trigger, condition=condition)
        except InvalidTransition:
            a = None
        assert a is EXPECTED.get((state, trigger, condition))


def test_one_machine_one_model_no_auto_transitions() -> None:
    m = FlowMachine()
    inner = m._machine
    assert len(inner.models) == 1
    # no to_<state> convenience triggers: every trigger is a table row
    assert set(inner.events) == {t.value for t in FlowTrigger}
    assert set(inner.states) == {s.value for s in FlowState}


def test_fire_is_thread_safe() -> None:
    """The shared model is re-pointed per call under a lock: threads never see each other."""
    rng = random.Random(7)
    combos = [rng.choice(ALL_COMBOS) for _ in range(4000)]

    def run(combo: tuple[FlowState, FlowTrigger, Condition | None]) -> FlowState | None:
        state, trigger, condition = combo
        try:
            return machine.fire(state, trigger, condition=condition)
        except InvalidTransition:
            return None

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(run, combos))
    assert results == [EXPECTED.get(c) for c in combos]
