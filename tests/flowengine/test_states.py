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
    Effects,
    ErrorEffect,
    FlowState,
    FlowTrigger,
    Secrets,
    Transition,
    Value,
    allowed_triggers,
    effects_of,
    next_state,
)

from .helpers_flows import (
    ALL_COMBOS,
    EDGES,
    EXPECTED,
    EXPECTED_EFFECTS,
    combo_id,
    edge_id,
    path_to,
)


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


# ------------------------------------------------------------------------- effects


def _row(trigger: FlowTrigger, condition: Condition | None, source: FlowState) -> Transition:
    rows = [
        r
        for r in TRANSITIONS
        if r.trigger is trigger and source in r.sources and r.condition in (None, condition)
    ]
    assert len(rows) == 1, rows
    return rows[0]


@pytest.mark.parametrize("edge", EDGES, ids=edge_id)
def test_every_edge_declares_its_effects(
    edge: tuple[FlowState, FlowTrigger, Condition | None, FlowState],
) -> None:
    source, trigger, condition, dest = edge
    row = _row(trigger, condition, source)
    assert row.dest is dest
    assert isinstance(row.effects, Effects)
    assert row.effects == EXPECTED_EFFECTS[(trigger, condition)]
    # what the engine reads before the move is the same row's effects
    assert effects_of(trigger, condition) is row.effects
    assert row.effects.describe()


def test_a_row_without_effects_cannot_be_written() -> None:
    with pytest.raises(TypeError, match="effects"):
        Transition(FlowTrigger.CANCEL, (FlowState.INITIATED,), FlowState.CANCELLED)  # type: ignore[call-arg]


def test_the_expected_effects_cover_every_row_and_nothing_else() -> None:
    declared = {(r.trigger, r.condition) for r in TRANSITIONS}
    assert declared == set(EXPECTED_EFFECTS)
    assert len(EDGES) == 28


def test_effects_of_a_move_that_does_not_exist() -> None:
    with pytest.raises(ValueError, match="refresh_failed"):
        effects_of(FlowTrigger.REFRESH_FAILED)  # it needs its condition


@pytest.mark.parametrize("edge", EDGES, ids=edge_id)
def test_effects_keep_the_row_consistent(
    edge: tuple[FlowState, FlowTrigger, Condition | None, FlowState],
) -> None:
    """The invariants the ledger's columns rely on, edge by edge."""
    source, trigger, condition, dest = edge
    fx = _row(trigger, condition, source).effects
    waiting = {FlowState.INITIATED, FlowState.AWAITING_CODE, FlowState.AWAITING_DEVICE}
    waiting |= {FlowState.CODE_RECEIVED}
    # a flow waiting for the owner or a code has a deadline; nothing else keeps one
    if dest in waiting and dest is not source:
        assert fx.deadline in (Value.GIVEN_OR_LINK_TTL, Value.CODE_TTL, Value.VALID_FOR)
    if source in waiting and dest not in waiting:
        assert fx.deadline is Value.CLEAR
    # an authorization that ends before its tokens are stored takes its secrets along
    if source in PENDING_STATES and (dest in TERMINAL_STATES or dest is FlowState.EXPIRED):
        assert fx.secrets is Secrets.DROP
    # secrets are only ever kept for a flow that still waits for them
    if fx.secrets in (Secrets.STORE_CODE, Secrets.STORE_DEVICE):
        assert dest in waiting
    # a stored connection is scheduled for the timer; a connection that ends is not
    if dest is FlowState.STORED and source is not FlowState.STORED:
        assert fx.next_check_at in (Value.GIVEN_OR_NOW, Value.GIVEN_OR_RETRY)
    if source in ACTIVE_STATES | {FlowState.EXPIRED} and dest not in ACTIVE_STATES:
        assert fx.next_check_at is Value.CLEAR
    # a failure says why, in the row and in the event
    if dest is FlowState.FAILED:
        assert fx.error is ErrorEffect.SET
        assert fx.error_key == "error"
    if fx.error is ErrorEffect.KEEP or fx.error is ErrorEffect.CLEAR:
        assert fx.error_key is None
    # whoever waits for an authorization's outcome is woken by every move of one
    if source in waiting and dest is not source:
        assert fx.wakes
