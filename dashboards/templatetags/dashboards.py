"""Small formatting filters of the dashboards (units in the names of what they format)."""

from __future__ import annotations

import json
from typing import Any

from django import template
from django.urls import reverse
from django.utils.html import format_html

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



@register.filter
def plural(count: Any, noun: str) -> str:
    """Return the noun for a count: 1 replica, 2 replicas ("noun,plural" for irregulars)."""
    singular, _, many = noun.partition(",")
    return singular if count == 1 else (many or singular + "s")


@register.simple_tag(takes_context=True)
def nav_link(context: template.Context, url_name: str, text: str) -> str:
    """Return a navigation link, with aria-current="page" on the section being shown."""
    url = reverse(url_name)
    request = context.get("request")
    current = request is not None and request.path.startswith(url)
    if current:
        return format_html('<a href="{}" aria-current="page">{}</a>', url, text)
    return format_html('<a href="{}">{}</a>', url, text)


@register.filter
def as_text(value: Any) -> str:
    """Return a metadata value as people read it: text as is, anything else as JSON."""
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)
