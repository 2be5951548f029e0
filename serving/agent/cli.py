"""`swarm-worker`: join a GPU server (or any machine) to a Swarm Portal pool."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import socket
import sys
from pathlib import Path
from types import FrameType
from urllib.parse import urlsplit

from serving.agent.agent import EXIT_FAILED, Agent, AgentConfig
from serving.agent.credentials import NodeDirBusy, TokenFileError, read_join_token_file
from serving.agent.devices import BACKEND_CHOICES, DeviceBackendError, detect_backend
from swarm_protocol.addresses import is_loopback_host

log = logging.getLogger("serving.agent")
DEFAULT_CACHE_DIR = Path("~/.cache/swarm-worker")
MAX_PORT = 65535
EXIT_USAGE = 2
JOIN_TOKEN_ENV = "SWARM_JOIN_TOKEN"  # noqa: S105 - a variable name
TUNNEL_ENV = "SWARM_WORKER_TUNNEL"
ALLOW_HTTP_PORTAL_ENV = "SWARM_WORKER_ALLOW_HTTP_PORTAL"
TOKEN_ON_COMMAND_LINE = (
    "--token puts the join token on the command line, where any user of this machine can "
    f"read it (ps): give it in the {JOIN_TOKEN_ENV} environment variable or in a file only "
    "you can read, with --token-file PATH")


def build_parser() -> argparse.ArgumentParser:
    """Return the command-line parser."""
    parser = argparse.ArgumentParser(
        prog="swarm-worker", description="Join this machine to a Swarm Portal pool and run "
        "the model replicas the portal places on it.")
    parser.add_argument("--portal", required=True, type=portal_url,
                        help="portal base URL, e.g. https://portal.example.com")
    parser.add_argument("--token-file", type=Path, default=None,
                        help="file holding the join token, readable by its owner only (chmod "
                        f"600); or set {JOIN_TOKEN_ENV}. Needed only until credentials are "
                        "stored")
    # Refused in run() with a message that says what to do instead.
    parser.add_argument("--token", help=argparse.SUPPRESS)
    parser.add_argument("--name", default=socket.gethostname(), help="node name (hostname)")
    parser.add_argument("--address", default="127.0.0.1",
                        help="host the portal and gateway use to reach replicas (127.0.0.1)")
    parser.add_argument("--bind-host", default=None,
                        help="interface replicas listen on (default: 127.0.0.1 for a loopback "
                        "--address, else 0.0.0.0)")
    parser.add_argument("--port-range", default=range(9100, 9200), type=port_range,
                        help="ports for replica servers, FIRST-LAST (9100-9199)")
    parser.add_argument("--cost-per-hour", default=0.0, type=non_negative_float,
                        help="what this node costs per hour, for placement (0)")
    parser.add_argument("--cache-dir", default=DEFAULT_CACHE_DIR, type=Path,
                        help="artifacts and credentials (~/.cache/swarm-worker)")
    parser.add_argument("--label", action="append", default=[], type=label,
                        help="node label KEY=VALUE (repeatable)")
    parser.add_argument("--heartbeat-interval-s", default=None, type=positive_float,
                        help="seconds between heartbeats (default: what the portal says, 1.0 "
                        "until it says)")
    parser.add_argument("--device-backend", default="auto", choices=BACKEND_CHOICES,
                        help="auto: NVML when it finds a GPU, else the CPU")
    parser.add_argument("--drain-grace-s", default=30.0, type=positive_float,
                        help="how long a stopping replica may finish requests before a kill")
    parser.add_argument("--drain-delay-s", default=2.0, type=non_negative_float,
                        help="how long a ready replica keeps serving, reported as draining, "
                        "before it is told to stop (gateways move away meanwhile)")
    parser.add_argument("--ready-timeout-s", default=300.0, type=positive_float,
                        help="how long a replica may take to load its model")
    parser.add_argument("--replica-watchdog-s", default=60.0, type=positive_float,
                        help="a replica drains itself after this long without an agent; a "
                        "restarted agent adopts replicas still running (60)")
    parser.add_argument("--tunnel", action="store_true",
                        default=os.environ.get(TUNNEL_ENV, "") == "1",
                        help="serve through an outbound tunnel to each gateway even when the "
                        f"portal could reach this machine (or set {TUNNEL_ENV}=1); replicas "
                        "then listen on 127.0.0.1 unless --bind-host says otherwise")
    parser.add_argument("--portal-lost-exit-s", default=0.0, type=non_negative_float,
                        help="drain the replicas and exit once no heartbeat got through for "
                        "this long (0, the default: never; a worker keeps serving without "
                        "its portal)")
    parser.add_argument("--tls", default="auto", choices=("auto", "on", "off"),
                        help="replicas serve TLS with a certificate the portal signs at join "
                        "(auto, the default: on unless --address is a loopback address; off "
                        "is allowed for loopback addresses only)")
    parser.add_argument("--allow-http-portal", action="store_true",
                        default=os.environ.get(ALLOW_HTTP_PORTAL_ENV, "") == "1",
                        help="accept an http:// portal URL on a network address (the join "
                        "token and node secret then cross the network in clear: for a lab "
                        f"network you trust; or set {ALLOW_HTTP_PORTAL_ENV}=1)")
    parser.add_argument("--log-level", default="INFO",
                        choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    return parser


def portal_url(text: str) -> str:
    """Return an http(s) URL without its trailing slash."""
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise argparse.ArgumentTypeError(f"not an http(s) URL: {text!r}")
    return text.rstrip("/")


def port_range(text: str) -> range:
    """Return the ports FIRST-LAST (inclusive) as a range."""
    first, dash, last = text.partition("-")
    try:
        start, end = int(first), int(last if dash else first)
    except ValueError:
        raise argparse.ArgumentTypeError(f"port range must be FIRST-LAST, got {text!r}") from None
    if not 1 <= start <= end <= MAX_PORT:
        raise argparse.ArgumentTypeError(f"port range must lie within 1-{MAX_PORT}, FIRST <= "
                                         f"LAST, got {text!r}")
    return range(start, end + 1)


def label(text: str) -> tuple[str, str]:
    """Return (key, value) from KEY=VALUE."""
    key, equals, value = text.partition("=")
    if not equals or not key.strip():
        raise argparse.ArgumentTypeError(f"label must be KEY=VALUE, got {text!r}")
    return key.strip(), value.strip()


def positive_float(text: str) -> float:
    """Return a float > 0."""
    value = _float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be greater than 0, got {text!r}")
    return value


def non_negative_float(text: str) -> float:
    """Return a float >= 0."""
    value = _float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, got {text!r}")
    return value


def _float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"not a finite number: {text!r}")
    return value


def default_bind_host(address: str) -> str:
    """Return where replicas listen: loopback for a loopback address, else every interface
    (a DNS name: the portal reaches us from elsewhere; replicas check their key)."""
    return "127.0.0.1" if is_loopback_host(address) else "0.0.0.0"  # noqa: S104


def tls_enabled(choice: str, address: str) -> bool:
    """Return whether replicas serve TLS; ValueError for plain HTTP on a network address."""
    if choice == "off" and not is_loopback_host(address):
        raise ValueError(f"--tls off would send requests and the replica key in clear to "
                         f"{address}: plain HTTP is for loopback addresses only")
    return choice == "on" or (choice == "auto" and not is_loopback_host(address))


def check_portal_scheme(url: str, allow_http: bool) -> None:
    """Raise ValueError for a plain http:// portal on a network address unless allowed:
    the join token, then the node secret in every heartbeat, would cross it in clear."""
    parts = urlsplit(url)
    if parts.scheme == "https" or allow_http or is_loopback_host(parts.hostname or ""):
        return
    raise ValueError(f"--portal {url} is plain HTTP on a network address: the join token and "
                     "the node secret would cross the network in clear. Use the portal's "
                     "https:// URL, or --allow-http-portal on a network you trust")


def join_token(args: argparse.Namespace) -> str | None:
    """Return the join token from --token-file or SWARM_JOIN_TOKEN (None: neither given).

    Taken out of this process's environment once read, so nothing started later inherits it.
    """
    from_env = os.environ.pop(JOIN_TOKEN_ENV, "").strip() or None
    if args.token_file is not None:
        return read_join_token_file(args.token_file.expanduser())
    return from_env


def config_from_args(args: argparse.Namespace, token: str | None = None) -> AgentConfig:
    """Return the AgentConfig the parsed arguments describe."""
    return AgentConfig(
        portal_url=args.portal, cache_dir=args.cache_dir.expanduser(), name=args.name,
        join_token=token, address=args.address,
        bind_host=args.bind_host or default_bind_host(args.address),
        port_range=args.port_range, cost_per_hour=args.cost_per_hour,
        labels=dict(args.label), heartbeat_interval_s=args.heartbeat_interval_s,
        drain_grace_s=args.drain_grace_s, drain_delay_s=args.drain_delay_s,
        ready_timeout_s=args.ready_timeout_s, replica_watchdog_s=args.replica_watchdog_s,
        portal_lost_exit_s=args.portal_lost_exit_s, tls=tls_enabled(args.tls, args.address))


def run(argv: list[str] | None = None) -> int:
    """Parse arguments, run the agent until SIGTERM/SIGINT, and return the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.token is not None:
        parser.print_usage(sys.stderr)
        print(f"swarm-worker: error: {TOKEN_ON_COMMAND_LINE}", file=sys.stderr)
        return EXIT_USAGE
    try:
        tls_enabled(args.tls, args.address)
        check_portal_scheme(args.portal, args.allow_http_portal)
        token = join_token(args)
    except (TokenFileError, ValueError) as error:
        print(f"swarm-worker: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    logging.basicConfig(level=args.log_level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for chatty in ("httpx", "httpcore"):  # one line per heartbeat and health poll otherwise
        logging.getLogger(chatty).setLevel(logging.WARNING)
    try:
        devices = detect_backend(args.device_backend)
    except DeviceBackendError as error:
        log.error("%s", error)
        return EXIT_FAILED
    log.info("devices: %s backend", devices.name)
    try:
        agent = Agent(tunnel_mode(config_from_args(args, token), args), devices)
    except (OSError, NodeDirBusy) as error:
        log.error("cannot use the cache directory: %s", error)
        return EXIT_FAILED

    def request_stop(signum: int, _frame: FrameType | None) -> None:
        log.info("received %s: draining replicas, then leaving", signal.Signals(signum).name)
        agent.stop_requested.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    return agent.run()


def tunnel_mode(config: AgentConfig, args: argparse.Namespace) -> AgentConfig:
    """Return the config with --tunnel applied: replicas listen on loopback by default."""
    if not args.tunnel:
        return config
    return dataclasses.replace(config, tunnel=True, bind_host=args.bind_host or "127.0.0.1")


def main() -> None:
    """Console-script entry point."""
    sys.exit(run())


if __name__ == "__main__":
    main()
