"""swarm_protocol.addresses: the one loopback check the portal, gateway and worker share."""

import pytest

from swarm_protocol.addresses import is_in_process_host, is_loopback_host


@pytest.mark.parametrize(("host", "expected"), [
    ("127.0.0.1", True), ("127.8.9.10", True), ("::1", True),
    ("localhost", True), ("LocalHost", True), ("localhost.", False),
    ("10.0.0.1", False), ("0.0.0.0", False), ("::", False), ("", False),  # noqa: S104
    ("localhost.example.com", False), ("gpu-1.example.com", False), ("::ffff:10.0.0.1", False),
])
def test_loopback_hosts_are_this_machine_only(host: str, expected: bool) -> None:
    assert is_loopback_host(host) is expected


@pytest.mark.parametrize(("host", "expected"), [
    ("node-5.tunnel.invalid", True), ("NODE-5.TUNNEL.INVALID.", True), ("invalid", False),
    ("gpu.invalid.example.com", False), ("127.0.0.1", False),
])
def test_in_process_hosts_are_names_under_invalid(host: str, expected: bool) -> None:
    assert is_in_process_host(host) is expected
