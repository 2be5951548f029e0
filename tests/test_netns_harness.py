"""tests/netns.py itself: links carry traffic, cut and restore work, everything goes away."""

from __future__ import annotations

import subprocess
import sys

import httpx
import pytest

from tests.netns import PREFIX, NetnsLab, remove_leftovers, require_netns
from tests.waiting import wait_until


def _ip_lines(*args: str) -> str:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=True).stdout


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2.0).status_code == 200
    except httpx.HTTPError:
        return False


def test_a_namespace_serves_the_host_until_its_link_is_cut_and_again_after() -> None:
    require_netns()
    with NetnsLab() as lab:
        node = lab.add_host("gpu1")
        other = lab.add_host("gpu2", default_route=False)
        assert node.address != other.address and node.host_address != other.host_address
        server = node.popen([sys.executable, "-m", "http.server", "--bind", node.address,
                             "8000"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        url = f"http://{node.address}:8000/"
        wait_until(lambda: _answers(url), 30, "the server inside the namespace")
        assert server.pid in node.pids()
        # Without a default route the other namespace reaches only its own link.
        unreachable = other.run(["ip", "route", "get", node.address], check=False)
        assert unreachable.returncode != 0
        node.cut()
        assert not _answers(url)
        node.restore()
        wait_until(lambda: _answers(url), 30, "the server after the link came back")
        names = (node.name, other.name)
    listed = _ip_lines("netns", "list")
    assert not any(name in listed for name in names)
    assert server.poll() is not None
    assert f"{PREFIX}{lab.tag}" not in _ip_lines("-o", "link", "show")


def test_leftovers_of_a_crashed_run_are_removed() -> None:
    require_netns()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    name = f"{PREFIX}-{dead.pid}-dead-gpu"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        assert name in remove_leftovers()
        assert name not in _ip_lines("netns", "list")
    finally:
        subprocess.run(["ip", "netns", "delete", name], capture_output=True)


def test_the_harness_explains_why_it_skips_when_not_root(monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    from tests import netns
    monkeypatch.setattr(netns.os, "geteuid", lambda: 1000)
    with pytest.raises(pytest.skip.Exception, match="need root"):
        require_netns()
