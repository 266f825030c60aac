"""The LocalAPI client against a fake tailscaled on a unix socket, and the CLI fallback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from api.tailscale import LocalAPI, TailscaleCLI, TailscaleError, TailscaleStatus, split_pair

from .fake_tailscale import DOMAIN, OWNER, SELF_V4, SELF_V6, FakeTailnet, install_fake_cli
from .fake_tailscale import status_json as make_status

pytestmark = pytest.mark.anyio


async def test_status_gives_name_ips_and_https(localapi: LocalAPI, tailnet: FakeTailnet) -> None:
    status = await localapi.status()
    assert status.running
    assert status.magicdns_name == DOMAIN
    assert status.dns_name == DOMAIN  # trailing dot stripped
    assert status.tailscale_ips == (SELF_V4, SELF_V6)
    assert status.ipv4 == SELF_V4
    assert status.tun
    assert status.https_capable
    assert tailnet.requests[-1] == "GET /localapi/v0/status?peers=false"


def test_status_without_cert_domains_falls_back_to_dns_name() -> None:
    status = TailscaleStatus.from_json(make_status(https=False))
    assert status.cert_domains == ()
    assert status.magicdns_name == DOMAIN
    assert not status.https_capable


def test_status_not_running_has_no_ips() -> None:
    status = TailscaleStatus.from_json(make_status(backend_state="NeedsLogin"))
    assert not status.running
    assert status.tailscale_ips == ()
    assert status.ipv4 is None


async def test_whois_finds_users_tagged_nodes_and_strangers(
    localapi: LocalAPI, tailnet: FakeTailnet
) -> None:
    tailnet.add_peer("100.90.1.2", OWNER)
    tailnet.add_peer("100.90.1.3", "x@example.com", tags=("tag:ci",))
    tailnet.add_peer("fd7a:115c:a1e0::abcd", OWNER)
    owner = await localapi.whois("100.90.1.2:51234")
    assert owner is not None
    assert (owner.login, owner.tagged) == (OWNER, False)
    assert owner.node_name.endswith(".tailnet-name.ts.net")
    tagged = await localapi.whois("100.90.1.3:1")
    assert tagged is not None
    assert (tagged.login, tagged.tagged, tagged.tags) == ("tagged-devices", True, ("tag:ci",))
    v6 = await localapi.whois("[fd7a:115c:a1e0::abcd]:443")
    assert v6 is not None
    assert v6.login == OWNER
    assert await localapi.whois("192.168.1.20:5000") is None


async def test_cert_pair_is_split_into_key_and_chain(
    localapi: LocalAPI, tailnet: FakeTailnet
) -> None:
    pair = await localapi.cert_pair(DOMAIN)
    key, chain = tailnet.pair_pem()
    assert pair.key_pem == key
    assert pair.cert_pem == chain
    assert b"PRIVATE KEY" not in pair.cert_pem
    assert "key_pem" not in repr(pair)
    assert tailnet.requests[-1] == f"GET /localapi/v0/cert/{DOMAIN}?type=pair"


@pytest.mark.parametrize(
    ("mode", "status", "retry_after", "text"),
    [
        ("denied", 403, None, "cert access denied"),
        ("rate-limited", 429, 120.0, "rate limited"),
        ("broken", 500, None, "invalid domain"),
    ],
)
async def test_cert_errors_carry_status_and_retry_after(
    localapi: LocalAPI,
    tailnet: FakeTailnet,
    mode: str,
    status: int,
    retry_after: float | None,
    text: str,
) -> None:
    tailnet.cert_mode = mode
    with pytest.raises(TailscaleError) as info:
        await localapi.cert_pair(DOMAIN)
    assert info.value.local_api_status == status
    assert info.value.retry_after == retry_after
    assert text in info.value.message
    assert "PRIVATE" not in info.value.message


async def test_serve_config(localapi: LocalAPI, tailnet: FakeTailnet) -> None:
    tailnet.serve_config = {"TCP": {"8400": {"HTTPS": True}}}
    assert await localapi.serve_config() == {"TCP": {"8400": {"HTTPS": True}}}


async def test_unreachable_socket_is_a_tailscale_error(tmp_path: Path) -> None:
    async with LocalAPI(tmp_path / "missing.sock", timeout=2) as client:
        with pytest.raises(TailscaleError, match="could not be reached"):
            await client.status()


def test_split_pair_rejects_other_formats() -> None:
    with pytest.raises(TailscaleError):
        split_pair(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    with pytest.raises(TailscaleError):
        split_pair(b"garbage")


# ------------------------------------------------------------------------------- CLI


@pytest.fixture(name="cli_log")
def _cli_log(tmp_path: Path, tailnet: FakeTailnet, monkeypatch: pytest.MonkeyPatch) -> Path:
    tailnet.add_peer("100.90.1.2", OWNER)
    return install_fake_cli(tmp_path / "bin", tailnet, monkeypatch)


def _argv(log: Path) -> list[list[str]]:
    return [json.loads(line) for line in log.read_text().splitlines()]


async def test_cli_status_and_whois(cli_log: Path) -> None:
    cli = TailscaleCLI()
    status = await cli.status()
    assert status.magicdns_name == DOMAIN
    who = await cli.whois("100.90.1.2:4000")
    assert who is not None
    assert who.login == OWNER
    assert await cli.whois("10.0.0.1:4000") is None
    assert _argv(cli_log) == [
        ["status", "--json", "--peers=false"],
        ["whois", "--json", "100.90.1.2:4000"],
        ["whois", "--json", "10.0.0.1:4000"],
    ]


async def test_cli_cert_writes_files_and_pair(
    cli_log: Path, tailnet: FakeTailnet, tmp_path: Path
) -> None:
    cli = TailscaleCLI()
    cert_file, key_file = tmp_path / "c.crt", tmp_path / "c.key"
    await cli.cert_files(DOMAIN, cert_file, key_file)
    key, chain = tailnet.pair_pem()
    assert cert_file.read_bytes() == chain
    assert key_file.read_bytes() == key
    assert key_file.stat().st_mode & 0o777 == 0o600
    pair = await cli.cert_pair(DOMAIN)
    assert (pair.key_pem, pair.cert_pem) == (key, chain)
    assert _argv(cli_log)[0] == [
        "cert",
        "--cert-file",
        str(cert_file),
        "--key-file",
        str(key_file),
        DOMAIN,
    ]


async def test_cli_cert_for_a_wrong_domain_fails(cli_log: Path, tmp_path: Path) -> None:
    with pytest.raises(TailscaleError, match="invalid domain"):
        await TailscaleCLI().cert_files("other.ts.net", tmp_path / "a", tmp_path / "b")


async def test_cli_missing_is_a_tailscale_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(TailscaleError, match="not on PATH"):
        await TailscaleCLI().status()


async def test_cli_passes_a_non_default_socket_first(cli_log: Path) -> None:
    cli = TailscaleCLI(socket="/run/ts/other.sock")
    assert await cli.whois("10.0.0.1:4000") is None  # "peer not found" on stderr
    assert _argv(cli_log) == [["--socket=/run/ts/other.sock", "whois", "--json", "10.0.0.1:4000"]]


async def test_cli_whois_that_hangs_fails_closed(tmp_path: Path) -> None:
    """A stuck tailscaled must not hold a request forever: whois has its own timeout."""
    hung = tmp_path / "tailscale"
    hung.write_text("#!/bin/sh\nexec sleep 60\n")
    hung.chmod(0o755)
    cli = TailscaleCLI(str(hung), whois_timeout=0.5)
    with pytest.raises(TailscaleError, match="timed out after 0.5 s"):
        await cli.whois("100.90.1.2:4000")


async def test_cli_whois_other_failures_are_errors(tmp_path: Path) -> None:
    broken = tmp_path / "tailscale"
    broken.write_text("#!/bin/sh\necho 'failed to connect to local tailscaled' >&2\nexit 1\n")
    broken.chmod(0o755)
    with pytest.raises(TailscaleError, match="failed to connect"):
        await TailscaleCLI(str(broken)).whois("100.90.1.2:4000")


def test_the_certificate_call_waits_long_enough_for_a_first_issuance() -> None:
    """tailscaled runs the ACME order in the request's context: a client that gives up
    cancels it (tailscale-verified.md #22), so the cert call never waits less than 180 s."""
    assert LocalAPI("/nonexistent.sock", cert_timeout=10).cert_timeout == 180
    assert LocalAPI("/nonexistent.sock").cert_timeout == 300
    assert LocalAPI("/nonexistent.sock").whois_timeout == 10
