from __future__ import annotations

from pathlib import Path

import pytest

from flowengine.clock import ManualClock
from flowengine.engine import FlowEngine
from flowengine.protocol import parse_callback
from flowengine.states import FlowState


@pytest.mark.anyio
async def test_happy_path_reaches_stored(tmp_path: Path) -> None:
    async with await FlowEngine.open(tmp_path / "ledger.db", clock=ManualClock()) as engine:
        started = await engine.start("dexcom", redirect_uri="https://h/cb", actor="bot")
        await engine.issue_url(started.flow.id, actor="bot")
        await engine.record_callback(parse_callback({"state": [started.state], "code": ["c"]}))
        taken = await engine.take_code(started.state)
        assert taken.code == "c"
        await engine.record_exchange(taken.flow_id, actor="bot")
        flow = await engine.record_stored(taken.flow_id, actor="bot", token_expires_at=None)
        assert flow.state is FlowState.STORED
        assert [e.to_state for e in (await engine.inspect(flow.id)).events] == [
            FlowState.INITIATED,
            FlowState.AWAITING_CODE,
            FlowState.CODE_RECEIVED,
            FlowState.EXCHANGED,
            FlowState.STORED,
        ]
