"""The command-line side of tunnel mode: `swarm-worker --tunnel`, `swarm-gateway --tunnel-port`."""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import pytest

from serving.agent import cli
from serving.balancing import BalancerConfig
from serving.gateway.deployments import Fleet
from serving.gateway.tunnel import add_tunnel_arguments, attach_tunnels
from serving.gateway.upstream import UpstreamPool


def _config(argv: list[str]) -> object:
    args = cli.build_parser().parse_args(["--portal", "http://p.example", *argv])
    return cli.tunnel_mode(cli.config_from_args(args, None), args)


def test_tunnel_mode_asked_puts_replicas_on_loopback(tmp_path: Path) -> None:
    config = _config(["--tunnel", "--address", "10.0.0.7", "--tls", "on",
                      "--cache-dir", str(tmp_path)])
    assert config.tunnel and config.bind_host == "127.0.0.1"  # type: ignore[attr-defined]
    kept = _config(["--tunnel", "--address", "10.0.0.7", "--bind-host", "10.0.0.7",
                    "--tls", "on", "--cache-dir", str(tmp_path)])
    assert kept.bind_host == "10.0.0.7"  # type: ignore[attr-defined]


def test_tunnel_mode_from_the_environment(monkeypatch: pytest.MonkeyPatch,
                                          tmp_path: Path) -> None:
    monkeypatch.setenv(cli.TUNNEL_ENV, "1")
    assert _config(["--cache-dir", str(tmp_path)]).tunnel  # type: ignore[attr-defined]
    monkeypatch.setenv(cli.TUNNEL_ENV, "0")
    assert not _config(["--cache-dir", str(tmp_path)]).tunnel  # type: ignore[attr-defined]


def test_a_gateway_accepts_tunnels_only_when_asked() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    add_tunnel_arguments(parser)

    assert attach_tunnels(parser.parse_args([]), Fleet(random.Random(1), BalancerConfig()),
                          UpstreamPool(), print) is None
    fleet = Fleet(random.Random(1), BalancerConfig())
    server = attach_tunnels(parser.parse_args(["--tunnel-port", "0"]), fleet, UpstreamPool(),
                            print)
    assert server is not None and fleet.reroute == server.registry.reroute
