"""The transition table as data: states.next_state against the hand-written expectation."""

from __future__ import annotations

from collections import deque

import pytest

from flowengine.states import (
    ACTIVE_STATES,
    PENDING_STATES,
    TERMINAL_STATES,
    TRANSITIONS,
    Condition,
    FlowState,
    FlowTrigger,
    allowed_triggers,
    next_state,
)

from .helpers_flows import ALL_COMBOS, EXPECTED, combo_id, path_to


@pytest.mark.parametrize("combo", ALL_COMBOS, ids=combo_id)
def test_next_state_matches_the_expected_table(
    combo: tuple[FlowState, FlowTrigger, Condition | None],
) -> None:
    state, trigger, condition = combo
    assert next_state(state, trigger, condition) is EXPECTED.get(combo)


def test_the_expected_table_is_not_vacuous() -> None:
    allowed = [c for c in ALL_COMBOS if c in EXPECTED]
    # 17 rows, 28 (source, trigger) moves; unconditioned ones accept any of 3
    # conditions, refresh_failed only its own
    assert len(allowed) == 26 * 3 + 2
    assert len(ALL_COMBOS) == len(FlowState) * len(FlowTrigger) * 3 == 576


@pytest.mark.parametrize("state", list(FlowState), ids=str)
def test_allowed_triggers_lists_exactly_the_table_rows(state: FlowState) -> None:
    expected = {t for (s, t, _c) in EXPECTED if s is state}
    got = allowed_triggers(state)
    assert set(got) == expected
    assert len(got) == len(set(got)), "duplicates"
    table_order = [r.trigger for r in TRANSITIONS if state in r.sources]
    assert got == list(dict.fromkeys(table_order))


def test_no_two_rows_compete_for_the_same_move() -> None:
    rows: dict[tuple[FlowState, FlowTrigger], list[Condition | None]] = {}
    for row in TRANSITIONS:
        for source in row.sources:
            rows.setdefault((source, row.trigger), []).append(row.condition)
    for key, conditions in rows.items():
        # either one unconditioned row, or conditioned rows with distinct conditions
        if None in conditions:
            assert conditions == [None], key
        else:
            assert len(set(conditions)) == len(conditions), key


def test_guarded_trigger_covers_every_condition() -> None:
    guarded = {row.trigger for row in TRANSITIONS if row.condition is not None}
    assert guarded == {FlowTrigger.REFRESH_FAILED}
    for trigger in guarded:
        covered = {row.condition for row in TRANSITIONS if row.trigger is trigger}
        assert covered == set(Condition)


def test_every_state_is_reachable_from_initiated() -> None:
    reached = {FlowState.INITIATED}
    queue = deque([FlowState.INITIATED])
    while queue:
        state = queue.popleft()
        for row in TRANSITIONS:
            if state in row.sources and row.dest not in reached:
                reached.add(row.dest)
                queue.append(row.dest)
    assert reached == set(FlowState)
    for state in FlowState:
        assert path_to(state) or state is FlowState.INITIATED


def test_state_groups() -> None:
    assert PENDING_STATES == {
        FlowState.INITIATED,
        FlowState.AWAITING_CODE,
        FlowState.AWAITING_DEVICE,
        FlowState.CODE_RECEIVED,
        FlowState.EXCHANGED,
    }
    assert ACTIVE_STATES == {FlowState.STORED, FlowState.REFRESHING}
    assert TERMINAL_STATES == {
        FlowState.FAILED,
        FlowState.CANCELLED,
        FlowState.REVOKED,
        FlowState.SUPERSEDED,
    }
    assert not (PENDING_STATES & ACTIVE_STATES)
    assert not (PENDING_STATES & TERMINAL_STATES)
    assert not (ACTIVE_STATES & TERMINAL_STATES)
    # the only state in no group: expired, which may still be revoked or superseded
    assert set(FlowState) - PENDING_STATES - ACTIVE_STATES - TERMINAL_STATES == {FlowState.EXPIRED}


@pytest.mark.parametrize("state", sorted(TERMINAL_STATES), ids=str)
def test_terminal_states_have_no_way_out(state: FlowState) -> None:
    assert allowed_triggers(state) == []


@pytest.mark.parametrize("state", sorted(set(FlowState) - TERMINAL_STATES), ids=str)
def test_non_terminal_states_have_a_way_on(state: FlowState) -> None:
    assert allowed_triggers(state)


def test_every_row_explains_itself() -> None:
    for row in TRANSITIONS:
        assert row.why, row
        assert row.sources, row
        assert len(set(row.sources)) == len(row.sources), row


def test_enum_values_are_snake_case_names() -> None:
    for member in [*FlowState, *FlowTrigger, *Condition]:
        assert member.value == member.name.lower()
