"""A device-grant provider for tests (RFC 8628): its device endpoint and token endpoint on an
httpx.MockTransport, answering polls from a script."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

import httpx

from flowengine.catalog import ProviderSpec
from flowengine.device import DEVICE_GRANT_TYPE

HOST = "https://tv.example.com"
DEVICE_CODE = "dc-" + "d" * 40
USER_CODE = "WDJB-MJHT"


def spec(**kw: Any) -> ProviderSpec:
    values: dict[str, Any] = {
        "id": "tv",
        "name": "TV Provider",
        "authorize_url": f"{HOST}/authorize",
        "token_url": f"{HOST}/token",
        "device_authorization_url": f"{HOST}/device",
        "scopes": ("read", "offline_access"),
        "token_auth_method": "none",
        "resource": "https://api.tv.example.com/",
    }
    values.update(kw)
    return ProviderSpec(**values)


@dataclass
class DeviceProvider:
    """A device endpoint and a token endpoint answering the device grant from ``script``."""

    interval: int | None = 5
    expires_in: int = 600
    #: answers to the device token requests, in order: an error code, "tokens", or a Response
    script: list[str | httpx.Response | Exception] = field(default_factory=list)
    #: the answer once the script is used up (what the owner has decided so far)
    then: str = "authorization_pending"
    forms: list[dict[str, str]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)

    def handler(self, request: httpx.Request) -> httpx.Response:
        form = dict(parse_qsl(request.content.decode()))
        self.forms.append({"path": request.url.path, **form})
        self.headers.append(dict(request.headers))
        if request.url.path == "/device":
            body: dict[str, Any] = {
                "device_code": DEVICE_CODE,
                "user_code": USER_CODE,
                "verification_uri": f"{HOST}/activate",
                "verification_uri_complete": f"{HOST}/activate?user_code={USER_CODE}",
                "expires_in": self.expires_in,
            }
            if self.interval is not None:
                body["interval"] = self.interval
            return httpx.Response(200, json=body)
        assert request.url.path == "/token"
        assert form["grant_type"] == DEVICE_GRANT_TYPE
        assert form["device_code"] == DEVICE_CODE
        answer = self.script.pop(0) if self.script else self.then
        if isinstance(answer, Exception):
            raise answer
        if isinstance(answer, httpx.Response):
            return answer
        if answer == "tokens":
            return httpx.Response(
                200,
                json={
                    "access_token": "at-device",
                    "refresh_token": "rt-device",
                    "expires_in": 3600,
                    "token_type": "Bearer",
                    "scope": "read offline_access",
                },
            )
        return httpx.Response(400, json={"error": answer, "error_description": f"{answer}!"})

    def polls(self) -> list[dict[str, str]]:
        return [f for f in self.forms if f["path"] == "/token"]
