"""Headless Chromium driven over the DevTools protocol on a pipe (no extra package).

``chromium --remote-debugging-pipe`` reads commands on file descriptor 3 and writes answers
and events on descriptor 4, as NUL-terminated JSON. That is enough to open a page, wait
for an element, click it like a person would, read the page and take a screenshot.

A private CA's server is trusted by pinning its certificate's public key
(``--ignore-certificate-errors-spki-list``), nothing else is relaxed.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import itertools
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

CHROMIUM = "/usr/bin/chromium"


#: a headless Chromium that starts quietly: no sandbox (root in CI), no GPU, nothing fetched
#: in the background, no first-run pages, no scrollbars in screenshots
HEADLESS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--hide-scrollbars",
)


def chromium_path() -> str | None:
    if Path(CHROMIUM).exists():
        return CHROMIUM
    return shutil.which("chromium")


def spki_pin(cert_pem: bytes) -> str:
    """base64(SHA-256(SubjectPublicKeyInfo)) of a PEM certificate, as Chromium wants it."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    spki = cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(hashlib.sha256(spki).digest()).decode()


class BrowserError(AssertionError):
    """The browser did not do what the test expected."""


class Browser:
    """One headless Chromium with one page."""

    def __init__(self, proc: subprocess.Popen[bytes], to_browser: int, from_browser: int) -> None:
        self._proc = proc
        self._out = to_browser
        self._in = from_browser
        self._ids = itertools.count(1)
        self._buffer = b""
        self._session: str | None = None

    # ----------------------------------------------------------------- protocol

    def _read_message(self, deadline: float) -> dict[str, Any]:
        import select

        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BrowserError("the browser did not answer in time")
            ready, _, _ = select.select([self._in], [], [], left)
            if not ready:
                continue
            chunk = os.read(self._in, 65536)
            if not chunk:
                raise BrowserError("the browser closed its pipe")
            self._buffer += chunk
        raw, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(raw)

    def send(
        self, method: str, params: dict[str, Any] | None = None, *, timeout: float = 30
    ) -> Any:
        message_id = next(self._ids)
        message: dict[str, Any] = {"id": message_id, "method": method, "params": params or {}}
        if self._session is not None:
            message["sessionId"] = self._session
        os.write(self._out, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            answer = self._read_message(deadline)
            if answer.get("id") == message_id:
                if "error" in answer:
                    raise BrowserError(f"{method}: {answer['error']}")
                return answer.get("result", {})

    def _open_page(self) -> None:
        target = self.send("Target.createTarget", {"url": "about:blank"})
        attached = self.send(
            "Target.attachToTarget", {"targetId": target["targetId"], "flatten": True}
        )
        self._session = attached["sessionId"]
        self.send("Page.enable")
        self.send("Runtime.enable")

    # ------------------------------------------------------------------- pages

    def evaluate(self, expression: str) -> Any:
        result = self.send(
            "Runtime.evaluate",
            {"expression": expression, "returnByValue": True, "awaitPromise": True},
        )
        if "exceptionDetails" in result:
            raise BrowserError(f"script failed: {result['exceptionDetails'].get('text')}")
        return result.get("result", {}).get("value")

    def goto(self, url: str) -> None:
        answer = self.send("Page.navigate", {"url": url})
        if answer.get("errorText"):
            raise BrowserError(f"cannot open {url}: {answer['errorText']}")

    def wait_for(self, selector: str, *, timeout: float = 30) -> None:
        """Until an element matching ``selector`` is on the page."""
        deadline = time.monotonic() + timeout
        probe = f"document.querySelector({json.dumps(selector)}) !== null"
        while time.monotonic() < deadline:
            with contextlib.suppress(BrowserError):
                if self.evaluate(probe):
                    return
            time.sleep(0.1)
        raise BrowserError(
            f"no {selector} on {self.evaluate('location.href')}: {self.text()[:300]}"
        )

    def click(self, selector: str) -> None:
        """Click the element like a mouse would (at its centre)."""
        box = self.evaluate(
            f"(() => {{ const r = document.querySelector({json.dumps(selector)})"
            ".getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; })()"
        )
        x, y = box
        for kind in ("mousePressed", "mouseReleased"):
            self.send(
                "Input.dispatchMouseEvent",
                {"type": kind, "x": x, "y": y, "button": "left", "clickCount": 1},
            )

    def text(self) -> str:
        return str(self.evaluate("document.body ? document.body.innerText : ''") or "")

    def screenshot(self, path: Path) -> None:
        data = self.send("Page.captureScreenshot", {"format": "png"})["data"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))

    def close(self) -> None:
        with contextlib.suppress(BrowserError, OSError):
            self._session = None
            self.send("Browser.close", timeout=5)
        for fd in (self._out, self._in):
            with contextlib.suppress(OSError):
                os.close(fd)
        try:
            self._proc.wait(10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait(10)


@contextlib.contextmanager
def browser(profile: Path, *, trust_pems: tuple[bytes, ...] = ()) -> Iterator[Browser]:
    """A headless Chromium on a fresh profile, trusting the servers' certificates given."""
    exe = chromium_path()
    if exe is None:  # pragma: no cover - callers skip first
        raise BrowserError("chromium is not installed")
    # descriptors 3 and 4 of the child: its command pipe and its answer pipe
    cmd_read, cmd_write = os.pipe()
    ans_read, ans_write = os.pipe()
    args = [
        exe,
        *HEADLESS,
        "--window-size=800,600",
        f"--user-data-dir={profile}",
        "--remote-debugging-pipe",
    ]
    if trust_pems:
        pins = ",".join(spki_pin(pem) for pem in trust_pems)
        args.append(f"--ignore-certificate-errors-spki-list={pins}")

    def child_fds() -> None:
        # via fresh descriptors: the pipe's own numbers may be 3 or 4 already
        command, answer = os.dup(cmd_read), os.dup(ans_write)
        os.dup2(command, 3)
        os.dup2(answer, 4)

    proc = subprocess.Popen(  # noqa: S603 - a fixed browser binary
        args,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        pass_fds=(3, 4),
        preexec_fn=child_fds,  # noqa: PLW1509 - no threads matter between fork and exec here
    )
    os.close(cmd_read)
    os.close(ans_write)
    chrome = Browser(proc, cmd_write, ans_read)
    try:
        chrome._open_page()
        yield chrome
    finally:
        chrome.close()
