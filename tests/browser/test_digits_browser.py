"""In Chromium: the Playground sends a PNG of a digit to demo-digits and shows its label.

The whole path of issue 13's demo: register_demo_model's version (trained here, validated
in the child), deployed on a real agent (steps file and all), called from the page with a
file chosen for the image input, through the gateway with the portal session.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
from PIL import Image

from registry import demo_digits
from swarm_protocol.signature import parse_signature
from swarm_protocol.steps import parse_steps
from swarm_protocol.steps_run import decode_images

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]


def dark_on_light_png(image: np.ndarray, side: int = 96) -> bytes:
    """Return a held-out digit (8x8, 0..16) as a dark-on-light grayscale PNG."""
    pixels = 255 - np.rint(image * 255 / 16).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, "L").resize((side, side), Image.Resampling.BILINEAR).save(
        buffer, format="PNG")
    return buffer.getvalue()


def a_digit_the_model_knows(directory: Path) -> tuple[Path, int]:
    """Write the first held-out digit that the steps and graph (in process) get right."""
    steps = parse_steps({**demo_digits.DIGITS_STEPS, "labels": demo_digits.DIGITS_LABELS},
                        parse_signature(demo_digits.DIGITS_SIGNATURE))
    model = demo_digits.onnx_model(demo_digits.train())
    session = onnxruntime.InferenceSession(model.SerializeToString())
    split = demo_digits.split_digits()
    for image, label in zip(split.held_out_images, split.held_out_labels, strict=True):
        png = dark_on_light_png(image)
        rows = np.empty((1, 1), dtype=object)
        rows[0, 0] = png
        logits = session.run(None, {"pixels": decode_images(rows, steps.inputs[0])})[0]
        if int(logits.argmax()) == int(label):
            path = directory / f"digit-{label}.png"
            path.write_bytes(png)
            return path, int(label)
    raise AssertionError("the model gets no held-out digit right")


def test_the_playground_sends_a_png_and_shows_the_digit(log_in, portal, operator, tmp_path,
                                                        screenshot):
    from registry.management.commands.register_demo_model import DEMO_MODELS, register
    from serving import services
    from serving.models import Node, Replica, ReplicaState
    from tests.e2e import LiveAgent
    from tests.waiting import wait_until

    digits = next(demo for demo in DEMO_MODELS if demo.name == demo_digits.DIGITS_MODEL_NAME)
    version = register(digits, operator)
    _token, secret = services.do_create_join_token(name="digits", user=operator,
                                                   expires_in=None, uses=1)
    agent = LiveAgent(portal.url, "digits-node", "9380-9399", tmp_path / "agent", secret).start()
    try:
        wait_until(lambda: Node.objects.filter(name="digits-node").exists(), 60, "the agent")
        services.do_create_deployment(name=digits.name, model=version.model,
                                      version_number=version.number, alias_name="",
                                      user=operator, replicas=1)
        wait_until(lambda: Replica.objects.filter(deployment__name=digits.name,
                                                  state=ReplicaState.READY).exists(),
                   120, "the demo-digits replica to be ready")
        png, label = a_digit_the_model_knows(tmp_path)
        page = log_in("olga")
        page.goto(f"/playground/?deployment={digits.name}")
        page.wait_for_selector("#pg-image:not([hidden])", timeout=10_000)
        assert page.text_content("#pg-image-input") == "image"
        page.set_input_files("#pg-image-file", str(png))
        page.click("#pg-send")
        page.wait_for_selector("#pg-result:not([hidden])", timeout=30_000)
        assert page.text_content("#pg-status") == "200 OK", page.text_content("#pg-response")
        outputs = {o["name"]: o for o in json.loads(page.text_content("#pg-response"))["outputs"]}
        assert outputs["labels"]["data"][0] == str(label)
        screenshot(page, "digit")
    finally:
        agent.terminate(timeout_s=40)
