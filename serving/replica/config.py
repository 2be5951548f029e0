"""The replica's command line and environment, validated before anything loads."""

from __future__ import annotations

import argparse
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from swarm_protocol.signature import Signature, SignatureError, parse_signature
from swarm_protocol.steps import Steps, StepsError, parse_steps

KEY_ENV = "SWARM_REPLICA_KEY"
MIN_KEY_CHARS = 16
FORMATS = ("torchscript", "torch_export", "onnx", "hf_causal_lm")
_DEVICE_RE = re.compile(r"^(cpu|cuda|cuda:\d+)$")
DEFAULT_MAX_BODY_BYTES = 256 * 1024 * 1024


class ConfigError(ValueError):
    """A bad argument or environment variable; the message names it."""


@dataclass(frozen=True)
class ReplicaConfig:
    """Everything one replica process needs to know."""

    artifact_path: str
    artifact_format: str
    model_name: str
    model_version: int
    signature: Signature
    host: str
    port: int
    max_batch_size: int
    max_queue_delay_ms: float
    device: str
    threads: int
    key: str
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    steps: Steps | None = None  # the version's processing steps (swarm_protocol/steps.py)
    # The node's certificate and key (PEM) from the portal's CA: serve TLS. None: plain HTTP.
    tls_cert_file: str | None = None
    tls_key_file: str | None = None


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of `python -m serving.replica`."""
    parser = argparse.ArgumentParser(
        prog="swarm-replica",
        description="Serve one model version over the Open Inference Protocol v2 (REST). "
                    f"Requests must carry 'Authorization: Bearer ${KEY_ENV}'.")
    parser.add_argument("--artifact", required=True, help="path of the model file")
    parser.add_argument("--format", required=True, choices=FORMATS, dest="artifact_format")
    parser.add_argument("--model-name", required=True)
    parser.add_argument("--model-version", required=True, type=int)
    parser.add_argument("--signature-file", required=True,
                        help='JSON {"inputs": [...], "outputs": [...]}')
    parser.add_argument("--steps-file", default=None,
                        help="JSON of the version's processing steps (images in, labels out)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001, help="0: any free port")
    parser.add_argument("--max-batch-size", type=int, default=1, help="1: no batching")
    parser.add_argument("--max-queue-delay-ms", type=float, default=0.0)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--tls-cert-file", default=None,
                        help="serve TLS with this certificate (PEM; with --tls-key-file)")
    parser.add_argument("--tls-key-file", default=None, help="the certificate's key (PEM)")
    return parser


def load_config(argv: Sequence[str] | None = None,
                environ: Mapping[str, str] | None = None) -> ReplicaConfig:
    """Return the validated configuration; argparse exits on malformed arguments."""
    args = build_parser().parse_args(argv)
    env = os.environ if environ is None else environ
    signature = _signature(args.signature_file)
    return ReplicaConfig(
        artifact_path=_existing_file(args.artifact, "--artifact"),
        artifact_format=args.artifact_format,
        model_name=_model_name(args.model_name),
        model_version=_at_least(args.model_version, 1, "--model-version"),
        signature=signature,
        host=args.host,
        port=_port(args.port),
        max_batch_size=_at_least(args.max_batch_size, 1, "--max-batch-size"),
        max_queue_delay_ms=_non_negative(args.max_queue_delay_ms, "--max-queue-delay-ms"),
        device=_device(args.device),
        threads=_at_least(args.threads, 1, "--threads"),
        key=_key(env.get(KEY_ENV, "")),
        steps=None if args.steps_file is None else _steps(args.steps_file, signature),
        tls_cert_file=_tls_file(args.tls_cert_file, args.tls_key_file, "--tls-cert-file"),
        tls_key_file=_tls_file(args.tls_key_file, args.tls_cert_file, "--tls-key-file"),
    )


def _tls_file(path: str | None, other: str | None, flag: str) -> str | None:
    if (path is None) != (other is None):
        raise ConfigError("--tls-cert-file and --tls-key-file go together")
    return None if path is None else _existing_file(path, flag)


def _existing_file(path: str, flag: str) -> str:
    if not Path(path).is_file():
        raise ConfigError(f"{flag}: {path} is not a file")
    return path


def _model_name(name: str) -> str:
    if not name or "/" in name or name.strip() != name:
        raise ConfigError(f"--model-name: {name!r} must be non-empty, without '/' or spaces")
    return name


def _at_least(value: int, minimum: int, flag: str) -> int:
    if value < minimum:
        raise ConfigError(f"{flag} must be at least {minimum}, got {value}")
    return value


def _non_negative(value: float, flag: str) -> float:
    if not value >= 0:  # also refuses NaN
        raise ConfigError(f"{flag} must be zero or more, got {value}")
    return value


def _port(port: int) -> int:
    if not 0 <= port <= 65535:
        raise ConfigError(f"--port must be between 0 and 65535, got {port}")
    return port


def _device(device: str) -> str:
    if not _DEVICE_RE.match(device):
        raise ConfigError(f"--device must be cpu, cuda or cuda:N, got {device!r}")
    return device


def _signature(path: str) -> Signature:
    _existing_file(path, "--signature-file")
    try:
        return parse_signature(json.loads(Path(path).read_text()))
    except (ValueError, SignatureError) as exc:
        raise ConfigError(f"--signature-file {path}: {exc}") from None


def _steps(path: str, signature: Signature) -> Steps:
    _existing_file(path, "--steps-file")
    try:
        return parse_steps(json.loads(Path(path).read_text()), signature)
    except (ValueError, StepsError) as exc:
        raise ConfigError(f"--steps-file {path}: {exc}") from None


def _key(key: str) -> str:
    if len(key) < MIN_KEY_CHARS or any(ch.isspace() for ch in key):
        raise ConfigError(f"{KEY_ENV} must be set to a key of at least {MIN_KEY_CHARS} "
                          "characters without spaces")
    return key
