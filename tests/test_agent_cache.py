"""The artifact cache against a real local HTTP server playing the portal."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from serving.agent.cache import ArtifactCache, ArtifactError, file_sha256
from serving.agent.client import PortalClient
from tests.agent_fakes import FakePortal, sha256_of

ARTIFACT = bytes(range(256)) * 64  # 16 KiB: several chunks on the wire


@pytest.fixture
def portal() -> Iterator[FakePortal]:
    with FakePortal() as running:
        running.state.secrets["swn_1_test"] = 1
        yield running


@pytest.fixture
def cache(portal: FakePortal, tmp_path: Path) -> Iterator[ArtifactCache]:
    client = PortalClient(portal.url, timeout_s=5.0, node_secret="swn_1_test")
    yield ArtifactCache(tmp_path / "cache", client)
    client.close()


def leftovers(cache: ArtifactCache) -> list[str]:
    return sorted(path.name for path in cache.artifacts_dir.iterdir())


def test_download_lands_verified_under_its_sha256(portal: FakePortal,
                                                  cache: ArtifactCache) -> None:
    sha256 = portal.add_artifact(ARTIFACT)

    path = cache.ensure(sha256, len(ARTIFACT))

    assert path == cache.artifacts_dir / sha256
    assert path.read_bytes() == ARTIFACT
    assert cache.cached_sha256s() == [sha256]
    assert leftovers(cache) == [sha256]  # no temp file left behind


def test_a_cached_artifact_is_verified_and_reused_without_downloading(
        portal: FakePortal, cache: ArtifactCache) -> None:
    sha256 = portal.add_artifact(ARTIFACT)
    cache.ensure(sha256)

    cache.ensure(sha256)

    assert portal.state.downloads == [sha256]


def test_a_wrong_sha256_header_is_refused_and_leaves_nothing(portal: FakePortal,
                                                             cache: ArtifactCache) -> None:
    sha256 = portal.add_artifact(ARTIFACT)
    portal.state.header_override[sha256] = "0" * 64

    with pytest.raises(ArtifactError, match="announced sha256 0000"):
        cache.ensure(sha256)

    assert leftovers(cache) == []


def test_a_missing_sha256_header_is_refused(portal: FakePortal, cache: ArtifactCache) -> None:
    sha256 = portal.add_artifact(ARTIFACT)
    portal.state.header_override[sha256] = None

    with pytest.raises(ArtifactError, match="lacks the X-Artifact-SHA256 header"):
        cache.ensure(sha256)

    assert leftovers(cache) == []


def test_content_that_does_not_hash_to_the_sha256_is_refused(portal: FakePortal,
                                                            cache: ArtifactCache) -> None:
    sha256 = sha256_of(ARTIFACT)
    portal.state.artifacts[sha256] = ARTIFACT[:-1] + b"!"  # header right, bytes wrong

    with pytest.raises(ArtifactError, match=f"its bytes hash to {sha256_of(ARTIFACT[:-1] + b'!')}"):
        cache.ensure(sha256)

    assert leftovers(cache) == []


def test_an_unknown_artifact_fails_with_the_portal_error(cache: ArtifactCache) -> None:
    with pytest.raises(ArtifactError, match="HTTP 404: no such artifact"):
        cache.ensure("a" * 64)


def test_a_corrupted_cached_file_is_detected_deleted_and_downloaded_again(
        portal: FakePortal, cache: ArtifactCache) -> None:
    sha256 = portal.add_artifact(ARTIFACT)
    path = cache.ensure(sha256)
    flip_a_byte(path)
    assert file_sha256(path) != sha256

    again = cache.ensure(sha256)

    assert again.read_bytes() == ARTIFACT
    assert portal.state.downloads == [sha256, sha256]


def test_a_corrupted_file_that_downloads_wrong_again_is_never_kept(
        portal: FakePortal, cache: ArtifactCache) -> None:
    sha256 = portal.add_artifact(ARTIFACT)
    path = cache.ensure(sha256)
    flip_a_byte(path)
    portal.state.artifacts[sha256] = b"not the model"

    with pytest.raises(ArtifactError, match="wrong content"):
        cache.ensure(sha256)

    assert not path.exists()
    assert portal.state.downloads == [sha256, sha256]  # re-downloaded exactly once


def test_leftover_partial_downloads_are_removed(cache: ArtifactCache) -> None:
    (cache.artifacts_dir / f".{'b' * 64}.x1y2.part").write_bytes(b"half")

    assert cache.remove_partial_downloads() == 1
    assert leftovers(cache) == []


def test_concurrent_requests_for_one_artifact_download_it_once(portal: FakePortal,
                                                               cache: ArtifactCache) -> None:
    sha256 = portal.add_artifact(ARTIFACT * 64)
    paths: list[Path] = []
    threads = [threading.Thread(target=lambda: paths.append(cache.ensure(sha256)))
               for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)

    assert len(paths) == 4 and len(set(paths)) == 1
    assert portal.state.downloads == [sha256]


def test_a_sha256_that_is_not_hex_is_refused_before_any_request(cache: ArtifactCache) -> None:
    with pytest.raises(ArtifactError, match="not a sha256"):
        cache.ensure("../../etc/passwd")


def flip_a_byte(path: Path) -> None:
    path.chmod(0o644)  # the cache keeps artifacts read-only
    data = bytearray(path.read_bytes())
    data[100] ^= 0xFF
    path.write_bytes(bytes(data))
