"""Scaling policies and events over the REST API."""

from __future__ import annotations

from rest_framework import serializers

from scaling.models import ScalingEvent, ScalingPolicy
from swarm_portal.api import StrictModelSerializer


class ScalingPolicySerializer(StrictModelSerializer):
    deployment = serializers.SlugRelatedField(slug_field="name", read_only=True)

    class Meta:
        model = ScalingPolicy
        fields = ["deployment", "enabled", "min_replicas", "max_replicas",
                  "target_in_flight_per_replica", "stable_window_s", "panic_window_s",
                  "panic_threshold", "scale_down_delay_s", "max_step_up", "max_step_down",
                  "scale_to_zero", "idle_before_zero_s", "metric",
                  "target_sequences_per_replica", "updated_at"]
        read_only_fields = ["deployment", "updated_at"]
        extra_kwargs = {
            "min_replicas": {"max_value": 256},
            "max_replicas": {"min_value": 1, "max_value": 256},
            "target_in_flight_per_replica": {"min_value": 0.001, "max_value": 100_000},
            "stable_window_s": {"min_value": 1, "max_value": 86_400},
            "panic_window_s": {"min_value": 0.1, "max_value": 86_400},
            "panic_threshold": {"min_value": 1, "max_value": 1_000},
            "scale_down_delay_s": {"min_value": 0, "max_value": 86_400},
            "max_step_up": {"min_value": 1, "max_value": 256},
            "max_step_down": {"min_value": 1, "max_value": 256},
            "idle_before_zero_s": {"min_value": 0, "max_value": 7 * 86_400},
            "metric": {"help_text": "what a replica's demand counts: requests in flight, "
                                    "or (generative models) running + waiting sequences"},
            "target_sequences_per_replica": {"min_value": 0.001, "max_value": 100_000},
        }


class ScalingEventSerializer(serializers.ModelSerializer):
    deployment = serializers.SlugRelatedField(slug_field="name", read_only=True)

    class Meta:
        model = ScalingEvent
        fields = ["id", "deployment", "created_at", "from_replicas", "to_replicas", "reason",
                  "panic", "inputs"]
        read_only_fields = fields
