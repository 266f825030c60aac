"""A PNG chart of weight and blood pressure for the bot.

matplotlib is imported inside :func:`render_chart` (importing this module costs nothing) and
drawn with the Agg canvas directly: no pyplot, no global backend switch, safe in a daemon.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import TYPE_CHECKING
from zoneinfo import ZoneInfo

from .client import Measurement

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.axes import Axes

__all__ = ["render_chart"]

_DPI = 100


def render_chart(
    items: Sequence[Measurement], *, tz: ZoneInfo, width_px: int = 1000, height_px: int = 700
) -> bytes:
    """Weight (top) and blood pressure (bottom) as a PNG of ``width_px`` x ``height_px``.

    Uncertain weigh-ins (possibly another person on the scale) are left out; the latest
    values are in the panel titles; an empty period says so.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.dates import AutoDateLocator, DateFormatter, date2num
    from matplotlib.figure import Figure

    if width_px < 100 or height_px < 100:
        raise ValueError("a chart needs at least 100 x 100 pixels")
    certain = sorted((m for m in items if not m.uncertain), key=lambda m: m.taken_at)
    weights = [m for m in certain if m.weight_kg is not None]
    pressures = [m for m in certain if m.has_blood_pressure]

    fig = Figure(figsize=(width_px / _DPI, height_px / _DPI), dpi=_DPI)
    FigureCanvasAgg(fig)
    top, bottom = fig.subplots(2, 1, sharex=True)

    def when(m: Measurement) -> float:
        local = m.taken_at.astimezone(tz).replace(tzinfo=None)
        return float(date2num(local))  # type: ignore[no-untyped-call]

    def panel(ax: Axes, title: str, unit: str) -> None:
        ax.set_title(title, fontsize=14, loc="left")
        ax.set_ylabel(unit)
        ax.grid(True, color="#dddddd", lw=0.6)

    if weights:
        top.plot(
            [when(m) for m in weights],
            [m.weight_kg for m in weights],
            color="#1565c0",
            lw=1.6,
            marker="o",
            ms=3,
        )
        last = weights[-1]
        panel(top, f"{last.weight_kg:.1f} kg on {last.taken_at.astimezone(tz):%d %b}", "kg")
    else:
        panel(top, "No weigh-ins in this period", "kg")

    if pressures:
        xs = [when(m) for m in pressures]
        bottom.plot(xs, [m.systolic for m in pressures], color="#c62828", lw=1.4, label="systolic")
        bottom.plot(
            xs, [m.diastolic for m in pressures], color="#ef6c00", lw=1.4, label="diastolic"
        )
        bottom.axhspan(120, 130, color="#ef6c00", alpha=0.08, lw=0)
        bottom.axhline(140, color="#c62828", lw=0.8, ls="--")
        bottom.axhline(90, color="#ef6c00", lw=0.8, ls="--")
        bottom.legend(loc="upper left", frameon=False, fontsize=9)
        last = pressures[-1]
        day = last.taken_at.astimezone(tz)
        panel(bottom, f"{last.systolic:.0f}/{last.diastolic:.0f} mmHg on {day:%d %b}", "mmHg")
    else:
        panel(bottom, "No blood-pressure readings in this period", "mmHg")
    if weights or pressures:
        bottom.xaxis.set_major_locator(AutoDateLocator(minticks=4, maxticks=10))  # type: ignore[no-untyped-call]
        bottom.xaxis.set_major_formatter(DateFormatter("%d %b"))  # type: ignore[no-untyped-call]
        bottom.set_xlabel(f"date ({tz.key})")
    else:
        bottom.set_xticks([])
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=_DPI)
    return buffer.getvalue()
