"""The one parser for numbers that arrive on the wire (paths, headers, queries): pure.

`int()` takes far more than HTTP means by a number: Unicode digits (`int('²')` raises
although `'²'.isdigit()` is true; `int('٣')` is 3), surrounding spaces, underscores, signs,
and strings long enough to hit Python's int-string limit (ValueError past 4,300 digits) or
to cost real CPU below it. Everything a client sends goes through `parse_count` instead:
plain ASCII digits, a bounded length, a bounded value, None when it is anything else, so
each caller answers its own 4xx.
"""

from __future__ import annotations

# 2**63 - 1 has 19 digits: nothing we count (bytes, versions) needs more.
MAX_DIGITS = 19
MAX_COUNT = 2**63 - 1


def parse_count(value: bytes | str | None, max_value: int = MAX_COUNT) -> int | None:
    """Return a non-negative integer of ASCII digits no larger than `max_value`, else None."""
    if value is None or not 0 < len(value) <= MAX_DIGITS:
        return None
    if isinstance(value, str):
        if not (value.isascii() and value.isdigit()):
            return None
    elif not value.isdigit():  # bytes.isdigit() is ASCII-only
        return None
    number = int(value)
    return number if number <= max_value else None
