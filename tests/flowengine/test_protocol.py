"""PKCE, state tokens, the authorize URL and callback parsing (RFC 6749 §4.1, RFC 7636)."""

from __future__ import annotations

import base64
import hashlib
import re
from urllib.parse import parse_qsl, urlsplit

import pytest

from flowengine.protocol import (
    CallbackParams,
    CallbackParseError,
    build_authorize_url,
    code_challenge,
    hash_state,
    new_code_verifier,
    new_state,
    parse_callback,
    same_state,
)

UNRESERVED = re.compile(r"^[A-Za-z0-9\-._~]+$")
STATE = "Zm9vYmFyYmF6cXV4LXN0YXRlLXZhbHVlLTAxMjM0NTY3"  # 44 unreserved characters


# ----------------------------------------------------------------------------- PKCE


def test_rfc7636_appendix_b_vector() -> None:
    verifier = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"
    assert code_challenge(verifier) == "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"


def test_new_verifiers_are_long_random_and_valid() -> None:
    verifiers = {new_code_verifier() for _ in range(500)}
    assert len(verifiers) == 500
    for verifier in verifiers:
        assert 43 <= len(verifier) <= 128
        assert len(verifier) == 64  # 48 random bytes: 384 bits
        assert UNRESERVED.match(verifier)
        challenge = code_challenge(verifier)
        digest = hashlib.sha256(verifier.encode()).digest()
        assert challenge == base64.urlsafe_b64encode(digest).decode().rstrip("=")
        assert len(challenge) == 43


@pytest.mark.parametrize("length", [43, 128])
def test_verifier_length_bounds_are_accepted(length: int) -> None:
    assert len(code_challenge("a" * length)) == 43


@pytest.mark.parametrize(
    "verifier",
    ["a" * 42, "a" * 129, "", "a" * 42 + " ", "a" * 42 + "+", "a" * 42 + "/", "ä" * 43],
    ids=["42", "129", "empty", "space", "plus", "slash", "non-ascii"],
)
def test_invalid_verifiers_are_refused(verifier: str) -> None:
    with pytest.raises(ValueError, match="RFC 7636") as info:
        code_challenge(verifier)
    if verifier:
        assert verifier not in str(info.value)


# ---------------------------------------------------------------------------- state


def test_state_tokens_carry_256_bits() -> None:
    states = [new_state() for _ in range(2000)]
    assert len(set(states)) == len(states)
    raw = b""
    for state in states:
        assert len(state) == 43
        assert UNRESERVED.match(state)
        decoded = base64.urlsafe_b64decode(state + "=")
        assert len(decoded) == 32
        raw += decoded
    # 512,000 bits from the OS CSPRNG: the share of ones is 0.5 to within a few 1e-3
    ones = sum(bin(byte).count("1") for byte in raw)
    assert abs(ones / (len(raw) * 8) - 0.5) < 0.01
    # every byte value turns up (64,000 bytes, 256 values)
    assert len(set(raw)) == 256


def test_state_hash_and_comparison() -> None:
    state = new_state()
    assert hash_state(state) == hashlib.sha256(state.encode()).hexdigest()
    assert len(hash_state(state)) == 64
    assert state not in hash_state(state)
    assert hash_state(state) != hash_state(new_state())
    assert same_state(state, state)
    assert not same_state(state, state[:-1] + ("A" if state[-1] != "A" else "B"))
    assert not same_state(state, state + "x")


# -------------------------------------------------------------------- authorize URL


def query_of(url: str) -> list[tuple[str, str]]:
    return parse_qsl(urlsplit(url).query, keep_blank_values=True)


def test_authorize_url_with_pkce_and_scopes() -> None:
    verifier = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"
    url = build_authorize_url(
        "https://api.dexcom.com/v2/oauth2/login",
        client_id="client id/1",
        redirect_uri="https://box.tail1234.ts.net:8443/oauth/callback?x=1",
        state=STATE,
        scopes=["offline_access", "", "egv"],
        code_verifier=verifier,
    )
    parts = urlsplit(url)
    assert (parts.scheme, parts.netloc, parts.path, parts.fragment) == (
        "https",
        "api.dexcom.com",
        "/v2/oauth2/login",
        "",
    )
    assert query_of(url) == [
        ("response_type", "code"),
        ("client_id", "client id/1"),
        ("redirect_uri", "https://box.tail1234.ts.net:8443/oauth/callback?x=1"),
        ("state", STATE),
        ("scope", "offline_access egv"),
        ("code_challenge", "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"),
        ("code_challenge_method", "S256"),
    ]
    assert verifier not in url


def test_authorize_url_keeps_existing_query_and_appends_extras() -> None:
    url = build_authorize_url(
        "https://account.withings.com/oauth2_user/authorize2?mode=demo",
        client_id="cid",
        redirect_uri="https://h/cb",
        state=STATE,
        scopes=["user.info", "user.metrics"],
        scope_separator=",",
        extra_params={"access_type": "offline", "prompt": "consent"},
    )
    assert query_of(url) == [
        ("mode", "demo"),
        ("response_type", "code"),
        ("client_id", "cid"),
        ("redirect_uri", "https://h/cb"),
        ("state", STATE),
        ("scope", "user.info,user.metrics"),
        ("access_type", "offline"),
        ("prompt", "consent"),
    ]


def test_authorize_url_without_pkce_or_scopes() -> None:
    url = build_authorize_url(
        "http://127.0.0.1:9000/authorize", client_id="c", redirect_uri="https://h/cb", state=STATE
    )
    names = [name for name, _ in query_of(url)]
    assert names == ["response_type", "client_id", "redirect_uri", "state"]


@pytest.mark.parametrize(
    ("base", "kwargs", "message"),
    [
        ("https://p/auth", {"client_id": ""}, "client_id"),
        ("https://p/auth", {"redirect_uri": ""}, "redirect_uri"),
        ("ftp://p/auth", {}, "absolute http"),
        ("/relative/auth", {}, "absolute http"),
        ("https:///auth", {}, "absolute http"),
        ("https://p/auth", {"extra_params": {"state": "evil"}}, "override"),
        ("https://p/auth", {"extra_params": {"redirect_uri": "https://evil/"}}, "override"),
        (
            "https://p/auth",
            {"code_verifier": "v" * 43, "extra_params": {"code_challenge_method": "plain"}},
            "override",
        ),
        ("https://p/auth", {"code_verifier": "short"}, "RFC 7636"),
    ],
)
def test_authorize_url_refuses_bad_input(
    base: str, kwargs: dict[str, object], message: str
) -> None:
    args: dict[str, object] = {"client_id": "c", "redirect_uri": "https://h/cb", "state": STATE}
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        build_authorize_url(base, **args)  # type: ignore[arg-type]


# ------------------------------------------------------------------------- callbacks


def test_parse_a_code_callback_from_a_query_string() -> None:
    params = parse_callback(f"code=abc%2F123&state={STATE}&iss=https%3A%2F%2Fissuer")
    assert params == CallbackParams(state=STATE, code="abc/123", iss="https://issuer")
    assert "abc/123" not in repr(params)
    assert STATE not in repr(params)


def test_parse_a_code_callback_from_a_mapping() -> None:
    assert parse_callback({"state": [STATE], "code": ["c"]}) == CallbackParams(
        state=STATE, code="c"
    )


def test_parse_an_error_callback() -> None:
    params = parse_callback(
        {
            "state": [STATE],
            "error": ["access_denied"],
            "error_description": ["x" * 5000],
        }
    )
    assert (params.error, params.code) == ("access_denied", None)
    assert params.error_description == "x" * 1000  # capped
    # an error wins over a code that came along with it
    both = parse_callback({"state": [STATE], "error": ["server_error"], "code": ["c"]})
    assert (both.error, both.code) == ("server_error", None)


SECRETISH = "SECRETISH-input-value"


@pytest.mark.parametrize(
    ("query", "reason"),
    [
        ({}, "no state"),
        ({"code": ["c"]}, "no state"),
        ({"state": [""], "code": ["c"]}, "no state"),
        ({"state": ["short"], "code": ["c"]}, "not a valid state"),
        ({"state": [STATE + " "], "code": ["c"]}, "not a valid state"),
        ({"state": [STATE + "<script>"], "code": ["c"]}, "not a valid state"),
        ({"state": ["s" * 513], "code": ["c"]}, "not a valid state"),
        ({"state": [STATE, STATE], "code": ["c"]}, "more than once"),
        ({"state": [STATE], "code": ["c", "d"]}, "more than once"),
        ({"state": [STATE], "error": ["a", "b"]}, "more than once"),
        ({"state": [STATE]}, "neither a code nor an error"),
        ({"state": [STATE], "code": [""]}, "neither a code nor an error"),
        ({"state": [STATE], "code": [SECRETISH + "\n"]}, "code parameter is malformed"),
        ({"state": [STATE], "code": [SECRETISH + "é"]}, "code parameter is malformed"),
        ({"state": [STATE], "code": ["c" * 4097]}, "code parameter is malformed"),
        ({"state": [STATE], "error": [""]}, "error parameter is malformed"),
        ({"state": [STATE], "error": ['access"denied']}, "error parameter is malformed"),
        ({"state": [STATE], "error": ["access\\denied"]}, "error parameter is malformed"),
        ({"state": [STATE], "error": ["x" * 201]}, "error parameter is malformed"),
    ],
)
def test_bad_callbacks_are_refused_without_echoing_input(
    query: dict[str, list[str]], reason: str
) -> None:
    with pytest.raises(CallbackParseError, match=reason) as info:
        parse_callback(query)
    assert info.value.reason == str(info.value)
    assert isinstance(info.value, ValueError)
    for values in query.values():
        for value in values:
            if len(value) > 3:
                assert value not in info.value.reason


def test_bad_query_strings_are_refused() -> None:
    with pytest.raises(CallbackParseError, match="more than once"):
        parse_callback(f"state={STATE}&state={STATE}&code=c")
    with pytest.raises(CallbackParseError, match="no state"):
        parse_callback("code=c&&&=")
    with pytest.raises(CallbackParseError, match="code parameter is malformed"):
        parse_callback(f"state={STATE}&code=a%00b")


def test_longest_accepted_code() -> None:
    assert parse_callback({"state": [STATE], "code": ["c" * 4096]}).code == "c" * 4096
