"""Forms of the dashboards' controls: they parse input; the services decide what is allowed."""

from __future__ import annotations

from typing import Any

from django import forms

from scaling.models import ScalingMetric
from serving.models import MAX_TOKENS_PER_MINUTE
from serving.services.deployments import MAX_REPLICAS


class ScaleForm(forms.Form):
    replicas = forms.IntegerField(min_value=0, max_value=MAX_REPLICAS)
    pause_policy = forms.BooleanField(required=False)


class RollbackForm(forms.Form):
    revision = forms.IntegerField(min_value=1)


class TrafficForm(forms.Form):
    """Canary weights as `version=weight` pairs, e.g. `1=90, 2=10`; empty: all to the primary."""

    traffic = forms.CharField(required=False, max_length=500)

    def clean_traffic(self) -> dict[str, float]:
        text = self.cleaned_data["traffic"].strip()
        split: dict[str, float] = {}
        for part in filter(None, (p.strip() for p in text.replace(";", ",").split(","))):
            number, sep, weight = part.partition("=")
            try:
                if not sep:
                    raise ValueError
                split[str(int(number))] = float(weight)
            except ValueError:
                raise forms.ValidationError(
                    f"{part!r} is not version=weight (for example 1=90, 2=10)") from None
        return split


class PolicyForm(forms.Form):
    """The auto-scaler's settings for one deployment (scaling.models.ScalingPolicy)."""

    enabled = forms.BooleanField(required=False)
    min_replicas = forms.IntegerField(min_value=0)
    max_replicas = forms.IntegerField(min_value=0)
    target_in_flight_per_replica = forms.FloatField(min_value=0.001)
    stable_window_s = forms.FloatField(min_value=0.1)
    panic_window_s = forms.FloatField(min_value=0.1)
    scale_down_delay_s = forms.FloatField(min_value=0)
    max_step_up = forms.IntegerField(min_value=1, required=False)
    max_step_down = forms.IntegerField(min_value=1, required=False)
    scale_to_zero = forms.BooleanField(required=False)
    idle_before_zero_s = forms.FloatField(min_value=0)
    # Optional: a form from before they existed changes neither (see changes()).
    metric = forms.ChoiceField(choices=ScalingMetric.choices, required=False,
                               help_text="what a replica's demand counts")
    target_sequences_per_replica = forms.FloatField(
        min_value=0.001, required=False,
        help_text="with running + waiting sequences: the target per replica")

    def changes(self) -> dict[str, Any]:
        """Return the settings to save (after is_valid()): the metric's, where given."""
        return {name: value for name, value in self.cleaned_data.items()
                if value not in (None, "") or name not in ("metric",
                                                           "target_sequences_per_replica")}

    @classmethod
    def for_policy(cls, policy: Any) -> PolicyForm:
        if policy is None:
            return cls(initial={"enabled": True, "min_replicas": 1, "max_replicas": 4,
                                "target_in_flight_per_replica": 8.0, "stable_window_s": 60.0,
                                "panic_window_s": 6.0, "scale_down_delay_s": 30.0,
                                "idle_before_zero_s": 300.0, "metric": ScalingMetric.IN_FLIGHT,
                                "target_sequences_per_replica": 12.0})
        return cls(initial={name: getattr(policy, name) for name in cls.base_fields})


class ApiKeyForm(forms.Form):
    name = forms.CharField(max_length=100)
    deployments = forms.CharField(required=False, max_length=2000,
                                  help_text="comma-separated names; empty: every deployment")
    rate_limit_rps = forms.FloatField(required=False, min_value=0.001)
    burst = forms.IntegerField(required=False, min_value=0, initial=0)
    tokens_per_minute = forms.IntegerField(required=False, min_value=1,
                                           max_value=MAX_TOKENS_PER_MINUTE)
    expires_in_days = forms.IntegerField(required=False, min_value=1, max_value=3650)

    def deployment_names(self) -> list[str] | None:
        names = [n.strip() for n in self.cleaned_data["deployments"].split(",") if n.strip()]
        return names or None


class JoinTokenForm(forms.Form):
    name = forms.CharField(max_length=100)
    uses = forms.IntegerField(required=False, min_value=1, help_text="empty: unlimited")
    expires_in_hours = forms.IntegerField(required=False, min_value=1, max_value=24 * 365)


class DeployForm(forms.Form):
    """Deploy one version of a model from its registry page (the other settings: defaults)."""

    model = forms.SlugField(max_length=100)
    version = forms.IntegerField(min_value=1)
    name = forms.SlugField(max_length=100, help_text="endpoint name under /v2")
    replicas = forms.IntegerField(min_value=0, max_value=MAX_REPLICAS, initial=1)
    memory_gib = forms.FloatField(min_value=0.001, max_value=4096, initial=0.5,
                                  help_text="memory one replica needs on its device")
