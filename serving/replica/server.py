"""Run the replica: uvicorn (uvloop + httptools), loading, readiness, and drain on signals.

Order of events: bind the port (live answers, ready says 503) -> load the model and run
warm-up passes in the model thread -> ready, print `REPLICA READY port=N`. SIGTERM or
SIGINT -> draining: new inference requests get 503, in-flight and queued ones finish,
then the server closes and the process exits 0. A second signal stops at once (exit 1).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import ssl
import sys
from collections.abc import Coroutine, Generator
from typing import Any

import uvicorn
import uvloop

from serving.replica.app import ReplicaApp
from serving.replica.batching import BatchPolicy
from serving.replica.config import ReplicaConfig
from serving.replica.engine import InferenceEngine
from serving.replica.pipeline import with_steps
from serving.replica.runner import LoadError, ModelRunner
from serving.replica.stats import ReplicaStats

EXIT_OK = 0
EXIT_FAILED = 1
KEEP_ALIVE_S = 75  # longer than a gateway pool keeps idle connections, so it closes first
CERT_CHECK_INTERVAL_S = 10.0  # how often a TLS replica looks for a renewed certificate
logger = logging.getLogger("serving.replica")


class _UvicornServer(uvicorn.Server):
    """uvicorn's server with our signal handling and a hook once the port is bound."""

    def __init__(self, config: uvicorn.Config, replica: Replica) -> None:
        super().__init__(config)
        self.replica = replica

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        # uvicorn's own handlers stop at once and re-raise the signal after serving, which
        # would end the process with -SIGTERM instead of draining and exiting 0.
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.replica.on_signal, sig)
        try:
            yield
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            port: int = self.servers[0].sockets[0].getsockname()[1]
            self.replica.on_listening(port)


class Replica:
    """One replica process: the app, the engine and the server, and their life cycle."""

    def __init__(self, config: ReplicaConfig) -> None:
        self.config = config
        runner = ModelRunner(config.artifact_path, config.artifact_format, config.device,
                             config.signature, config.threads)
        policy = BatchPolicy(config.max_batch_size, config.max_queue_delay_ms)
        self.engine = InferenceEngine(with_steps(runner, config.steps), policy, ReplicaStats())
        self.app = ReplicaApp(config, self.engine)
        self.exit_code = EXIT_OK
        self._tasks: set[asyncio.Task[None]] = set()
        self._server = _UvicornServer(self._uvicorn_config(), self)

    def _uvicorn_config(self) -> uvicorn.Config:
        return uvicorn.Config(
            self.app, host=self.config.host, port=self.config.port,
            loop="none", http="httptools", lifespan="off", access_log=False,
            log_level="warning", server_header=False, date_header=False,
            timeout_keep_alive=KEEP_ALIVE_S, backlog=2048,
            # TLS with the node's certificate when the agent gives one (direct mode): the
            # gateway checks it against the portal's CA and pins it (serving/gateway/node_tls.py).
            ssl_certfile=self.config.tls_cert_file, ssl_keyfile=self.config.tls_key_file)

    async def serve(self) -> int:
        """Serve until drained or failed; return the process exit code."""
        await self._server.serve()
        self.engine.stop()
        return self.exit_code

    def on_listening(self, port: int) -> None:
        """Start loading the model once the port is bound."""
        self._spawn(self._load(port))
        if self.config.tls_cert_file is not None:
            self._spawn(self._reload_renewed_certificate())

    async def _reload_renewed_certificate(self) -> None:
        """Serve a renewed certificate (the agent replaces the file) from the next handshake
        on; connections already open keep theirs."""
        cert_file, key_file = self.config.tls_cert_file, self.config.tls_key_file
        assert cert_file is not None
        seen = _mtime_ns(cert_file)
        while not self._server.should_exit:
            await asyncio.sleep(CERT_CHECK_INTERVAL_S)
            changed = _mtime_ns(cert_file)
            if changed == seen or changed is None:
                continue
            seen = changed
            context: ssl.SSLContext | None = self._server.config.ssl
            try:
                assert context is not None
                context.load_cert_chain(cert_file, key_file)
            except (OSError, ssl.SSLError) as exc:  # a half-written file: next time
                logger.warning("could not load the renewed certificate: %s", exc)
                continue
            logger.info("serving the renewed certificate from %s", cert_file)

    async def _load(self, port: int) -> None:
        try:
            await self.engine.load()
        except LoadError as exc:
            logger.error("%s", exc)
            self.exit_code = EXIT_FAILED
            self._server.should_exit = True
            return
        if self.app.state == "loading":
            self.app.state = "ready"
            try:
                print(f"REPLICA READY port={port}", flush=True)
            except OSError:  # nobody reads stdout: readiness is still on /v2/health/ready
                logger.warning("could not print the ready line to stdout")
            logger.info("ready on port %d", port)

    def on_signal(self, sig: int) -> None:
        """Drain on the first SIGTERM/SIGINT; stop at once on the second."""
        if self.app.state == "draining":
            logger.warning("second %s: stopping without waiting", signal.Signals(sig).name)
            self.exit_code = EXIT_FAILED
            self._server.should_exit = self._server.force_exit = True
            return
        logger.info("%s: draining %d request(s)", signal.Signals(sig).name, self.app.in_flight)
        self.app.state = "draining"
        self._spawn(self._exit_when_idle())

    async def _exit_when_idle(self) -> None:
        await self.app.wait_idle()
        self._server.should_exit = True

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _mtime_ns(path: str) -> int | None:
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return None


def run(config: ReplicaConfig) -> int:
    """Run one replica on uvloop; return the exit code."""
    logging.basicConfig(stream=sys.stderr, level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # uvloop.run, not asyncio.Runner (3.11+): the worker runs on Python 3.10 too.
    return uvloop.run(Replica(config).serve())
