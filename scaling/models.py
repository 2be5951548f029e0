"""Scaling policies per deployment, and the events that record every decision.

The policy row also holds what the pure policy (scaling/policy.py) needs between ticks:
its state as JSON and the last tick that claimed it, so a restarted or second scheduler
neither forgets the windows nor decides the same tick twice.
"""

from __future__ import annotations

from django.db import models

from scaling.policy_config import METRIC_IN_FLIGHT, METRIC_SEQUENCES
from serving.models import Deployment


class ScalingMetric(models.TextChoices):
    """What a policy counts as a replica's demand (scaling/policy_config.py)."""

    IN_FLIGHT = METRIC_IN_FLIGHT, "requests in flight"
    SEQUENCES = METRIC_SEQUENCES, "running + waiting sequences (generative models)"


class ScalingPolicy(models.Model):
    """How the auto-scaler sizes one deployment."""

    deployment = models.OneToOneField(Deployment, on_delete=models.CASCADE,
                                      related_name="scaling_policy")
    enabled = models.BooleanField(default=True)
    min_replicas = models.PositiveIntegerField(default=1)
    max_replicas = models.PositiveIntegerField(default=4)
    target_in_flight_per_replica = models.FloatField(default=8.0)
    stable_window_s = models.FloatField(default=60.0)
    panic_window_s = models.FloatField(default=6.0)
    panic_threshold = models.FloatField(default=2.0)
    scale_down_delay_s = models.FloatField(default=30.0)
    max_step_up = models.PositiveIntegerField(null=True, blank=True,
                                              help_text="empty: no limit")
    max_step_down = models.PositiveIntegerField(null=True, blank=True,
                                                help_text="empty: no limit")
    scale_to_zero = models.BooleanField(default=False)
    idle_before_zero_s = models.FloatField(default=300.0)
    metric = models.CharField(max_length=16, choices=ScalingMetric.choices,
                              default=ScalingMetric.IN_FLIGHT)
    target_sequences_per_replica = models.FloatField(
        default=12.0, help_text="with metric 'sequences': running + waiting per replica")
    # Kept by the scheduler, not edited by people.
    state = models.JSONField(default=dict, blank=True)
    last_tick = models.BigIntegerField(default=0, help_text="the last tick that claimed it")
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        verbose_name_plural = "scaling policies"

    def __str__(self) -> str:
        return f"{self.deployment.name}: {self.min_replicas}..{self.max_replicas}"


class ScalingEvent(models.Model):
    """One change of a deployment's replica count, with why and from what figures."""

    deployment = models.ForeignKey(Deployment, on_delete=models.CASCADE,
                                   related_name="scaling_events")
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)
    from_replicas = models.PositiveIntegerField()
    to_replicas = models.PositiveIntegerField()
    reason = models.TextField()
    panic = models.BooleanField(default=False)
    inputs = models.JSONField(default=dict, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [models.Index(fields=["deployment", "-created_at"])]

    def __str__(self) -> str:
        return f"{self.deployment.name}: {self.from_replicas} -> {self.to_replicas}"
