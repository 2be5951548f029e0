"""`python manage.py simulate`: replay a load trace through the auto-scaler's own code."""

from __future__ import annotations

import argparse

from django.core.management.base import BaseCommand, CommandError

from scaling import simulator


class Command(BaseCommand):
    help = ("Replay a trace (CSV of timestamp_s,requests_per_s, or a built-in pattern: steady, "
            "burst, diurnal) through the scaling policy and placement over a modelled fleet; "
            "report cost, late requests and scale events; plot them with --plot.")

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        simulator.add_arguments(parser)

    def handle(self, *args: str, **options) -> None:
        try:
            simulator.run_cli(argparse.Namespace(**options))
        except (ValueError, OSError) as exc:
            raise CommandError(str(exc)) from None
