"""The glucose chart renders a real, non-trivial PNG of the requested size."""

from __future__ import annotations

import struct
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from flowengine.clock import ManualClock
from integrations.dexcom.chart import render_chart
from integrations.dexcom.client import Reading, reading_from_record
from integrations.dexcom.sim import DexcomSim

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
NOW = datetime(2026, 11, 20, 18, 0, tzinfo=UTC)
ARTIFACTS = Path(__file__).resolve().parents[3] / "test-artifacts"


def _day_of_readings() -> list[Reading]:
    """24 h at 5-minute cadence: a dip below 70 and a peak above 180."""
    readings = []
    for i in range(288):
        when = NOW - timedelta(minutes=5 * (287 - i))
        value = 120
        if 60 <= i < 72:
            value = 60
        elif 150 <= i < 170:
            value = 210
        trend = "flat" if i % 3 else "fortyFiveUp"
        readings.append(Reading(when, when.replace(tzinfo=None), value, trend, 0.5, "ok"))
    return readings


def _sim_day() -> list[Reading]:
    """The simulated Dexcom's last 24 h (one low and one high excursion)."""
    sim = DexcomSim(clock=ManualClock(NOW.timestamp()))
    start = (NOW - timedelta(hours=24)).timestamp()
    return [reading_from_record(r) for r in sim.egv_records(start, NOW.timestamp())]


def _ihdr_size(png: bytes) -> tuple[int, int]:
    assert png[:8] == PNG_SIGNATURE
    length, kind = struct.unpack(">I4s", png[8:16])
    assert kind == b"IHDR"
    assert length == 13
    width, height = struct.unpack(">II", png[16:24])
    return width, height


def _pixels(png: bytes, tmp_path: Path):  # type: ignore[no-untyped-def]
    import matplotlib.image

    path = tmp_path / "chart.png"
    path.write_bytes(png)
    return matplotlib.image.imread(str(path))


def test_chart_png_size_and_content(tmp_path: Path) -> None:
    readings = _sim_day()
    values = [r.value_mgdl or 0 for r in readings]
    assert min(values) < 70 < 180 < max(values)
    png = render_chart(readings, tz=ZoneInfo("Europe/Berlin"), unit="mg/dL", now=NOW)
    assert _ihdr_size(png) == (1000, 500)
    pixels = _pixels(png, tmp_path)
    assert pixels.shape[:2] == (500, 1000)
    colours = {tuple(p) for p in pixels.reshape(-1, pixels.shape[2])[::7].tolist()}
    assert len(colours) > 20  # curve, band, markers, text: far from one colour
    # the curve's blue appears somewhere
    blue = (pixels[:, :, 2] > 0.6) & (pixels[:, :, 0] < 0.3)
    assert blue.sum() > 500
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "glucose-chart.png").write_bytes(png)


def test_chart_in_mmol_and_custom_size(tmp_path: Path) -> None:
    png = render_chart(
        _day_of_readings()[-48:],
        tz=ZoneInfo("America/New_York"),
        unit="mmol/L",
        width_px=640,
        height_px=360,
    )
    assert _ihdr_size(png) == (640, 360)
    assert _pixels(png, tmp_path).shape[:2] == (360, 640)


def test_empty_chart_still_renders(tmp_path: Path) -> None:
    png = render_chart([], tz=ZoneInfo("UTC"))
    assert _ihdr_size(png) == (1000, 500)
    pixels = _pixels(png, tmp_path)
    assert len({tuple(p) for p in pixels.reshape(-1, pixels.shape[2]).tolist()}) > 2


def test_missing_values_are_skipped(tmp_path: Path) -> None:
    readings = _day_of_readings()[:10]
    gap = Reading(NOW, NOW.replace(tzinfo=None), None, "none", None, "unknown")
    png = render_chart([*readings, gap], tz=ZoneInfo("UTC"))
    assert _ihdr_size(png) == (1000, 500)


def test_too_small_is_refused() -> None:
    with pytest.raises(ValueError, match="100 x 100"):
        render_chart([], tz=ZoneInfo("UTC"), width_px=50)


def test_importing_the_module_does_not_import_matplotlib() -> None:
    import subprocess

    code = (
        "import sys, integrations, integrations.dexcom.chart; integrations.discover()\n"
        "sys.exit(1 if 'matplotlib' in sys.modules else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], check=False, cwd=ARTIFACTS.parent)
    assert result.returncode == 0
