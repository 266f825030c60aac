"""Hostile and random callback queries: never 5xx, never a stored row, never unescaped text."""

from __future__ import annotations

import string
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import parse_qsl, quote, urlencode

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from quart.typing import TestClientProtocol as Client

from flowengine.engine import FlowEngine

from .conftest import count_rows, start_flow

pytestmark = pytest.mark.anyio

HOSTILE = [
    "<script>alert(1)</script>",
    "\"'><img src=x onerror=alert(1)>",
    "</title><h1>owned</h1>",
    "javascript:alert(1)",
    "&amp;&lt;&#x3c;",
    "\x00\x01\x7f",
    "%00%3Cscript%3E",
    "a" * 5000,
    "access_denied",
    "s" * 43,
]
NAMES = st.sampled_from(["code", "state", "error", "error_description", "iss", "x"]) | st.text(
    max_size=8
)
VALUES = st.sampled_from(HOSTILE) | st.text(max_size=80)
PAIRS = st.lists(st.tuples(NAMES, VALUES), max_size=6)
RAW = st.text(alphabet=string.printable.replace("#", "").replace(" ", "") + "%", max_size=200)

FUZZ = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
DANGEROUS = set("<>\"'")
#: every tag and attribute the page templates use: anything else was injected
PAGE_TAGS = {"html", "head", "meta", "title", "link", "body", "main", "div", "h1", "p", "code"}
PAGE_ATTRS = {"lang", "charset", "name", "content", "rel", "href", "class", "aria-hidden"}


class _Markup(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: set[str] = set()
        self.attrs: set[str] = set()
        self.text: list[str] = []

    def handle_data(self, data: str) -> None:
        self.text.append(data)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.add(tag)
        self.attrs.update(name for name, _ in attrs)


def assert_not_reflected(body: str, values: list[str]) -> None:
    markup = _Markup()
    markup.feed(body)
    assert markup.tags <= PAGE_TAGS
    assert markup.attrs <= PAGE_ATTRS
    for value in values:
        if len(value) >= 4 and DANGEROUS & set(value):
            assert value not in body


@FUZZ
@given(pairs=PAIRS)
async def test_random_callback_queries(
    client: Client, engine: FlowEngine, ledger_file: Path, pairs: list[tuple[str, str]]
) -> None:
    if count_rows(ledger_file)["flows"] == 0:
        await start_flow(engine)  # a real waiting flow the fuzzed states must not touch
    before = count_rows(ledger_file)
    query = urlencode(pairs, quote_via=quote)
    response = await client.get("/oauth/callback?" + query)
    assert 400 <= response.status_code < 500
    body = await response.get_data(as_text=True)
    assert_not_reflected(body, [v for _, v in pairs] + [n for n, _ in pairs])
    assert count_rows(ledger_file) == before


@FUZZ
@given(raw=RAW)
async def test_raw_query_strings(
    client: Client, engine: FlowEngine, ledger_file: Path, raw: str
) -> None:
    before = count_rows(ledger_file)
    response = await client.get("/oauth/callback?" + raw)
    assert 400 <= response.status_code < 500
    body = await response.get_data(as_text=True)
    decoded = [v for pair in parse_qsl(raw, keep_blank_values=True) for v in pair]
    assert_not_reflected(body, [raw, *decoded])
    assert count_rows(ledger_file) == before


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(description=VALUES, error=st.sampled_from(["access_denied", "server_error", "x<y"]))
async def test_provider_error_text_is_escaped(
    client: Client, engine: FlowEngine, ledger_file: Path, description: str, error: str
) -> None:
    started = await start_flow(engine)
    query = urlencode(
        {"error": error, "error_description": description, "state": started.state},
        quote_via=quote,
    )
    response = await client.get("/oauth/callback?" + query)
    assert response.status_code < 500
    body = await response.get_data(as_text=True)
    assert_not_reflected(body, [description, error])
    if response.status_code == 200:
        # what a person reads is exactly what the provider sent (escaped in the markup)
        markup = _Markup()
        markup.feed(body)
        wanted = description[:1000]
        if wanted.isprintable():
            assert wanted in "".join(markup.text)
