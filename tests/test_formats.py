"""Numbers, sizes and durations are written by the same rules on the server (formats.py, the Jinja
filters) and in the browser (static/js/util.js, run here in real Chromium on the same values)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from nanochat_studio import formats

UTIL_JS = Path(__file__).resolve().parent.parent / "static" / "js" / "util.js"

# Ties, both sides of each unit, negatives, zero, the huge and the missing.
NUMBERS = [0, 1, 0.5, 1.5, 2.5, -2.5, 0.125, 0.0625, 2.3456, 9.95, 9.949, 99.95, 999, 999.4, 999.5, 1000,
           1049.999, 12_345, 643_584, 999_949, 999_950, 1_000_000, 917_504, 2.5e9, 1.25e12, 7.3e14, -4321,
           59.5, 60, 89.6, 3599.5, 3600, 86_399, 86_400, 90_061, 1023, 1024, 10_239, 10_240, 1_048_576,
           5.5 * 1024**3, 3 * 1024**5, None, math.nan, math.inf, True, "7"]


def python_side(x):
    return {"count": formats.count(x), "size": formats.size(x), "duration": formats.duration(x),
            "decimal0": formats.decimal(x), "decimal1": formats.decimal(x, 1), "decimal3": formats.decimal(x, 3)}


JS_SIDE = """values => values.map(x => ({count: NCS.count(x), size: NCS.size(x), duration: NCS.duration(x),
    decimal0: NCS.decimal(x), decimal1: NCS.decimal(x, 1), decimal3: NCS.decimal(x, 3)}))"""


def test_the_server_writes_what_people_read():
    assert formats.count(643_584) == "643.6K" and formats.count(917_504) == "917.5K" and formats.count(950) == "950"
    assert formats.count(1.5e9) == "1.5B" and formats.count(None) == formats.MISSING
    assert formats.size(512) == "512 B" and formats.size(3.4 * 2**20) == "3.4 MiB" and formats.size(120 * 2**30) == "120 GiB"
    assert [formats.duration(s) for s in (42, 185, 3720, 183_600)] == ["42s", "3m 5s", "1h 2m", "2d 3h"]
    assert formats.decimal(2.3456, 3) == "2.346" and formats.decimal(0.0625, 3) == "0.063"  # ties away from zero
    assert formats.decimal(math.nan, 3) == formats.MISSING


@pytest.mark.browser
def test_the_browser_writes_every_value_exactly_as_the_server_does(browser):
    page = browser.new_page()
    try:
        page.set_content('<html><head><meta name="csrf-token" content="t"></head><body></body></html>')
        page.add_script_tag(content=UTIL_JS.read_text(encoding="utf-8"))
        # JSON has no NaN or infinity: those two cross as strings and are made numbers again in the page.
        sent = ["NaN" if isinstance(x, float) and math.isnan(x) else "Infinity" if x == math.inf else x
                for x in NUMBERS]
        js = page.evaluate("values => (" + JS_SIDE + ")(values.map(v => v === 'NaN' ? NaN : "
                           "v === 'Infinity' ? Infinity : v))", sent)
    finally:
        page.close()
    for x, got in zip(NUMBERS, js):
        assert got == python_side(x), x


def test_the_pages_use_the_same_filters(app):
    with app.app_context():
        render = app.jinja_env.from_string(
            "{{ n|fmt_count }} {{ b|fmt_size }} {{ s|fmt_duration }} {{ x|fmt_decimal(3) }} {{ none|fmt_decimal(3) }}")
        assert render.render(n=643_584, b=5 * 2**20, s=185, x=2.3456, none=None) == "643.6K 5.0 MiB 3m 5s 2.346 –"
