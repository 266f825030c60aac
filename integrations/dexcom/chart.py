"""A PNG chart of glucose readings for the bot and the CLI.

matplotlib is imported inside :func:`render_chart` (importing this module costs nothing) and
drawn with the Agg canvas directly: no pyplot, no global backend switch, safe in a daemon.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

from ..durations import age
from .client import MGDL_PER_MMOL, Reading, Unit

__all__ = ["HIGH_MGDL", "LOW_MGDL", "render_chart"]

LOW_MGDL = 70
HIGH_MGDL = 180
_DPI = 100


def render_chart(
    readings: Sequence[Reading],
    *,
    tz: ZoneInfo,
    unit: Unit = "mg/dL",
    width_px: int = 1000,
    height_px: int = 500,
    now: datetime | None = None,
) -> bytes:
    """Readings as a PNG of ``width_px`` x ``height_px``.

    The curve, the 70-180 mg/dL target band shaded, lows (<70) and highs (>180) marked, the
    time axis in ``tz``, and the latest value with its trend arrow in the title. With no
    readings the chart says so. ``now`` (aware) only adds the age of the latest reading.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.dates import AutoDateLocator, DateFormatter, date2num
    from matplotlib.figure import Figure

    if width_px < 100 or height_px < 100:
        raise ValueError("a chart needs at least 100 x 100 pixels")
    scale = 1.0 if unit == "mg/dL" else 1.0 / MGDL_PER_MMOL

    def conv(mgdl: float) -> float:
        return mgdl * scale

    fig = Figure(figsize=(width_px / _DPI, height_px / _DPI), dpi=_DPI)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.axhspan(conv(LOW_MGDL), conv(HIGH_MGDL), color="#2e7d32", alpha=0.12, lw=0)
    ax.axhline(conv(LOW_MGDL), color="#c62828", lw=0.8, ls="--")
    ax.axhline(conv(HIGH_MGDL), color="#ef6c00", lw=0.8, ls="--")
    ax.set_ylabel(unit)
    ax.grid(True, axis="both", color="#dddddd", lw=0.6)
    ax.set_axisbelow(True)

    points = sorted((r for r in readings if r.value_mgdl is not None), key=lambda r: r.system_time)
    top = HIGH_MGDL + 40
    if points:
        local = [r.system_time.astimezone(tz).replace(tzinfo=None) for r in points]
        times = [float(date2num(t)) for t in local]  # type: ignore[no-untyped-call]
        values = [conv(r.value_mgdl or 0) for r in points]
        ax.plot(times, values, color="#1565c0", lw=1.8, zorder=3)
        marked = False
        for label, color, test in (("low", "#c62828", _low), ("high", "#ef6c00", _high)):
            xs = [t for t, r in zip(times, points, strict=True) if test(r)]
            ys = [v for v, r in zip(values, points, strict=True) if test(r)]
            if xs:
                ax.scatter(xs, ys, s=22, color=color, zorder=4, label=f"{label} ({len(xs)})")
                marked = True
        if marked:
            ax.legend(loc="upper left", frameon=False, fontsize=9)
        locator = AutoDateLocator(minticks=4, maxticks=10)  # type: ignore[no-untyped-call]
        ax.xaxis.set_major_locator(locator)
        span = points[-1].system_time - points[0].system_time
        fmt = "%H:%M" if span.days < 1 else "%d %b %H:%M"
        ax.xaxis.set_major_formatter(DateFormatter(fmt))  # type: ignore[no-untyped-call]
        if len(times) > 1:
            ax.set_xlim(times[0], times[-1])
        top = max(top, max(r.value_mgdl or 0 for r in points) + 20)
        latest = points[-1]
        when = latest.system_time.astimezone(tz).strftime("%d %b %H:%M")
        title = f"{latest.value_in(unit)} {unit} {latest.arrow} at {when}"
        if now is not None:
            delta = now - latest.system_time
            title += f" ({age(delta)})" if timedelta(0) <= delta < timedelta(hours=10) else ""
        ax.set_title(title, fontsize=15, loc="left")
        ax.set_xlabel(f"time ({tz.key})")
    else:
        ax.set_title("No glucose readings in this period", fontsize=15, loc="left")
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
        ax.set_xticks([])
    ax.set_ylim(conv(40), conv(top))
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=_DPI)
    return buffer.getvalue()


def _low(reading: Reading) -> bool:
    return reading.value_mgdl is not None and reading.value_mgdl < LOW_MGDL


def _high(reading: Reading) -> bool:
    return reading.value_mgdl is not None and reading.value_mgdl > HIGH_MGDL
