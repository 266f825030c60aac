"""The CLI's wording of catalog values (agentd/formatting.py)."""

from __future__ import annotations

import pytest

from agentd.formatting import lifetime_text
from flowengine.catalog import RefreshLifetime, load_catalog


def test_the_builtin_spotify_lifetime_in_words() -> None:
    lifetime = load_catalog(None).get("spotify").refresh_lifetime
    assert lifetime is not None
    assert lifetime_text(lifetime) == "6 months after authorization (refreshing does not extend it)"


@pytest.mark.parametrize(
    ("lifetime", "text"),
    [
        (RefreshLifetime("idle", months=1, days=2), "1 month 2 days after the last refresh"),
        (RefreshLifetime("idle", months=12), "12 months after the last refresh"),
        (RefreshLifetime("none"), "never expires"),
        (
            RefreshLifetime("absolute", days=7, condition="the app's publishing status is Testing"),
            "7 days after authorization (refreshing does not extend it),"
            " if the app's publishing status is Testing",
        ),
    ],
)
def test_lifetime_text(lifetime: RefreshLifetime, text: str) -> None:
    assert lifetime_text(lifetime) == text
