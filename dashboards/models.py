"""The outbox: live messages raised where the in-memory channel layer cannot reach the pages.

Only the embedded default writes here (no Redis): a Celery task publishes a message, a row
lands here, and the relay in the portal process sends it to its consumers (dashboards.relay).
Rows live a minute at most.
"""

from __future__ import annotations

from django.db import models


class LiveEvent(models.Model):
    """One live message for one page group, waiting for the portal's relay."""

    group = models.CharField(max_length=100)
    payload = models.JSONField()
    created = models.DateTimeField(db_index=True)

    class Meta:
        ordering = ["id"]

    def __str__(self) -> str:
        return f"{self.group} {self.payload.get('type', '?')} #{self.pk}"
