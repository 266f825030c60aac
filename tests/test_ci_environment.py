"""In CI the real parts must be present: the tests that would skip without them must run.

Locally (no CI variable) a developer may lack chromium, Graphviz, the oidc-provider node
modules or Go (for the real-tailnet binaries) and the dependent tests skip with a reason;
under CI a skip would hide them, so this test fails instead. `.ci/run` installs or builds
them (and stops when Go is missing).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.tailnet.harness import missing_binaries

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(
    os.environ.get("CI", "").lower() not in ("1", "true", "yes"),
    reason="only enforced under CI (the CI variable is set)",
)


@pytest.mark.parametrize(
    ("what", "present"),
    [
        ("chromium (headless browser tests)", lambda: shutil.which("chromium") is not None),
        ("graphviz dot (SVG diagrams)", lambda: shutil.which("dot") is not None),
        (
            "systemd-analyze (the unit file is verified)",
            lambda: shutil.which("systemd-analyze") is not None,
        ),
        ("node (oidc-provider end-to-end tests)", lambda: shutil.which("node") is not None),
        (
            "build/tailnet: testnet, tailscaled, tailscale (`make tailnet`, needs Go)",
            lambda: not missing_binaries(),
        ),
        (
            "tests/e2e/oidc/node_modules/oidc-provider",
            lambda: (ROOT / "tests/e2e/oidc/node_modules/oidc-provider").is_dir(),
        ),
    ],
)
def test_real_parts_are_installed_in_ci(what: str, present: object) -> None:
    assert callable(present)
    assert present(), f"{what} is missing in CI: .ci/run should have installed it"
