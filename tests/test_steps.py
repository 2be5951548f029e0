"""Processing steps: images in, labels and scores out.

Units for the validation (swarm_protocol/steps.py) and the step functions, then a real replica
with a steps file behind the standalone gateway, driven by tritonclient.http.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import tritonclient.http as triton
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import Client
from torch import nn
from tritonclient.utils import InferenceServerException

from registry.models import ModelVersion
from serving.agent.cache import ArtifactCache
from serving.agent.client import PortalClient
from serving.agent.replicas import ReplicaManager, ReplicaSettings
from swarm_protocol.agent_messages import DesiredReplica, ProtocolError
from swarm_protocol.signature import parse_signature
from swarm_protocol.steps import (
    MAX_LABELS_FILE_BYTES,
    StepsError,
    parse_labels_file,
    parse_steps,
    served_signature,
)
from swarm_protocol.steps_run import (
    MAX_DECODED_BYTES,
    StepError,
    classify,
    decode_images,
    dry_run,
    label_table,
)
from tests.agent_fakes import FakePortal, desired_replica
from tests.gateway_helpers import BEARER, StandaloneGateway
from tests.replica_models import ReplicaProcess, save_torchscript
from tests.steps_helpers import (
    CLASSIFIER_SIGNATURE,
    CLASSIFIER_STEPS,
    IMAGE_SIDE,
    bomb_png,
    color_classifier,
    gateway_for,
    image_bytes,
    start_with_steps,
)
from tests.waiting import wait_until

SIGNATURE = parse_signature(CLASSIFIER_SIGNATURE)
RED, GREEN, BLUE = (220, 10, 10), (10, 200, 20), (5, 15, 230)


def steps_with(**changes) -> dict:
    """Return the classifier's steps with the first input and output step changed."""
    inputs = [{**CLASSIFIER_STEPS["inputs"][0], **changes.pop("input", {})}]
    outputs = [{**CLASSIFIER_STEPS["outputs"][0], **changes.pop("output", {})}]
    return {**CLASSIFIER_STEPS, "inputs": inputs, "outputs": outputs, **changes}


def text(element: bytes | str) -> str:
    """Return a BYTES element as text (tritonclient gives bytes from binary data, str from
    JSON)."""
    return element.decode() if isinstance(element, bytes) else element


def images(*pictures: bytes) -> np.ndarray:
    """Return BYTES [N, 1], one encoded picture per row."""
    array = np.empty((len(pictures), 1), dtype=object)
    for row, picture in enumerate(pictures):
        array[row, 0] = picture
    return array


# units: validation


def test_the_served_signature_replaces_stepped_tensors():
    served = served_signature(parse_steps(CLASSIFIER_STEPS, SIGNATURE), SIGNATURE)
    assert served.to_dict() == {
        "inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [-1, 1]}],
        "outputs": [{"name": "scores", "datatype": "FP32", "shape": [-1, 2]},
                    {"name": "class_ids", "datatype": "INT64", "shape": [-1, 2]},
                    {"name": "labels", "datatype": "BYTES", "shape": [-1, 2]}]}


def test_steps_read_back_from_their_stored_form():
    steps = parse_steps(CLASSIFIER_STEPS, SIGNATURE)
    assert parse_steps(steps.to_dict(), SIGNATURE) == steps


@pytest.mark.parametrize(("steps", "message"), [
    ([], "must be an object"),
    ({"inputs": [], "outputs": []}, "at least one"),
    (steps_with(surprise=1), "unknown keys: surprise"),
    (steps_with(input={"input": "pixels"}), "no input 'pixels'"),
    (steps_with(input={"color": "CMYK"}), "color must be one of"),
    (steps_with(input={"layout": "HWC"}), "channels"),
    (steps_with(input={"color": "L"}), "channels"),
    (steps_with(input={"mean": [0.5]}), "list of 3 numbers"),
    (steps_with(input={"std": [1, 0, 1]}), "positive number"),
    (steps_with(input={"scale": float("nan")}), "positive number"),
    (steps_with(input={"decode": "audio"}), "JPEG or PNG"),
    (steps_with(output={"output": "probs"}), "no output 'probs'"),
    (steps_with(output={"top_k": 4}), "from 1 to the number of classes (3)"),
    (steps_with(output={"top_k": 0}), "top_k"),
    (steps_with(output={"softmax": "yes"}), "true or false"),
    (steps_with(labels=["a", "b"]), "2 labels but model output 'logits' has 3"),
    (steps_with(labels=[]), "no labels file"),
    (steps_with(output={"scores": "labels"}), "share a name: labels"),
    (steps_with(input={"name": "bad name"}), "identifier-like"),
])
def test_bad_steps_are_refused_with_a_reason(steps, message):
    with pytest.raises(StepsError) as caught:
        parse_steps(steps, SIGNATURE)
    assert message in str(caught.value)


def test_an_image_step_needs_a_fixed_height_and_width():
    variable = parse_signature({
        "inputs": [{"name": "image", "datatype": "FP32", "shape": [-1, 3, -1, -1]}],
        "outputs": CLASSIFIER_SIGNATURE["outputs"]})
    with pytest.raises(StepsError, match="fixed height and width"):
        parse_steps(CLASSIFIER_STEPS, variable)


def test_a_uint8_model_input_takes_no_scaling():
    uint8 = parse_signature({
        "inputs": [{"name": "image", "datatype": "UINT8", "shape": [-1, 8, 8, 3]}],
        "outputs": CLASSIFIER_SIGNATURE["outputs"]})
    with pytest.raises(StepsError, match="UINT8"):
        parse_steps(steps_with(input={"layout": "HWC"}), uint8)
    steps = parse_steps(steps_with(input={"layout": "HWC", "scale": 1}), uint8)
    decoded = decode_images(images(image_bytes(RED, "PNG")), steps.inputs[0])
    assert decoded.dtype == np.uint8 and decoded.shape == (1, 8, 8, 3)
    assert decoded[0, 0, 0].tolist() == list(RED)


def test_labels_files_are_utf8_lines():
    assert parse_labels_file("\ufeffcat\r\ndög\n\n".encode()) == ["cat", "dög"]
    with pytest.raises(StepsError, match="UTF-8"):
        parse_labels_file(b"\xff\xfe")


# units: the step functions


def test_decoding_resizes_orders_channels_and_normalises():
    steps = parse_steps(steps_with(input={"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}),
                        SIGNATURE)
    decoded = decode_images(images(image_bytes(RED, "PNG", (100, 20))), steps.inputs[0])
    assert decoded.shape == (1, 3, IMAGE_SIDE, IMAGE_SIDE) and decoded.dtype == np.float32
    expected = (np.array(RED, dtype=np.float32) / 255 - 0.5) / 0.5
    np.testing.assert_allclose(decoded[0, :, 3, 3], expected, atol=1e-6)
    bgr = parse_steps(steps_with(input={"color": "BGR"}), SIGNATURE).inputs[0]
    np.testing.assert_allclose(decode_images(images(image_bytes(RED, "PNG")), bgr)[0, :, 0, 0],
                               np.array(RED[::-1]) / 255, atol=1e-6)


def test_grayscale_decodes_to_one_channel():
    gray = parse_signature({
        "inputs": [{"name": "image", "datatype": "FP32", "shape": [-1, 1, 8, 8]}],
        "outputs": CLASSIFIER_SIGNATURE["outputs"]})
    step = parse_steps(steps_with(input={"color": "L"}), gray).inputs[0]
    decoded = decode_images(images(image_bytes((255, 255, 255), "JPEG")), step)
    assert decoded.shape == (1, 1, 8, 8) and decoded.min() > 0.95


@pytest.mark.parametrize(("picture", "message"), [
    (b"not an image", "row 0 is not a readable JPEG or PNG"),
    (image_bytes(RED, "JPEG")[:60], "row 0 is not a readable JPEG or PNG"),
    (bomb_png(), "5000x5000 pixels"),
])
def test_bad_pictures_name_the_input_and_row(picture, message):
    step = parse_steps(CLASSIFIER_STEPS, SIGNATURE).inputs[0]
    with pytest.raises(StepError) as caught:
        decode_images(images(picture), step)
    assert "input 'image_bytes'" in str(caught.value) and message in str(caught.value)


def test_too_many_pictures_for_the_decoded_limit_are_refused_before_decoding():
    step = parse_steps(CLASSIFIER_STEPS, SIGNATURE).inputs[0]
    too_many = MAX_DECODED_BYTES // (IMAGE_SIDE * IMAGE_SIDE * 3 * 4) + 1
    pictures = np.full((too_many, 1), b"never decoded", dtype=object)
    with pytest.raises(StepError, match=f"send at most {too_many - 1} per request"):
        decode_images(pictures, step)


def test_classify_returns_sorted_top_k_with_labels():
    step = parse_steps(CLASSIFIER_STEPS, SIGNATURE).outputs[0]
    logits = np.array([[0.0, 2.0, 1.0], [5.0, -1.0, 5.5]], dtype=np.float32)
    result = classify(logits, step, label_table(("red", "green", "blue")))
    assert result["class_ids"].tolist() == [[1, 2], [2, 0]]
    assert result["labels"].tolist() == [[b"green", b"blue"], [b"blue", b"red"]]
    softmax = np.exp(logits[0]) / np.exp(logits[0]).sum()
    np.testing.assert_allclose(result["scores"][0], softmax[[1, 2]], rtol=1e-6)


# a real replica behind the gateway


@pytest.fixture(scope="module")
def directory(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("steps")


@pytest.fixture(scope="module")
def replica(directory) -> Iterator[ReplicaProcess]:
    process = start_with_steps(directory, color_classifier(directory), CLASSIFIER_SIGNATURE,
                               CLASSIFIER_STEPS, name="colors", max_batch_size=8)
    yield process
    process.stop()


@pytest.fixture(scope="module")
def gateway(directory, replica) -> Iterator[StandaloneGateway]:
    with gateway_for(directory, replica) as process:
        yield process


@pytest.fixture
def client(gateway) -> Iterator[triton.InferenceServerClient]:
    client = triton.InferenceServerClient(url=f"127.0.0.1:{gateway.port}")
    yield client
    client.close()


def classify_pictures(client, pictures: np.ndarray, binary_output: bool) -> triton.InferResult:
    picture_input = triton.InferInput("image_bytes", list(pictures.shape), "BYTES")
    picture_input.set_data_from_numpy(pictures, binary_data=True)
    outputs = [triton.InferRequestedOutput(name, binary_data=binary_output)
               for name in ("labels", "scores", "class_ids")]
    return client.infer("colors", [picture_input], outputs=outputs, headers=dict(BEARER))


@pytest.mark.slow
@pytest.mark.parametrize("binary_output", [True, False], ids=["binary", "json"])
def test_jpeg_and_png_come_back_as_labels_with_scores(client, binary_output):
    pictures = images(image_bytes(RED, "JPEG"), image_bytes(GREEN, "PNG"),
                      image_bytes(BLUE, "JPEG", (300, 200)))
    result = classify_pictures(client, pictures, binary_output)
    labels = result.as_numpy("labels")
    assert labels.shape == (3, 2)
    assert [text(row[0]) for row in labels.tolist()] == ["red", "green", "blue"]
    assert result.as_numpy("class_ids")[:, 0].tolist() == [0, 1, 2]
    scores = result.as_numpy("scores")
    assert scores.dtype == np.float32 and (scores[:, 0] > scores[:, 1]).all()
    assert (scores[:, 0] > 0.9).all()  # 10x the channel means: a clear softmax winner


@pytest.mark.slow
def test_model_metadata_shows_the_served_signature(client):
    metadata = client.get_model_metadata("colors", headers=dict(BEARER))
    assert metadata["inputs"] == [{"name": "image_bytes", "datatype": "BYTES", "shape": [-1, 1]}]
    assert [o["name"] for o in metadata["outputs"]] == ["scores", "class_ids", "labels"]


@pytest.mark.slow
@pytest.mark.parametrize(("picture", "message"), [
    (b"\x89PNG\r\n\x1a\n broken", "is not a readable JPEG or PNG"),
    (image_bytes(RED, "JPEG")[:80], "is not a readable JPEG or PNG"),
    (bomb_png(), "5000x5000 pixels, more than 16777216"),
])
def test_a_bad_picture_gets_a_400_naming_the_input(client, picture, message):
    with pytest.raises(InferenceServerException) as raised:
        classify_pictures(client, images(image_bytes(GREEN, "PNG"), picture), True)
    assert raised.value.status() == "400"
    assert "input 'image_bytes' row 1" in raised.value.message()
    assert message in raised.value.message()


@pytest.mark.slow
def test_a_bad_picture_fails_only_its_own_request_in_a_batch(client, gateway):
    good = images(image_bytes(BLUE, "PNG"))
    bad = images(b"garbage")

    def send(pictures: np.ndarray) -> str:
        with triton.InferenceServerClient(url=f"127.0.0.1:{gateway.port}") as own:
            try:
                return text(classify_pictures(own, pictures, False).as_numpy("labels")[0, 0])
            except InferenceServerException as exc:
                return exc.status()

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(send, [good, bad] * 8))
    assert answers == ["blue", "400"] * 8


@pytest.mark.slow
def test_a_json_string_that_is_no_image_gets_a_400(gateway):
    body = {"inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [1, 1],
                        "data": ["hello"]}]}
    with httpx.Client(base_url=gateway.url, headers=dict(BEARER), timeout=30) as http:
        response = http.post("/v2/models/colors/infer", json=body)
    assert response.status_code == 400
    assert "input 'image_bytes' row 0" in response.json()["error"]


@pytest.mark.slow
def test_a_tensor_sent_for_the_bytes_input_gets_a_400(gateway):
    pixels = np.zeros((1, 3, IMAGE_SIDE, IMAGE_SIDE), dtype=np.float32)
    body = {"inputs": [{"name": "image_bytes", "datatype": "FP32", "shape": list(pixels.shape),
                        "data": pixels.ravel().tolist()}]}
    with httpx.Client(base_url=gateway.url, headers=dict(BEARER), timeout=30) as http:
        response = http.post("/v2/models/colors/infer", json=body)
    assert response.status_code == 400
    assert "expects BYTES" in response.json()["error"]


def test_a_dry_run_decodes_generated_pictures_through_every_step():
    dry_run(parse_steps(CLASSIFIER_STEPS, SIGNATURE))
    uint8 = parse_signature({
        "inputs": [{"name": "image", "datatype": "UINT8", "shape": [-1, 5, 7, 1]}],
        "outputs": CLASSIFIER_SIGNATURE["outputs"]})
    dry_run(parse_steps(steps_with(input={"layout": "HWC", "color": "L", "scale": 1}), uint8))


class WideColors(nn.Module):
    """FP32 images -> 6 classes ([-1, -1] in its signature): more than 3 labels cover."""

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return image.mean(dim=(2, 3)).repeat(1, 2)


@pytest.mark.slow
def test_a_replica_whose_steps_cannot_run_its_model_exits_at_load(tmp_path):
    signature = {"inputs": CLASSIFIER_SIGNATURE["inputs"],
                 "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, -1]}]}
    artifact = save_torchscript(WideColors().eval(), tmp_path / "wide.pt")
    with pytest.raises(AssertionError) as caught:
        start_with_steps(tmp_path, artifact, signature, CLASSIFIER_STEPS, name="wide")
    assert "warm-up pass failed" in str(caught.value)
    assert "6 classes but the labels file has 3 labels" in str(caught.value)


# uploads: steps and a labels file are checked in the validation child


def upload_classifier(client, model_name: str, directory: Path, steps, labels: bytes | None,
                      **fields):
    artifact = color_classifier(directory)
    data = {"artifact": artifact.open("rb"), "signature": json.dumps(CLASSIFIER_SIGNATURE),
            **fields}
    if steps is not None:
        data["steps"] = json.dumps(steps)
    if labels is not None:
        data["labels"] = SimpleUploadedFile("labels.txt", labels, "text/plain")
    try:
        return client.post(f"/api/models/{model_name}/versions/", data, format="multipart")
    finally:
        data["artifact"].close()


def without_labels(steps: dict) -> dict:
    return {key: value for key, value in steps.items() if key != "labels"}


@pytest.mark.django_db(transaction=True)
def test_an_upload_with_steps_and_a_labels_file_serves_bytes_in_and_labels_out(
        operator_api, model, tmp_path, store):
    response = upload_classifier(operator_api, model.name, tmp_path,
                                 without_labels(CLASSIFIER_STEPS), b"red\ngreen\nblue\n")
    assert response.status_code == 201, response.content
    body = response.json()
    assert body["steps"]["labels"] == ["red", "green", "blue"]
    assert body["signature"] == CLASSIFIER_SIGNATURE
    assert body["served_signature"]["inputs"] == [
        {"name": "image_bytes", "datatype": "BYTES", "shape": [-1, 1]}]
    version = ModelVersion.objects.get(model=model, number=1)
    assert parse_steps(version.steps, SIGNATURE) == parse_steps(CLASSIFIER_STEPS, SIGNATURE)


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(("steps", "labels", "message"), [
    (steps_with(output={"top_k": 9}), None, "steps: steps.outputs[0].top_k"),
    (without_labels(CLASSIFIER_STEPS), b"red\ngreen\n", "2 labels but model output"),
    (CLASSIFIER_STEPS, b"red\ngreen\nblue\n", "not both"),
    (None, b"red\ngreen\nblue\n", "needs steps"),
    ("not an object", None, "steps must be a JSON object"),
    (steps_with(input={"input": "pixels"}), None, "no input 'pixels'"),
    (without_labels(CLASSIFIER_STEPS), b"\xff\xfe\x00", "UTF-8"),
])
def test_invalid_steps_are_refused_at_upload(operator_api, model, tmp_path, store, steps,
                                             labels, message):
    response = upload_classifier(operator_api, model.name, tmp_path, steps, labels)
    assert response.status_code == 400, response.content
    assert message in response.json()["error"]
    assert not ModelVersion.objects.exists()
    assert store.stored_names() == set() and store.staging_names() == set()


@pytest.mark.django_db(transaction=True)
def test_labels_that_do_not_cover_the_model_s_classes_are_refused_at_upload(
        operator_api, model, tmp_path, store):
    signature = {"inputs": CLASSIFIER_SIGNATURE["inputs"],
                 "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, -1]}]}
    artifact = save_torchscript(WideColors().eval(), tmp_path / "wide.pt")
    with artifact.open("rb") as handle:
        response = operator_api.post(f"/api/models/{model.name}/versions/", {
            "artifact": handle, "signature": json.dumps(signature),
            "steps": json.dumps(without_labels(CLASSIFIER_STEPS)),
            "labels": SimpleUploadedFile("labels.txt", b"red\ngreen\nblue\n")},
            format="multipart")
    assert response.status_code == 400, response.content
    assert "6 classes but the labels file has 3 labels" in response.json()["error"]
    assert not ModelVersion.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_a_labels_file_over_the_limit_is_a_413(operator_api, model, tmp_path, store):
    labels = b"x\n" * (MAX_LABELS_FILE_BYTES // 2 + 1)
    response = upload_classifier(operator_api, model.name, tmp_path,
                                 without_labels(CLASSIFIER_STEPS), labels)
    assert response.status_code == 413
    assert "labels file" in response.json()["error"]
    assert store.staging_names() == set()


@pytest.mark.django_db(transaction=True)
def test_the_upload_page_takes_steps_and_labels_and_the_model_page_shows_them(
        operator, model, tmp_path):
    browser = Client()
    browser.force_login(operator)
    form = browser.get(f"/models/{model.name}/upload/").content.decode()
    assert 'name="steps"' in form and 'name="labels"' in form
    artifact = color_classifier(tmp_path)
    response = browser.post(f"/models/{model.name}/upload/", {
        "artifact": SimpleUploadedFile("colors.pt", artifact.read_bytes()),
        "signature": json.dumps(CLASSIFIER_SIGNATURE), "metadata": "", "format": "",
        "steps": json.dumps(without_labels(CLASSIFIER_STEPS)),
        "labels": SimpleUploadedFile("labels.txt", b"red\ngreen\nblue\n")}, follow=True)
    assert response.redirect_chain[-1][0] == f"/models/{model.name}/"
    page = response.content.decode()
    assert "Steps" in page and "image_bytes" in page and "softmax" in page
    assert "3 labels: red, green, blue" in page
    assert "Served outputs" in page and "class_ids" in page


@pytest.mark.django_db(transaction=True)
def test_the_portal_hands_a_version_s_steps_to_the_agent_and_the_gateway(
        operator_api, operator, model, gpu_node, tmp_path):
    from serving import services as serving_services
    from serving.gateway_source import _version_infos
    from serving.services.reconcile import desired_for_node

    response = upload_classifier(operator_api, model.name, tmp_path,
                                 without_labels(CLASSIFIER_STEPS), b"red\ngreen\nblue\n")
    assert response.status_code == 201, response.content
    serving_services.do_create_deployment(name="colors", model=model, version_number=1,
                                          alias_name="", user=operator, replicas=1,
                                          memory_bytes=1024**3)
    [desired] = desired_for_node(gpu_node)
    assert desired.signature == CLASSIFIER_SIGNATURE
    assert parse_steps(desired.steps, SIGNATURE) == parse_steps(CLASSIFIER_STEPS, SIGNATURE)
    info = _version_infos({model.pk})[(model.pk, 1)]
    assert info.inputs == [{"name": "image_bytes", "datatype": "BYTES", "shape": [-1, 1]}]
    assert [spec["name"] for spec in info.outputs] == ["scores", "class_ids", "labels"]


# the worker agent starts a replica with its version's steps


def test_a_desired_replica_carries_its_steps_through_the_protocol():
    desired = desired_replica(5, b"artifact", signature=CLASSIFIER_SIGNATURE,
                              steps=CLASSIFIER_STEPS)
    again = DesiredReplica.from_dict(json.loads(json.dumps(desired.to_dict())))
    assert again.steps == CLASSIFIER_STEPS
    without = {k: v for k, v in desired.to_dict().items() if k != "steps"}
    assert DesiredReplica.from_dict(without).steps == {}
    with pytest.raises(ProtocolError, match="steps"):
        DesiredReplica.from_dict({**desired.to_dict(), "steps": ["not", "an", "object"]})


@pytest.mark.slow
def test_the_agent_starts_a_replica_that_serves_pictures(tmp_path):
    artifact = color_classifier(tmp_path).read_bytes()
    key = "a-replica-key-of-32-characters!!"
    with FakePortal() as portal:
        portal.state.secrets["swn_1_real"] = 1
        portal.add_artifact(artifact)
        cache = ArtifactCache(tmp_path / "cache", PortalClient(
            portal.url, timeout_s=10.0, node_secret="swn_1_real"))
        executor = ThreadPoolExecutor(1)
        settings = ReplicaSettings(replicas_dir=tmp_path / "replicas",
                                   port_range=range(19640, 19660), ready_timeout_s=120.0,
                                   drain_grace_s=30.0)
        manager = ReplicaManager(settings, lambda d: cache.ensure(d.sha256, d.size_bytes),
                                 executor)
        try:
            manager.reconcile([desired_replica(
                31, artifact, model_name="colors", signature=CLASSIFIER_SIGNATURE,
                steps=CLASSIFIER_STEPS)], key, time.monotonic())
            wait_until(lambda: manager.step(time.monotonic()) or
                       manager.replicas[31].state in ("ready", "failed"),
                       timeout_s=120, what="the replica to be ready")
            replica = manager.replicas[31]
            assert replica.state == "ready", replica.error
            body = {"inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [1, 1],
                                "data": ["not a picture"]}]}
            answer = httpx.post(f"http://127.0.0.1:{replica.port}/v2/models/colors/infer",
                                json=body, timeout=10, headers={"Authorization": f"Bearer {key}"})
            assert answer.status_code == 400
            assert "input 'image_bytes' row 0" in answer.json()["error"]
        finally:
            manager.drain_all(time.monotonic())
            wait_until(lambda: manager.step(time.monotonic()) or manager.live_count() == 0,
                       timeout_s=40, what="replicas to stop")
            manager.close()
            executor.shutdown()
