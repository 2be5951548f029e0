"""Run KServe's own gRPC client (`kserve.InferenceGRPCClient`) against a gateway; print JSON.

A child process of tests/test_gateway_kserve_client.py: KServe's and tritonclient's
generated modules both register `inference.*` in protobuf's default descriptor pool, so the
two clients cannot be imported into one process (pytest's workers import tritonclient).

    python -m tests.kserve_client_run HOST:PORT MODEL EMPTY_MODEL  (API key on stdin)

Prints {"live", "ready", "model_ready", "empty_ready", "raw", "typed", "errors"}: the
scores of one request per contents kind (features seeded 11, 5 rows) and the gRPC status
name of each refused call.
"""

from __future__ import annotations

import asyncio
import json
import sys

import grpc
import numpy as np
from kserve import InferenceGRPCClient, InferInput, InferRequest

ROWS = np.random.default_rng(11).normal(size=(5, 4)).astype(np.float32)


def request(model: str, binary: bool) -> InferRequest:
    tensor = InferInput("features", list(ROWS.shape), "FP32")
    tensor.set_data_from_numpy(ROWS, binary_data=binary)
    return InferRequest(model, [tensor], request_id="k-1")


async def refused(client: InferenceGRPCClient, model: str, headers: tuple) -> str:
    try:
        await client.infer(request(model, True), headers=headers)
    except grpc.aio.AioRpcError as error:
        return error.code().name
    return "OK"


async def run(target: str, model: str, empty: str, secret: str) -> dict[str, object]:
    key = (("authorization", f"Bearer {secret}"),)
    async with InferenceGRPCClient(target, timeout=30, retries=0) as client:
        report: dict[str, object] = {
            "live": await client.is_server_live(),
            "ready": await client.is_server_ready(),
            "model_ready": await client.is_model_ready(model, headers=key),
            "empty_ready": await client.is_model_ready(empty, headers=key),
        }
        for kind, binary in (("raw", True), ("typed", False)):
            response = await client.infer(request(model, binary), headers=key)
            (output,) = response.outputs
            report[kind] = {"id": response.id, "model": response.model_name,
                            "output": output.name, "scores": output.as_numpy().tolist()}
        report["errors"] = {
            "no key": await refused(client, model, ()),
            "wrong key": await refused(client, model, (("authorization", "Bearer wrong"),)),
            "unknown model": await refused(client, "nope", key),
            "no replica": await refused(client, empty, key),
        }
    return report


if __name__ == "__main__":
    target, model, empty = sys.argv[1:4]
    print(json.dumps(asyncio.run(run(target, model, empty, sys.stdin.read().strip()))))
