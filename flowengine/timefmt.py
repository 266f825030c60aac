"""The one way a duration is written, for the CLI and the bot alike. [pure]

``45s``, ``9m 58s``, ``1h 59m``, ``3d 4h``: the two largest units, the second left out when
it is zero (``2h``). Seconds are rounded to the nearest (3599.6 s is ``1h``: the moment it
took to compute the figure is not worth showing), the units below the second one dropped.
A format, not a sentence: the words around it ("in", "ago", "valid for") belong to the
edges that print it.
"""

from __future__ import annotations

__all__ = ["format_duration"]

_UNITS = ((86_400, "d"), (3_600, "h"), (60, "m"), (1, "s"))


def format_duration(seconds: float) -> str:
    """``seconds`` (its absolute value) as ``"1h 59m"``; ``"0s"`` under half a second."""
    total = int(abs(seconds) + 0.5)
    for i, (size, unit) in enumerate(_UNITS):
        if total >= size or size == 1:
            first, rest = divmod(total, size)
            text = f"{first}{unit}"
            if size > 1:
                small, small_unit = _UNITS[i + 1]
                second = rest // small
                if second:
                    text += f" {second}{small_unit}"
            return text
    raise AssertionError("unreachable")  # pragma: no cover
