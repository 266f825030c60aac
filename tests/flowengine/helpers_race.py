"""One racer process for tests/flowengine/test_concurrency.py (run as a script).

    python helpers_race.py LEDGER GO_FILE MODE ITEMS_JSON TAG

Opens its own FlowEngine on LEDGER, prints ``ready``, waits for GO_FILE to appear, then
for every item fires MODE (``refresh``: begin_refresh on a flow id; ``callback``:
record_callback with a code named after TAG on an OAuth state; ``take``: take_code on a
state) and prints one JSON object: item -> "ok" or the error's class name (and for
``take`` the code it got).
"""

from __future__ import annotations

import json
import os
import sys
import time

import anyio

from flowengine.engine import FlowEngine
from flowengine.errors import BrokerError
from flowengine.protocol import CallbackParams


def wait_for(go: str) -> None:
    """Spin until the go file appears (blocking on purpose: both racers start together)."""
    deadline = time.monotonic() + 30
    while not os.path.exists(go):
        if time.monotonic() > deadline:
            raise SystemExit("no go signal")
        time.sleep(0.0005)


async def race(db: str, go: str, mode: str, items: list[str], tag: str) -> dict[str, str]:
    outcome: dict[str, str] = {}
    async with await FlowEngine.open(db) as engine:
        print("ready", flush=True)
        wait_for(go)
        for item in items:
            try:
                if mode == "refresh":
                    await engine.begin_refresh(item, actor="cli")
                    outcome[item] = "ok"
                elif mode == "callback":
                    params = CallbackParams(state=item, code=f"code-{tag}-{item[:8]}")
                    await engine.record_callback(params, actor="api")
                    outcome[item] = "ok"
                elif mode == "take":
                    taken = await engine.take_code(item, actor="cli")
                    outcome[item] = f"ok:{taken.code}"
                else:
                    raise SystemExit(f"unknown mode {mode}")
            except BrokerError as err:
                outcome[item] = type(err).__name__
    return outcome


def main() -> None:
    db, go, mode, items_json, tag = sys.argv[1:6]
    result = anyio.run(race, db, go, mode, json.loads(items_json), tag)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
