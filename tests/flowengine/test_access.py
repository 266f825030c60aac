"""The [[access]] policy: parsing, problems, and who gets what. [pure: tables]"""

from __future__ import annotations

import pytest

from flowengine.access import (
    AccessPolicy,
    AccessRule,
    login_problem,
    parse_rules,
    principal,
    tag_problem,
    unknown_providers,
    who_problem,
)

OWNER = "owner@example.com"


@pytest.mark.parametrize(
    ("entry", "ok"),
    [
        ("tag:agent", True),
        ("tag:ci", True),
        ("tag:gpu-box-2", True),
        ("tag:Prod", True),  # tailcfg.CheckTag: ASCII letters of either case
        ("tag:", False),
        ("tag:2fast", False),  # must start with a letter
        ("tag:-x", False),
        ("tag:a_b", False),
        ("tag:a.b", False),
        ("tag:a b", False),
        ("tag:ü", False),
        ("tag", False),
        ("TAG:ci", False),
        ("tagci", False),
    ],
)
def test_tags_follow_tailscales_rule(entry: str, ok: bool) -> None:
    assert (who_problem(entry) is None) is ok, who_problem(entry)
    if entry.startswith("tag:"):
        assert (tag_problem(entry) is None) is ok


@pytest.mark.parametrize(
    ("entry", "ok"),
    [
        (OWNER, True),
        ("alice@github", True),
        ("Alice.Smith+x@Example.COM", True),
        ("user-1@fake-control.example.net", True),
        ("", False),
        ("owner", False),
        ("@example.com", False),
        ("owner@", False),
        ("owner @example.com", False),
        ("owner@example.com\n", False),
        ("tagged-devices", False),
        ("a" * 250 + "@x.io", False),
    ],
)
def test_logins(entry: str, ok: bool) -> None:
    assert (login_problem(entry) is None) is ok, login_problem(entry)
    assert (who_problem(entry) is None) is ok


@pytest.mark.parametrize("entry", [1, None, ["tag:ci"], {"tag": "ci"}, 1.5, True])
def test_who_entries_must_be_strings(entry: object) -> None:
    assert who_problem(entry) is not None


@pytest.mark.parametrize(
    ("login", "tags", "who"),
    [
        (OWNER, (), OWNER),
        ("tagged-devices", ("tag:ci",), "tag:ci"),
        ("tagged-devices", ("tag:gpu", "tag:ci", "tag:ci"), "tag:ci,tag:gpu"),
    ],
)
def test_principal(login: str, tags: tuple[str, ...], who: str) -> None:
    assert principal(login, tags) == who


POLICY = AccessPolicy(
    (
        AccessRule(("tag:agent", OWNER), ("dexcom", "withings")),
        AccessRule(("tag:ci",), ("github",)),
        AccessRule(("admin@example.com",), ("*",)),
    )
)


@pytest.mark.parametrize(
    ("login", "tags", "provider", "allowed"),
    [
        (OWNER, (), "dexcom", True),
        (OWNER, (), "withings", True),
        (OWNER, (), "github", False),
        ("OWNER@example.com", (), "dexcom", False),  # exactly as whois names it
        ("guest@example.com", (), "dexcom", False),
        ("tagged-devices", ("tag:agent",), "dexcom", True),
        ("tagged-devices", ("tag:agent",), "github", False),
        ("tagged-devices", ("tag:ci",), "github", True),
        ("tagged-devices", ("tag:ci", "tag:agent"), "github", True),  # rules add up
        ("tagged-devices", ("tag:ci", "tag:agent"), "dexcom", True),
        ("tagged-devices", ("tag:other",), "dexcom", False),
        # a tagged device is never its tagger's user, even if whois named one
        (OWNER, ("tag:other",), "dexcom", False),
        ("admin@example.com", (), "anything", True),
        ("", (), "dexcom", False),
        ("tagged-devices", (), "dexcom", False),
    ],
)
def test_who_gets_what(login: str, tags: tuple[str, ...], provider: str, allowed: bool) -> None:
    assert POLICY.allows(login, tags, provider) is allowed


def test_nobody_by_default() -> None:
    assert not AccessPolicy().allows(OWNER, (), "dexcom")
    assert AccessPolicy().granted("tagged-devices", ("tag:ci",)) == frozenset()


def test_parse_rules_reads_tables_and_numbers_them() -> None:
    policy, problems = parse_rules(
        [
            {"who": ["tag:agent", OWNER], "providers": ["dexcom", "withings", "dexcom"]},
            {"who": ["tag:ci"], "providers": ["*"]},
        ]
    )
    assert problems == []
    assert policy.rules == (
        AccessRule(("tag:agent", OWNER), ("dexcom", "withings")),
        AccessRule(("tag:ci",), ("*",)),
    )
    assert [r.number for r in policy.rules] == [1, 2]
    assert policy.pairs() == {
        ("tag:agent", "dexcom"),
        ("tag:agent", "withings"),
        (OWNER, "dexcom"),
        (OWNER, "withings"),
        ("tag:ci", "*"),
    }
    assert policy.describe()[0] == {
        "who": ["tag:agent", OWNER],
        "providers": ["dexcom", "withings"],
    }


@pytest.mark.parametrize(
    ("raw", "keys"),
    [
        ({"who": ["tag:ci"]}, ["access"]),  # [access] instead of [[access]]
        ("x", ["access"]),
        ([1], ["access"]),
        ([{}], ["access[1].who", "access[1].providers"]),
        ([{"who": [], "providers": ["dexcom"]}], ["access[1].who"]),
        ([{"who": "tag:ci", "providers": ["dexcom"]}], ["access[1].who"]),
        ([{"who": ["tag:ci", 3], "providers": ["dexcom"]}], ["access[1].who"]),
        ([{"who": ["tag:2x"], "providers": ["dexcom"]}], ["access[1].who[1]"]),
        ([{"who": ["owner"], "providers": ["dexcom"]}], ["access[1].who[1]"]),
        ([{"who": ["tag:ci"], "providers": ["Dexcom!"]}], ["access[1].providers[1]"]),
        ([{"who": ["tag:ci"], "providers": []}], ["access[1].providers"]),
        ([{"who": ["tag:ci"], "providers": ["dexcom"], "allow": 1}], ["access[1].allow"]),
        (
            [{"who": ["tag:ci"], "providers": ["dexcom"]}, {"who": ["x"], "providers": ["y"]}],
            ["access[2].who[1]"],
        ),
    ],
)
def test_parse_rules_problems(raw: object, keys: list[str]) -> None:
    policy, problems = parse_rules(raw)
    assert [key for key, _ in problems] == keys
    # a rule with a problem grants nothing; the good ones stay
    for rule in policy.rules:
        assert all(who_problem(w) is None for w in rule.who)
    assert not policy.allows("tagged-devices", ("tag:2x",), "dexcom")


def test_unknown_providers_name_the_table_of_the_file() -> None:
    policy, problems = parse_rules(
        [
            {"who": ["bad"], "providers": ["dexcom"]},  # table 1: left out
            {"who": ["tag:ci"], "providers": ["dexcom", "dexcon", "*"]},
        ]
    )
    assert [key for key, _ in problems] == ["access[1].who[1]"]
    assert unknown_providers(policy, ["dexcom", "oura"]) == [("access[2].providers[2]", "dexcon")]
