"""OIP over gRPC with KServe's own client, unchanged: `kserve.InferenceGRPCClient` (grpc.aio,
KServe's generated stubs) against the standalone gateway's gRPC port, beside the
tritonclient.grpc tests in test_gateway_grpc.py (same fleet, table and gateway). The client
runs in a child process (tests/kserve_client_run.py says why)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from tests.gateway_helpers import MLP, SECRET, expected_scores, features
from tests.live import ROOT
from tests.test_gateway_grpc import EMPTY, fleet, gateway  # noqa: F401 (fixtures)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def report(gateway) -> dict:  # noqa: F811
    done = subprocess.run([sys.executable, "-m", "tests.kserve_client_run", gateway.target,
                           MLP, EMPTY], input=SECRET, capture_output=True, text=True,
                          timeout=120, cwd=ROOT, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def test_health_needs_no_key_and_readiness_takes_one_in_metadata(report):
    assert (report["live"], report["ready"]) == (True, True)
    assert (report["model_ready"], report["empty_ready"]) == (True, False)


@pytest.mark.parametrize("kind", ["raw", "typed"])
def test_the_kserve_client_infers_with_raw_or_typed_contents(report, kind):
    rows = features(5, seed=11)  # what the child sends
    answer = report[kind]
    assert (answer["id"], answer["model"], answer["output"]) == ("k-1", MLP, "scores")
    np.testing.assert_allclose(np.array(answer["scores"], dtype=np.float32),
                               expected_scores(rows), rtol=1e-5, atol=1e-6)


def test_errors_reach_the_kserve_client_as_grpc_status_codes(report):
    assert report["errors"] == {"no key": "UNAUTHENTICATED", "wrong key": "UNAUTHENTICATED",
                                "unknown model": "NOT_FOUND", "no replica": "UNAVAILABLE"}
