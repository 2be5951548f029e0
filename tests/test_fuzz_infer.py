"""Generated `/v2` infer requests against a real replica, directly and through the gateway.

Whatever the body and headers, the answer is never a 5xx and its body is always strict JSON
(or, for binary outputs, a strict JSON header and the bytes it declares). Bounded to a few
hundred examples so it runs in CI in well under a minute.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from serving.gateway.app import GatewayApp
from serving.gateway.routes import VersionInfo
from tests.gateway_helpers import (
    BEARER,
    GatewayThread,
    MemoryTableSource,
    deployment,
    replica_route,
    table,
)
from tests.replica_models import ReplicaProcess, save_torchscript, start_replica
from tests.test_replica_hostile import LOG_SIGNATURE, NAME, Log

pytestmark = pytest.mark.slow
INFER = f"/v2/models/{NAME}/infer"
FUZZ = settings(max_examples=120, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])


@pytest.fixture(scope="module")
def replica(tmp_path_factory) -> Iterator[ReplicaProcess]:
    directory = tmp_path_factory.mktemp("fuzz-log")
    artifact = save_torchscript(Log(), directory / "log.pt")
    process = start_replica(directory, artifact, "torchscript", LOG_SIGNATURE, name=NAME)
    yield process
    process.stop()


@pytest.fixture(scope="module")
def replica_client(replica) -> Iterator[httpx.Client]:
    with replica.client(timeout=30) as client:
        yield client


@pytest.fixture(scope="module")
def gateway_client(replica) -> Iterator[httpx.Client]:
    info = VersionInfo("pytorch_torchscript", LOG_SIGNATURE["inputs"], LOG_SIGNATURE["outputs"])
    source = MemoryTableSource(table(deployment(NAME, [replica_route(replica, 1)], info=info)))
    with GatewayThread(GatewayApp(source)) as gateway, \
            httpx.Client(base_url=gateway.url, timeout=30) as client:
        yield client


# strategies

# Numbers Python's int() reads differently from HTTP, or not at all.
TRICKY_NUMBERS = ["²", "٣", "1_0", "+1", "0x10", "1e3", "", "9" * 5000, "-1", "-0", "١٢"]
odd_numbers = st.one_of(
    st.sampled_from(TRICKY_NUMBERS),
    st.integers(-2, 2**70).map(str),
    st.text(alphabet="0123456789²٣ -+_.e", max_size=30),
).map(str.strip)  # the client refuses to send a header value with spaces around it
json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
                         st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=8))
any_json = st.recursive(json_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=4)),
    max_leaves=12)
datatypes = st.one_of(st.sampled_from(["FP32", "FP32", "FP64", "INT64", "BOOL", "BF16",
                                       "UINT8", "BYTES"]), any_json)
dims = st.one_of(st.integers(0, 4), st.integers(-3, 2**64), any_json)
shapes = st.one_of(st.lists(st.integers(0, 3), min_size=1, max_size=3),
                   st.sampled_from([[1] * 65, [0, 2**62], [2**40, 2**40], [0, 2**64]]),
                   st.lists(dims, max_size=70), st.just([1, 2]), any_json)
values = st.one_of(st.floats(width=32), st.integers(-2**40, 2**40), st.booleans(),
                   st.text(max_size=4), st.none())
datas = st.one_of(st.lists(values, max_size=8), st.lists(st.lists(values, max_size=3),
                                                         max_size=3), any_json)
parameters = st.one_of(st.none(), st.fixed_dictionaries({}, optional={
    "binary_data_output": st.one_of(st.booleans(), any_json),
    "binary_data_size": st.one_of(st.integers(-4, 64), any_json),
    "binary_data": st.one_of(st.booleans(), any_json)}), any_json)
tensors = st.fixed_dictionaries({}, optional={
    "name": st.one_of(st.just("x"), any_json), "datatype": datatypes, "shape": shapes,
    "data": datas, "parameters": parameters})
outputs = st.one_of(st.none(), st.lists(st.fixed_dictionaries(
    {"name": st.one_of(st.just("y"), st.text(max_size=3))}, optional={"parameters": parameters}),
    max_size=2), any_json)
requests = st.one_of(
    st.fixed_dictionaries({"inputs": st.one_of(st.lists(tensors, max_size=3), any_json)},
                          optional={"id": any_json, "parameters": parameters,
                                    "outputs": outputs}),
    any_json)


def header_bytes(text: str) -> bytes:
    """Return a header value as a server decodes it: latin-1 where it can be."""
    try:
        return text.encode("latin-1")
    except UnicodeEncodeError:
        return text.encode()


# The reproductions from the issue, always tried first.
LOG_HEADER = json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 2],
                                     "parameters": {"binary_data_size": 8}}]}).encode()
LOG_BINARY = LOG_HEADER + np.array([-1.0, 0.0], dtype="<f4").tobytes()
ISSUE_LENGTHS = [b"\xb2", "²".encode(), b"9" * 5000, b"-1"]
WIDE = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1] * 65, "data": [1]}]}


@st.composite
def binary_bodies(draw: st.DrawFn) -> tuple[bytes, dict[str, bytes]]:
    """A JSON header and raw bytes, with a header length that may or may not be right."""
    header = json.dumps(draw(requests)).encode()
    tail = draw(st.one_of(st.binary(max_size=64),
                          st.just(np.array([-1.0, 0.0], dtype="<f4").tobytes())))
    length = draw(st.one_of(st.just(str(len(header))), st.sampled_from(TRICKY_NUMBERS),
                            odd_numbers,
                            st.integers(0, len(header) + len(tail) + 2).map(str)))
    headers = {"Inference-Header-Content-Length": header_bytes(length)}
    if draw(st.integers(0, 3)) == 0:
        del headers["Inference-Header-Content-Length"]
    return header + tail, headers


text_bodies = st.one_of(
    st.binary(max_size=200),
    st.sampled_from([b'{"inputs":[{"name":"x","datatype":"FP32","shape":[1,2],'
                     b'"data":[NaN,1]}]}', b"[" * 100_000, b'{"inputs": 1e999}', b"\x80"]),
)


def assert_json_answer(response: httpx.Response) -> None:
    """The answer is not a 5xx and is strict JSON (its JSON part, for binary outputs)."""
    assert response.status_code < 500, (response.status_code, response.text[:300])

    def refuse(token: str) -> Any:
        raise AssertionError(f"non-JSON token {token} in the answer")

    content = response.content
    length = response.headers.get("inference-header-content-length")
    if length is not None:
        assert response.status_code == 200
        content = content[:int(length)]
    document = json.loads(content, parse_constant=refuse)
    if response.status_code >= 400:
        assert isinstance(document["error"], str)


# the replica


@FUZZ
@given(body=requests)
@example(body=WIDE)
@example(body={"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 2],
                           "data": [-1.0, 0.0]}]})
def test_generated_json_requests_get_json_answers_from_the_replica(replica_client, body):
    assert_json_answer(replica_client.post(INFER, content=json.dumps(body).encode()))


@FUZZ
@given(case=binary_bodies())
@example(case=(LOG_BINARY, {}))
@example(case=(LOG_BINARY, {"Inference-Header-Content-Length": str(len(LOG_HEADER) - 1)}))
@example(case=(LOG_BINARY, {"Inference-Header-Content-Length": ISSUE_LENGTHS[0]}))
@example(case=(LOG_BINARY, {"Inference-Header-Content-Length": ISSUE_LENGTHS[1]}))
@example(case=(LOG_BINARY, {"Inference-Header-Content-Length": ISSUE_LENGTHS[2]}))
@example(case=(LOG_BINARY, {"Inference-Header-Content-Length": ISSUE_LENGTHS[3]}))
def test_generated_binary_requests_get_json_answers_from_the_replica(replica_client, case):
    body, headers = case
    assert_json_answer(replica_client.post(INFER, content=body, headers=headers))


@FUZZ
@given(body=text_bodies, length=st.one_of(st.none(), odd_numbers))
def test_arbitrary_bytes_get_json_answers_from_the_replica(replica_client, body, length):
    headers = {} if length is None else {"Inference-Header-Content-Length": header_bytes(length)}
    assert_json_answer(replica_client.post(INFER, content=body, headers=headers))


# through the gateway

path_parts = st.one_of(st.just(NAME), st.text(min_size=1, max_size=12))
versions = st.one_of(st.none(), st.just("1"), odd_numbers)
authorizations = st.one_of(st.just(BEARER["Authorization"]), st.none(),
                           st.text(alphabet="Bearr k-_x ", max_size=40).map(str.strip),
                           st.just("Bearer " + "k" * 300))


@FUZZ
@example(name=NAME, version="²", authorization=None, case=(b"{}", {}))
@example(name=NAME, version="9" * 5000, authorization=BEARER["Authorization"],
         case=(b"{}", {}))
@example(name=NAME, version="1", authorization=BEARER["Authorization"], case=(
    LOG_BINARY, {"Inference-Header-Content-Length": b"\xb2"}))
@given(name=path_parts, version=versions, authorization=authorizations,
       case=st.one_of(binary_bodies(), requests.map(lambda r: (json.dumps(r).encode(), {}))))
def test_generated_requests_through_the_gateway_get_json_answers(gateway_client, name, version,
                                                                 authorization, case):
    body, headers = case
    path = f"/v2/models/{quote(name, safe='')}"
    if version is not None:
        path += f"/versions/{quote(version, safe='')}"
    if authorization is not None:
        headers = {**headers, "Authorization": authorization}
    response = gateway_client.post(httpx.URL(path + "/infer"), content=body, headers=headers)
    assert_json_answer(response)
