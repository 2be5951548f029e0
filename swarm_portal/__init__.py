"""Swarm Portal: a self-hosted control plane for GPU inference."""

from __future__ import annotations

# Loaded with Django so that @shared_task binds to our Celery app.
from swarm_portal.celery import app as celery_app

__all__ = ["celery_app"]
