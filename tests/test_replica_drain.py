"""Start-up refusals and drain: a signal lets in-flight and queued requests finish."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import torch

from tests.replica_models import (
    KEY,
    MLP_SIGNATURE,
    REPO_ROOT,
    SLOW_SIGNATURE,
    build_slow_model,
    free_port,
    replica_command,
    save_torchscript,
    start_replica,
)
from tests.waiting import wait_until

pytestmark = pytest.mark.slow
SLOW_ITERATIONS = 1200  # about 0.1-0.2 s per request on one core here
IN_FLIGHT = 4
DEADLINE_S = 30.0


def slow_request(value: float) -> dict:
    return {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [value] * 4}]}


def expected_outputs(values: list[float]) -> np.ndarray:
    rows = torch.tensor([[value] * 4 for value in values])
    with torch.inference_mode():
        return build_slow_model(SLOW_ITERATIONS)(rows).numpy()


def stats_in_flight(client: httpx.Client) -> int:
    return int(client.get("/stats").json()["in_flight"])


def refused_or_503(client: httpx.Client) -> str:
    try:
        response = client.post("/v2/models/slow/infer", json=slow_request(0.0))
    except httpx.TransportError:
        return "refused"
    assert response.status_code == 503, response.text
    assert response.json() == {"error": "replica is draining"}
    assert response.headers["retry-after"]
    return "503"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_drains_in_flight_requests_refuses_new_ones_and_exits_0(tmp_path, sig):
    artifact = save_torchscript(build_slow_model(SLOW_ITERATIONS), tmp_path / "slow.pt")
    replica = start_replica(tmp_path, artifact, "torchscript", SLOW_SIGNATURE, name="slow")
    values = [float(v) for v in range(1, IN_FLIGHT + 1)]
    try:
        with ThreadPoolExecutor(IN_FLIGHT) as pool, replica.client() as client:
            def post(value: float) -> httpx.Response:
                with replica.client() as own:
                    return own.post("/v2/models/slow/infer", json=slow_request(value))

            futures = [pool.submit(post, value) for value in values]
            wait_until(lambda: stats_in_flight(client) == IN_FLIGHT, DEADLINE_S,
                       "requests in flight")
            replica.process.send_signal(sig)
            wait_until(lambda: client.get("/v2/health/ready").status_code == 503, DEADLINE_S,
                       "ready to turn 503")
            outcome = refused_or_503(client)
            responses = [future.result(timeout=DEADLINE_S) for future in futures]
        assert replica.process.wait(timeout=DEADLINE_S) == 0, replica.stderr()
    finally:
        replica.stop()
    assert outcome in {"503", "refused"}
    expected = expected_outputs(values)
    for index, response in enumerate(responses):
        assert response.status_code == 200, response.text
        output = response.json()["outputs"][0]
        np.testing.assert_allclose(np.array(output["data"]).reshape(1, 4),
                                   expected[index:index + 1], rtol=1e-4, atol=1e-5)
    with pytest.raises(httpx.TransportError):
        httpx.get(replica.url + "/v2/health/live", timeout=2)


def run_replica_cli(tmp_path, env_key: str | None,
                    signature: object) -> subprocess.CompletedProcess:
    artifact = tmp_path / "model.pt"
    artifact.write_bytes(b"not read before the arguments are checked")
    signature_path = tmp_path / "signature.json"
    signature_path.write_text(json.dumps(signature))
    env = {k: v for k, v in os.environ.items() if k != "SWARM_REPLICA_KEY"}
    if env_key is not None:
        env["SWARM_REPLICA_KEY"] = env_key
    return subprocess.run(
        replica_command(artifact, "torchscript", signature_path, free_port()),
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(("env_key", "signature", "says"), [
    (None, MLP_SIGNATURE, "SWARM_REPLICA_KEY"),
    ("short", MLP_SIGNATURE, "SWARM_REPLICA_KEY"),
    (KEY, {"inputs": []}, "--signature-file"),
])
def test_the_command_refuses_to_start_without_a_key_or_with_a_bad_signature(
        tmp_path, env_key, signature, says):
    result = run_replica_cli(tmp_path, env_key, signature)
    assert result.returncode == 2
    assert says in result.stderr


def test_an_artifact_that_cannot_load_exits_1_with_the_reason(tmp_path):
    result = run_replica_cli(tmp_path, KEY, MLP_SIGNATURE)
    assert result.returncode == 1
    assert "could not be loaded" in result.stderr
    assert "REPLICA READY" not in result.stdout


def test_the_replica_module_runs_as_a_console_entry_point():
    result = subprocess.run([sys.executable, "-c",
                             "import sys; from serving.replica.__main__ import main; "
                             "sys.exit(main(['--help']))"],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "--max-queue-delay-ms" in result.stdout
