"""Who may fetch which provider's access token: the ``[[access]]`` policy. [pure]

agentd.toml holds any number of rules::

    [[access]]
    who = ["tag:agent", "owner@example.com"]
    providers = ["dexcom", "withings"]

A caller is what the tailnet says it is (LocalAPI whois of its address): a **tagged
device** is its tags (it has no user; whois names the literal login "tagged-devices"), any
other device is its user's **login**. A ``who`` entry ``tag:<name>`` matches a device
carrying that tag; any other entry is a login and matches an untagged device of that user,
exactly as ``tailscale whois`` prints it (case and all). A rule grants its providers to
every caller one of its entries matches; ``providers = ["*"]`` grants every provider.
Rules add up; nothing is granted by default, and there is no entry for "everyone".

Tag names follow Tailscale's own rule (``tailcfg.CheckTag``, tailscale.com v1.102.5):
``tag:`` then an ASCII letter, then letters, digits or dashes.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

__all__ = [
    "ALL_PROVIDERS",
    "AccessPolicy",
    "AccessRule",
    "login_problem",
    "parse_rules",
    "principal",
    "tag_problem",
    "unknown_providers",
    "who_problem",
]

#: ``providers = ["*"]``: every provider of the catalog
ALL_PROVIDERS = "*"
#: what whois names as the login of a tagged device; never a person
TAGGED_LOGIN = "tagged-devices"

_TAG = re.compile(r"tag:[A-Za-z][A-Za-z0-9-]*")
_PROVIDER = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
_KEYS = ("who", "providers")


def tag_problem(entry: str) -> str | None:
    """Why ``entry`` is not a Tailscale tag (``tag:`` + a letter, letters/digits/dashes)."""
    if _TAG.fullmatch(entry):
        return None
    if entry == "tag:":
        return "a tag needs a name after 'tag:'"
    return "a tag is 'tag:' then a letter, then letters, digits or dashes (as in the ACL)"


def login_problem(entry: str) -> str | None:
    """Why ``entry`` is not a tailnet login as whois names it (``user@domain``)."""
    if not entry or len(entry) > 254:
        return "a login is 1-254 characters"
    if any(ch.isspace() or ord(ch) < 0x20 or ord(ch) == 0x7F for ch in entry):
        return "a login has no spaces or control characters"
    if entry == TAGGED_LOGIN:
        return "'tagged-devices' is no login: name the devices' tags (tag:<name>)"
    user, at, domain = entry.rpartition("@")
    if not at or not user or not domain:
        return "a login looks like user@example.com (as `tailscale whois` prints it)"
    return None


def who_problem(entry: object) -> str | None:
    """Why ``entry`` cannot stand in a ``who`` list, or None."""
    if not isinstance(entry, str):
        return "must be a string: a tag (tag:<name>) or a login (user@example.com)"
    if entry.startswith("tag:"):
        return tag_problem(entry)
    if entry.lower().startswith("tag"):
        return tag_problem(entry)  # "tag-ci", "TAG:ci": a tag meant, misspelt
    return login_problem(entry)


def principal(login: str, tags: Iterable[str]) -> str:
    """The caller as audits and rate limits name it: its tags (sorted, comma-separated)
    when tagged, else its login."""
    tagged = sorted(set(tags))
    return ",".join(tagged) if tagged else login


@dataclass(frozen=True, slots=True)
class AccessRule:
    """One ``[[access]]`` table."""

    who: tuple[str, ...]
    providers: tuple[str, ...]
    #: which ``[[access]]`` table of the file it is (from 1), for messages
    number: int = field(default=0, compare=False)

    def matches(self, login: str, tags: frozenset[str]) -> bool:
        for entry in self.who:
            if entry.startswith("tag:"):
                if entry in tags:
                    return True
            elif not tags and login and login != TAGGED_LOGIN and entry == login:
                return True
        return False


@dataclass(frozen=True, slots=True)
class AccessPolicy:
    """The rules in force. ``allows`` is the only question the API asks."""

    rules: tuple[AccessRule, ...] = ()

    def granted(self, login: str, tags: Iterable[str]) -> frozenset[str]:
        """Every provider id this caller may fetch (``*`` when a rule grants all)."""
        tagset = frozenset(tags)
        out: set[str] = set()
        for rule in self.rules:
            if rule.matches(login, tagset):
                out.update(rule.providers)
        return frozenset(out)

    def allows(self, login: str, tags: Iterable[str], provider: str) -> bool:
        granted = self.granted(login, tags)
        return provider in granted or ALL_PROVIDERS in granted

    def pairs(self) -> frozenset[tuple[str, str]]:
        """(who entry, provider) pairs: what a reload compares."""
        return frozenset((w, p) for rule in self.rules for w in rule.who for p in rule.providers)

    def providers(self) -> frozenset[str]:
        return frozenset(p for rule in self.rules for p in rule.providers)

    def describe(self) -> list[dict[str, list[str]]]:
        """The rules as data (``config show``)."""
        return [{"who": list(r.who), "providers": list(r.providers)} for r in self.rules]


def parse_rules(raw: object) -> tuple[AccessPolicy, list[tuple[str, str]]]:
    """``[[access]]`` tables as TOML gives them -> the policy and its problems.

    Problems are (key, message) pairs, the key like ``access[2].who`` (tables counted from
    1, as a reader counts them in the file). A rule with a problem is left out whole, so a
    typo never grants more than was written.
    """
    problems: list[tuple[str, str]] = []
    if raw is None:
        return AccessPolicy(), problems
    if not isinstance(raw, list) or not all(isinstance(t, Mapping) for t in raw):
        return AccessPolicy(), [("access", "must be an array of tables: [[access]]")]
    rules: list[AccessRule] = []
    for number, table in enumerate(raw, start=1):
        where = f"access[{number}]"
        bad = len(problems)
        for key in table:
            if key not in _KEYS:
                problems.append((f"{where}.{key}", "unknown key (who and providers only)"))
        who = _strings(table.get("who"), f"{where}.who", problems)
        for index, entry in enumerate(who):
            problem = who_problem(entry)
            if problem:
                problems.append((f"{where}.who[{index + 1}]", f"{entry!r}: {problem}"))
        providers = _strings(table.get("providers"), f"{where}.providers", problems)
        for index, entry in enumerate(providers):
            if entry != ALL_PROVIDERS and not _PROVIDER.fullmatch(entry):
                problems.append(
                    (f"{where}.providers[{index + 1}]", f"{entry!r} is not a provider id")
                )
        if len(problems) == bad:
            rules.append(
                AccessRule(tuple(dict.fromkeys(who)), tuple(dict.fromkeys(providers)), number)
            )
    return AccessPolicy(tuple(rules)), problems


def unknown_providers(policy: AccessPolicy, known: Sequence[str]) -> list[tuple[str, str]]:
    """(key, provider) of every granted provider id the catalog does not have."""
    ids = set(known)
    out: list[tuple[str, str]] = []
    for rule in policy.rules:
        for index, provider in enumerate(rule.providers):
            if provider != ALL_PROVIDERS and provider not in ids:
                out.append((f"access[{rule.number}].providers[{index + 1}]", provider))
    return out


def _strings(value: object, key: str, problems: list[tuple[str, str]]) -> list[str]:
    if value is None:
        problems.append((key, "missing (a non-empty list of strings)"))
        return []
    if not isinstance(value, list) or not value:
        problems.append((key, "must be a non-empty list of strings"))
        return []
    if not all(isinstance(v, str) for v in value):
        problems.append((key, "must be a list of strings"))
        return [v for v in value if isinstance(v, str)]
    return list(value)
