"""``agentd config show``: the configuration agentd uses, as TOML, derived values resolved.

The output is valid TOML (``tomllib`` reads back the values agentd runs with). It opens with
the redirect URI to register at providers. A key left empty is shown with the value agentd
works out for it and marked ``# derived: how``; a key set in the environment is marked
``# from $AGENTD_...``; secrets are masked. On a broken configuration a wrong value is shown
as the file (or the environment) wrote it, marked ``# error: why`` — never the default used
in its place — and nothing is derived from it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from agentd import tomlout
from agentd.config import SCHEMA, SECRET_KEYS, Config
from flowengine import paths
from flowengine.errors import BrokerError

__all__ = ["Derived", "derive", "render"]

MASK = "********"


@dataclass(frozen=True, slots=True)
class Derived:
    """A value agentd works out for an empty key, and how (None: could not)."""

    value: Any
    how: str


async def _plan(config: Config) -> Any:
    """The daemon's serving plan, as ``agentd serve`` would make it (asks tailscaled)."""
    from agentd.context import api_settings
    from agentd.daemon import tailscale_client
    from api.serve import plan_serving

    # not the API token: showing the configuration must not create its file
    settings = api_settings(config)
    tailscale = tailscale_client(settings)
    try:
        return await plan_serving(settings, tailscale=tailscale)
    finally:
        close = getattr(tailscale, "aclose", None)
        if close is not None:
            await close()


def _origin_of_path(env: Mapping[str, str], explicit: str, xdg: str, fallback: str) -> str:
    for name in explicit.split("|"):
        if env.get(name):
            return f"${name}" + (" (systemd StateDirectory=)" if name == "STATE_DIRECTORY" else "")
    if env.get(xdg) and os.path.isabs(env[xdg]):
        return f"${xdg}/{fallback}"
    return f"~/{_XDG_DEFAULTS[xdg]}/{fallback}"


_XDG_DEFAULTS = {"XDG_STATE_HOME": ".local/state", "XDG_DATA_HOME": ".local/share"}


async def derive(config: Config, env: Mapping[str, str] | None = None) -> dict[str, Derived]:
    """``"section.key"`` -> the derived value of every key the configuration leaves empty."""
    environ = os.environ if env is None else env
    out: dict[str, Derived] = {}
    if not config.paths.state_dir:
        how = _origin_of_path(
            environ, "AGENTD_STATE_DIR|STATE_DIRECTORY", "XDG_STATE_HOME", "agentd"
        )
        out["paths.state_dir"] = Derived(str(config.state_dir), how)
    if not config.paths.auth_file:
        how = _origin_of_path(environ, "AGENT_AUTH_FILE", "XDG_DATA_HOME", "agent/auth.json")
        out["paths.auth_file"] = Derived(str(config.auth_file), how)
    server = config.server
    if not server.api_token:
        token_file = config.api_token_path
        if token_file.is_file():
            out["server.api_token"] = Derived(MASK, f"generated, in {token_file}")
        else:
            out["server.api_token"] = Derived("", f"generated into {token_file} on first start")
    try:
        plan = await _plan(config)
    except (BrokerError, OSError) as err:
        reason = err.message if isinstance(err, BrokerError) else type(err).__name__
        for name in ("host", "public_name", "public_port", "redirect_uri"):
            if not getattr(server, name):
                out[f"server.{name}"] = Derived(None, f"unknown: {reason}")
        return out
    from urllib.parse import urlsplit

    if not server.host:
        how = (
            "the Tailscale address" if server.mode == "tls" else "loopback (behind tailscale serve)"
        )
        out["server.host"] = Derived(plan.host, how)
    if not server.public_name:
        out["server.public_name"] = Derived(plan.public_name, "asked tailscaled (MagicDNS name)")
    if not server.public_port:
        port = urlsplit(plan.redirect_uri).port or 443
        how = "server.port" if server.mode == "tls" else "tailscale serve's HTTPS port"
        out["server.public_port"] = Derived(port, how)
    if not server.redirect_uri:
        out["server.redirect_uri"] = Derived(
            plan.redirect_uri, "https://<public_name>:<public_port>/oauth/callback"
        )
    if server.mode == "tls" and not server.cert_file and plan.public_name:
        tls_dir = config.state_dir / "tls"
        how = "fetched from tailscaled, renewed by the daemon"
        out["server.cert_file"] = Derived(str(tls_dir / f"{plan.public_name}.crt"), how)
        out["server.key_file"] = Derived(str(tls_dir / f"{plan.public_name}.key"), how)
    return out


def _line(name: str, shown: Any, comment: str | None) -> str:
    text = f"{tomlout.key(name)} = {tomlout.value(shown)}"
    return f"{text}  # {comment}" if comment else text


def _key_line(
    config: Config,
    name: str,
    dotted: str,
    value: Any,
    problems: Mapping[str, list[str]],
    derived: Mapping[str, Derived],
) -> str:
    """One key of ``config show``: as written and marked when wrong, else the value in use
    (or derived), secrets masked."""
    origin = config.origins.get(dotted)
    secret = dotted in SECRET_KEYS
    if dotted in problems:
        shown = origin[1] if origin is not None else value
        if secret and shown:
            shown = MASK
        source = f" ({origin[0]})" if origin and origin[0] != "file" else ""
        return _line(name, shown, f"error{source}: {'; '.join(problems[dotted])}")
    if secret and value:
        value = MASK
    if dotted in derived and not config.problems:
        d = derived[dotted]
        return _line(name, value if d.value is None else d.value, f"derived: {d.how}")
    comment = f"from {origin[0]}" if origin is not None and origin[0] != "file" else None
    return _line(name, value, comment)


def render(config: Config, derived: Mapping[str, Derived]) -> str:
    """The whole ``config show`` text."""
    problems: dict[str, list[str]] = {}
    for problem in config.problems:
        problems.setdefault(problem.key, []).append(problem.message)
    deprecated = {w.key: f"{w.message}: {w.hint}" for w in config.warnings}
    where = str(config.file) + ("" if config.file_exists else " (not present: defaults)")
    lines = [f"# agentd configuration: {where}"]
    redirect = config.server.redirect_uri or getattr(
        derived.get("server.redirect_uri"), "value", None
    )
    if config.problems:
        lines += [
            f"# {len(config.problems)} problem(s): a wrong value is shown as written, marked"
            " error; `agentd config check` lists them all",
            "# redirect URI to register: unknown until the problems are fixed",
        ]
    elif redirect:
        lines += ["# redirect URI to register at every provider, byte for byte:", f"#   {redirect}"]
    else:
        how = derived["server.redirect_uri"].how if "server.redirect_uri" in derived else ""
        lines.append(f"# redirect URI to register: {how or 'unknown'}")
    schema_keys = {f"{section}.{name}" for section, keys in SCHEMA.items() for name in keys}
    for problem in config.problems:
        if problem.key not in schema_keys and problem.key not in config.unknown:
            lines.append(f"# error: {problem}")
    lines += [
        f"# providers: {paths.user_catalog_path()}"
        + ("" if paths.user_catalog_path().is_file() else " (not present: built-ins only)"),
        "# derived = worked out by agentd for an empty key; secrets are masked",
    ]
    last = ""
    for dotted, value in config.items():
        section, _, name = dotted.partition(".")
        if section != last:
            lines += ["", f"[{section}]"]
            last = section
        lines.append(_key_line(config, name, dotted, value, problems, derived))
    rules = config.access.rules
    lines += ["", f"# [[access]]: {len(rules) or 'no'} rule(s) (tokens for other machines)"]
    for rule in rules:
        lines += ["[[access]]", _line("who", list(rule.who), None)]
        lines += [_line("providers", list(rule.providers), None)]
    if config.unknown:
        lines += ["", "# not read (unknown sections and keys, as written):"]
        for dotted, raw in config.unknown.items():
            why = deprecated.get(dotted) or "; ".join(problems.get(dotted, ["unknown"]))
            try:
                text = f"{dotted} = {tomlout.value(raw)}"
            except TypeError:
                text = dotted
            lines.append(f"# {text}  ({why})")
    return "\n".join(lines) + "\n"
