"""Small formatting filters of the dashboards (units in the names of what they format)."""

from __future__ import annotations

from typing import Any

from django import template

register = template.Library()
NO_FIGURE = "\u2013"  # an en dash


@register.filter
def pct(value: Any) -> str:
    """Format a percentage, or an en dash when there is no figure."""
    return NO_FIGURE if value is None else f"{float(value):.0f}%"


@register.filter
def gib(value_bytes: Any) -> str:
    """Format bytes as GiB with one decimal."""
    return NO_FIGURE if value_bytes is None else f"{int(value_bytes) / 1024**3:.1f}"

