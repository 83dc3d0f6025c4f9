"""Durations as people write them in config files: ``500ms``, ``90s``, ``15m``, ``2h``, ``3d``.

Grammar: one or more ``<number><unit>`` parts with no spaces between them, units in decreasing
order and each at most once (``1h30m``, ``1d12h``, ``2m30s500ms``). A number is decimal digits
with an optional fraction (``1.5h``). Units: ``d`` (86 400 s), ``h``, ``m``, ``s``, ``ms``.
Leading and trailing whitespace is ignored. Anything else — a bare number, a sign, ``1h1h``,
``30m1h``, ``1 h`` — is rejected with a :class:`ValueError` whose message says what is accepted.

:func:`format_duration` writes the shortest canonical form, so
``parse_duration(format_duration(s)) == s`` for every whole number of milliseconds ``s >= 0``.

Pure functions, no I/O; the engine may import this module.
"""

from __future__ import annotations

import math
import re

__all__ = ["DURATION_HELP", "UNITS", "format_duration", "parse_duration"]

#: Seconds per unit, largest first (the order parts must be written in).
UNITS: dict[str, float] = {"d": 86_400.0, "h": 3_600.0, "m": 60.0, "s": 1.0, "ms": 0.001}

DURATION_HELP = 'write a number and a unit: "500ms", "90s", "15m", "2h", "3d", or combined "1h30m"'

# "ms" must be tried before "m" so that "500ms" is not read as 500 minutes and a stray "s".
_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|d|h|m|s)")
_ORDER = {unit: rank for rank, unit in enumerate(UNITS)}


def parse_duration(text: str) -> float:
    """Seconds in ``text`` (see the module docstring for the grammar).

    Raises :class:`ValueError` with a message a person can act on when ``text`` is not a
    duration. Zero (``"0s"``) is a valid duration; callers that need a positive one check.
    """
    if not isinstance(text, str):
        raise ValueError(f"expected a string, got {type(text).__name__}; {DURATION_HELP}")
    s = text.strip()
    if not s:
        raise ValueError(f"empty duration; {DURATION_HELP}")
    total = 0.0
    pos = 0
    last_rank = -1
    while pos < len(s):
        m = _PART.match(s, pos)
        if m is None:
            raise ValueError(f"{text!r} is not a duration; {DURATION_HELP}")
        number, unit = m.group(1), m.group(2)
        rank = _ORDER[unit]
        if rank <= last_rank:
            raise ValueError(
                f"{text!r} is not a duration: units must each appear once, largest first "
                f'(d, h, m, s, ms), as in "1h30m"'
            )
        last_rank = rank
        total += float(number) * UNITS[unit]
        pos = m.end()
    if not math.isfinite(total):
        raise ValueError(f"{text!r} is too large")
    # Fractions of the smaller units add float noise ("0.1s" + ...); keep microsecond precision.
    return round(total, 6)


def format_duration(seconds: float) -> str:
    """The shortest canonical text for ``seconds``, e.g. ``5400 -> "1h30m"``, ``0.25 -> "250ms"``.

    Rounds to whole milliseconds. Raises :class:`ValueError` for negative or non-finite values.
    """
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"cannot format {seconds!r} as a duration")
    ms = round(seconds * 1000)
    if ms == 0:
        return "0s"
    parts: list[str] = []
    for unit, size in (("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1000)):
        n, ms = divmod(ms, size)
        if n:
            parts.append(f"{n}{unit}")
    if ms:
        parts.append(f"{ms}ms")
    return "".join(parts)
