"""Joining the portal: register with the join token while answering its reachability
probe, keep the TLS identity it signs, and store the node's credentials.

The agent (agent.py) calls `register` once, when no stored credentials can be used.
Raises AgentExit (EXIT_FAILED) for a refusal or an unusable answer, AgentExit (EXIT_OK)
when a stop is asked while the portal is unreachable.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TypeVar

from serving.agent import credentials as creds
from serving.agent import credentials_tls
from serving.agent.agent_config import EXIT_FAILED, EXIT_OK, JOIN_HINT, AgentConfig, AgentExit
from serving.agent.client import PortalClient, PortalError, PortalUnreachable
from serving.agent.tunnel import ReachabilityProbe
from swarm_protocol.agent_messages import DeviceInfo, RegisterRequest, RegisterResponse

log = logging.getLogger(__name__)
REGISTER_RETRY_MAX_S = 30.0
R = TypeVar("R")


@dataclass(frozen=True)
class Joined:
    """What registering gave this node."""

    credentials: creds.NodeCredentials
    heartbeat_interval_s: float | None  # the portal's, to follow unless told otherwise
    tls_files: credentials_tls.TlsFiles | None  # None: replicas serve plain HTTP


def register(config: AgentConfig, client: PortalClient, state_dir: Path,
             devices: list[DeviceInfo], stop_requested: threading.Event) -> Joined:
    """Register with `config.join_token`, retrying while the portal is unreachable; store
    the credentials (and the TLS identity, with `config.tls`) in `state_dir`."""
    token = config.join_token
    if not token:
        raise AgentExit(EXIT_FAILED, f"no stored credentials for {config.portal_url} "
                                     f"in {state_dir}: {JOIN_HINT}")
    identity = credentials_tls.new_identity(config.name) if config.tls else None
    request = RegisterRequest(
        join_token=token, name=config.name, address=config.address,
        cost_per_hour=config.cost_per_hour, devices=devices,
        labels=dict(config.labels), agent_version=_agent_version(),
        csr_pem=identity.csr_pem if identity else "")
    with ReachabilityProbe(config.bind_host, config.port_range, config.tunnel) as probe:
        response = _call_with_retry(lambda: client.register(probe.fields(request)),
                                    stop_requested)
    files = _store_identity(state_dir, identity, response) if identity is not None else None
    if files is not None:
        log.info("TLS certificate for %s stored in %s", config.address, files.cert_path)
    stored = creds.NodeCredentials(
        portal_url=config.portal_url, node_id=response.node_id,
        node_secret=response.node_secret, replica_key=response.replica_key)
    path = creds.save_credentials(state_dir, stored)
    log.info("joined %s as node %d; credentials stored in %s", config.portal_url,
             stored.node_id, path)
    return Joined(stored, response.heartbeat_interval_s, files)


def _store_identity(state_dir: Path, identity: credentials_tls.PendingIdentity,
                    response: RegisterResponse) -> credentials_tls.TlsFiles:
    """Keep the key with the certificate the portal signed; replicas serve TLS with it."""
    if not response.certificate_pem or not response.ca_certificate_pem:
        raise AgentExit(EXIT_FAILED, "the portal sent no TLS certificate for this node "
                                     "(an older portal?): refusing to serve in clear")
    try:
        return credentials_tls.save_identity(state_dir, identity, response.certificate_pem,
                                             response.ca_certificate_pem)
    except ValueError as error:
        raise AgentExit(EXIT_FAILED, f"the portal's TLS certificate is unusable: "
                                     f"{error}") from error


def _call_with_retry(call: Callable[[], R], stop_requested: threading.Event) -> R:
    """Return call(), retrying with backoff while the portal is unreachable."""
    delay_s = 1.0
    while True:
        try:
            return call()
        except PortalUnreachable as error:
            log.warning("portal unreachable (%s): retrying in %gs", error, delay_s)
        except PortalError as error:
            raise AgentExit(EXIT_FAILED, f"the portal refused to register this node: "
                                         f"{error}") from error
        if stop_requested.wait(delay_s):
            raise AgentExit(EXIT_OK)
        delay_s = min(delay_s * 2, REGISTER_RETRY_MAX_S)


def _agent_version() -> str:
    # A GPU server installs swarm-worker; a portal checkout runs the agent from swarm-portal.
    for distribution in ("swarm-worker", "swarm-portal"):
        try:
            return metadata.version(distribution)
        except metadata.PackageNotFoundError:
            continue
    return "unknown"
