"""How numbers, sizes and durations are written for people, on pages and in messages.

static/js/util.js writes the same things with the same rules in the browser (the live pages update what
the server rendered first); tests/test_formats.py runs both on the same values and compares. Rounding
is JavaScript's ``toFixed`` on both sides: the exact binary value, a tie rounded away from zero.
"""

from __future__ import annotations

import math
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

from flask import Flask

MISSING = "–"  # what an unknown value shows
_COUNT_UNITS = (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3))
_SIZE_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


def _number(x: Any) -> float | None:
    if x is None or isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
        return None
    return float(x)


def _fixed(x: float, digits: int) -> str:
    """``x.toFixed(digits)`` as JavaScript writes it."""
    return str(Decimal(x).quantize(Decimal(1).scaleb(-digits), rounding=ROUND_HALF_UP))


def decimal(x: Any, digits: int = 0) -> str:
    """``x`` with ``digits`` decimals (a loss: ``decimal(2.3456, 3)`` is "2.346")."""
    x = _number(x)
    return MISSING if x is None else _fixed(x, digits)


def count(n: Any) -> str:
    """A count of parameters, tokens or tokens per second: "643.6K", "1.2B", "950"."""
    n = _number(n)
    if n is None:
        return MISSING
    for unit, div in _COUNT_UNITS:
        if abs(n) >= div:
            return _fixed(n / div, 1) + unit
    return _fixed(n, 0)


def size(n: Any) -> str:
    """A size in bytes with binary units: "512 B", "3.4 MiB", "120 GiB"."""
    n = _number(n)
    if n is None:
        return MISSING
    i = 0
    while abs(n) >= 1024 and i < len(_SIZE_UNITS) - 1:
        n /= 1024
        i += 1
    return _fixed(n, 0 if i == 0 or abs(n) >= 10 else 1) + " " + _SIZE_UNITS[i]


def duration(seconds: Any) -> str:
    """A duration to the precision that matters at its length: "42s", "3m 5s", "1h 2m", "2d 3h"."""
    s = _number(seconds)
    if s is None:
        return MISSING
    s = max(0, int(_fixed(s, 0)))
    days, hours, minutes = s // 86400, s % 86400 // 3600, s % 3600 // 60
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    if minutes:
        return f"{minutes}m {s % 60}s"
    return f"{s}s"


def init_app(app: Flask) -> None:
    """The formats as Jinja filters, prefixed (Jinja has a ``count`` of its own): ``{{ m.params|fmt_count }}``,
    ``{{ loss|fmt_decimal(3) }}``, ``{{ n|fmt_size }}``, ``{{ s|fmt_duration }}``."""
    app.jinja_env.filters.update(fmt_count=count, fmt_decimal=decimal, fmt_size=size, fmt_duration=duration)
