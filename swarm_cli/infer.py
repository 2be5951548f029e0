"""`swarm infer MODEL --input FILE`: one Open Inference Protocol (v2) request with an API key."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Annotated, Any

import typer

from swarm_cli import config, output
from swarm_cli.client import Client, fail

KEY_ENV, GATEWAY_ENV = "SWARM_API_KEY", "SWARM_GATEWAY_URL"
INFER_TIMEOUT_S = 120.0  # a deployment scaled to zero starts a replica first


def api_key(key_file: Path | None) -> str:
    """Return the API key from --key-file or SWARM_API_KEY (never from the command line)."""
    if key_file is not None:
        try:
            return key_file.read_text().strip()
        except OSError as exc:
            fail(f"cannot read {key_file}: {exc.strerror}")
    key = os.environ.get(KEY_ENV, "").strip()
    if not key:
        fail(f"infer needs an API key: set {KEY_ENV} or pass --key-file PATH "
             "(make one with `swarm keys create NAME`)")
    return key


def gateway_url(explicit: str | None) -> str:
    """Return where /v2 is served: --gateway, SWARM_GATEWAY_URL, else the portal's URL."""
    try:
        url = explicit or os.environ.get(GATEWAY_ENV) or config.load_url()
        if not url:
            fail("no portal URL: run `swarm login URL` or pass --gateway URL")
        return config.checked_url(url)
    except config.ConfigError as exc:
        fail(str(exc))


def json_request(path: Path) -> dict[str, Any]:
    """Return an OIP request body read from a JSON file; exit 1 unless it has `inputs`."""
    try:
        body = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        fail(f"{path}: not a readable JSON file: {exc}")
    if not isinstance(body, dict) or not isinstance(body.get("inputs"), list):
        fail(f'{path}: an inference request needs "inputs": [{{"name", "datatype", '
             '"shape", "data"}, ...]')
    return body


def bytes_request(raw: bytes, input_name: str) -> tuple[bytes, dict[str, str]]:
    """Return a binary-extension body (one BYTES element) and its headers."""
    element = struct.pack("<I", len(raw)) + raw  # BYTES: 4-byte little-endian length, data
    header = json.dumps({"inputs": [{"name": input_name, "datatype": "BYTES", "shape": [1],
                                     "parameters": {"binary_data_size": len(element)}}]}).encode()
    return header + element, {"Inference-Header-Content-Length": str(len(header)),
                              "Content-Type": "application/octet-stream"}


def only_input(client: Client, model_path: str) -> str:
    """Return the name of the model's only input, from its /v2 metadata; exit 1 otherwise."""
    names = [str(spec["name"]) for spec in client.get(model_path).get("inputs", [])]
    if len(names) != 1:
        fail(f"the model has inputs {names}: choose one with --input-name")
    return names[0]


def print_outputs(reply: dict[str, Any]) -> None:
    if output.wants_json():
        output.emit(reply)
        return
    for tensor in reply.get("outputs", []):
        print(f"{tensor['name']} {tensor.get('datatype')} {tensor.get('shape')}: "
              f"{json.dumps(tensor.get('data'))}")


def infer(
    model: str,
    input_file: Annotated[Path, typer.Option(
        "--input", exists=True, dir_okay=False, readable=True,
        help="an OIP JSON request (.json), or any other file sent as one BYTES element")],
    input_name: Annotated[str | None, typer.Option(
        help="the BYTES input's name; default: the model's only input")] = None,
    version: Annotated[int | None, typer.Option(help="pin a version")] = None,
    key_file: Annotated[Path | None, typer.Option(
        help=f"a file holding the API key (or set {KEY_ENV})")] = None,
    gateway: Annotated[str | None, typer.Option(
        help=f"where /v2 is served (or {GATEWAY_ENV}); default: the portal")] = None,
) -> None:
    """Call MODEL (a deployment) once and print its outputs."""
    client = Client(gateway_url(gateway), api_key(key_file), scheme="Bearer",
                    timeout_s=INFER_TIMEOUT_S)
    model_path = f"/v2/models/{model}" + (f"/versions/{version}" if version else "")
    if input_file.suffix.lower() == ".json":
        reply = client.post(f"{model_path}/infer", json_request(input_file))
    else:
        body, headers = bytes_request(input_file.read_bytes(),
                                      input_name or only_input(client, model_path))
        reply = client.request("POST", f"{model_path}/infer", content=body, headers=headers)
    print_outputs(reply)
