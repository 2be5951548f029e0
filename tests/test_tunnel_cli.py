"""The command-line side of tunnel mode: `swarm-worker --tunnel`, `swarm-gateway --tunnel-port`."""

from __future__ import annotations

import argparse
import logging
import random
from pathlib import Path

import pytest

from serving.agent import cli
from serving.balancing import BalancerConfig
from serving.gateway.deployments import Fleet
from serving.gateway.tunnel import add_tunnel_arguments, attach_tunnels
from serving.gateway.upstream import UpstreamPool
from tests.certs import self_signed_files


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


def _gateway_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    add_tunnel_arguments(parser)
    return parser.parse_args(["--tunnel-port", "0", *argv])


def _plain_ws_warnings(caplog: pytest.LogCaptureFixture, argv: list[str]) -> list[str]:
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="serving.gateway.tunnel"):
        server = attach_tunnels(_gateway_args(argv), Fleet(random.Random(1), BalancerConfig()),
                                UpstreamPool(), print)
    assert server is not None  # warned or not, it serves: TLS may end in a proxy in front
    return [r.getMessage() for r in caplog.records
            if r.name == "serving.gateway.tunnel" and r.levelno == logging.WARNING]


@pytest.mark.parametrize("host", ["0.0.0.0", "10.1.2.3", "gateway.example"])  # noqa: S104
def test_a_plain_ws_tunnel_port_on_the_network_warns_the_key_crosses_in_clear(
        caplog: pytest.LogCaptureFixture, host: str) -> None:
    warnings = _plain_ws_warnings(caplog, ["--host", host])
    assert len(warnings) == 1
    assert "plain ws://" in warnings[0] and "tunnel key" in warnings[0] \
        and "in clear" in warnings[0] and host in warnings[0]
    # A ws:// URL in front changes nothing: the key still crosses in clear.
    assert len(_plain_ws_warnings(
        caplog, ["--host", host, "--tunnel-url", f"ws://{host}:8443/tunnel"])) == 1


@pytest.mark.parametrize("host", ["127.0.0.1", "127.8.9.10", "::1", "localhost"])
def test_a_plain_ws_tunnel_port_on_loopback_does_not_warn(
        caplog: pytest.LogCaptureFixture, host: str) -> None:
    assert _plain_ws_warnings(caplog, ["--host", host]) == []


def test_a_tunnel_port_behind_tls_does_not_warn(caplog: pytest.LogCaptureFixture,
                                               tmp_path: Path) -> None:
    assert _plain_ws_warnings(caplog, ["--host", "0.0.0.0",  # noqa: S104
                                       "--tunnel-url", "wss://gw.example/tunnel"]) == []
    cert, key = self_signed_files(tmp_path / "gateway.crt", tmp_path / "gateway.key",
                                  "gateway", ["10.1.2.3"], ca=True)
    assert _plain_ws_warnings(caplog, ["--host", "10.1.2.3", "--tunnel-tls-cert-file",
                                       str(cert), "--tunnel-tls-key-file", str(key)]) == []
