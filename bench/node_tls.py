"""Benchmark direct mode's TLS: the gateway reaching a replica over plain HTTP vs over TLS.

Run by hand (not a test), from the repository root:

    python bench/node_tls.py                # 5 s per cell, concurrency 1, 16 and 64

Two batched replicas of the reference MLP (bench/replica.py) on loopback, one plain, one
serving TLS with a certificate from a CA made here (as serving/node_ca.py makes them: EC
P-256, the address as SAN), and two gateways (`serving.gateway.standalone`, file tables):
`plain` routes to the plain replica, `tls` to the TLS one with the CA and the certificate's
fingerprint in its table, so it verifies and pins as in production. The targets alternate for
`--rounds` rounds and each cell reports the median round (bench/gateway.py's method and load
generator). Connections are kept alive, so what is measured is TLS's per-request cost
(encryption and framing in both processes), not handshakes.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import ipaddress
import json
import subprocess
import sys
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
from common import (
    add_cell_options,
    load_average,
    print_cell_table,
    print_ratio_table,
    print_run_line,
    stop,
)
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from gateway import (  # bench/gateway.py: the same load generator, cells and table
    GATEWAY_HEADERS,
    Cell,
    Target,
    add_client_options,
    measure,
    wait_proxy,
    write_table,
)
from replica import HEADERS as REPLICA_HEADERS
from replica import (
    KEY,
    Replica,
    free_port,
    request_body,
    start_replica,
    wait_ready,
    write_reference,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"


def _certificate(subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Name,
                 signer: ec.EllipticCurvePrivateKey, ca: bool) -> x509.Certificate:
    now = datetime.now(UTC)
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
               .issuer_name(issuer).public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - timedelta(minutes=5))
               .not_valid_after(now + timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None),
                              critical=True))
    if not ca:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.IPAddress(ipaddress.ip_address(HOST))]), critical=False)
    return builder.sign(signer, hashes.SHA256())


def make_tls_files(folder: Path) -> tuple[Path, Path, str, str]:
    """Return (cert file, key file, CA PEM, the certificate's sha256) for HOST."""
    ca_key, node_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(
        ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench CA")])
    ca = _certificate("bench CA", ca_key, ca_name, ca_key, ca=True)
    node = _certificate("swarm-node-1", node_key, ca_name, ca_key, ca=False)
    cert_path, key_path = folder / "node.crt", folder / "node.key"
    cert_path.write_bytes(node.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(node_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    key_path.chmod(0o600)
    sha256 = hashlib.sha256(node_key.public_key().public_bytes(  # the pin: the key's SPKI
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)).hexdigest()
    return cert_path, key_path, ca.public_bytes(serialization.Encoding.PEM).decode(), sha256


def start_gateway(table: Path, port: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "serving.gateway.standalone", "--table",
                             str(table), "--port", str(port)], cwd=REPO_ROOT,
                            stdout=subprocess.DEVNULL)


def start_replicas(folder: Path) -> tuple[dict[str, Replica], str, str]:
    """Start the `plain` and `tls` replicas (batched) serving the reference MLP from
    `folder`: (replicas by name, the CA's PEM, the TLS certificate's pin)."""
    artifact, signature = write_reference(folder)
    cert, key, ca_pem, sha256 = make_tls_files(folder)
    tls = ["--tls-cert-file", str(cert), "--tls-key-file", str(key)]
    replicas = {"plain": start_replica("plain", artifact, signature, config="batched"),
                "tls": start_replica("tls", artifact, signature, config="batched", extra=tls)}
    return replicas, ca_pem, sha256


async def wait_replicas(replicas: dict[str, Replica], ca_pem: str) -> None:
    """Wait for both replicas to be ready (the `tls` one over TLS, verified by the CA)."""
    import ssl

    async with aiohttp.ClientSession(headers=REPLICA_HEADERS) as session:
        await wait_ready(session, replicas["plain"])
        await wait_ready(session, replicas["tls"], ssl.create_default_context(cadata=ca_pem))


async def run(args: argparse.Namespace) -> list[Cell]:
    body = request_body()
    with tempfile.TemporaryDirectory() as directory:
        folder = Path(directory)
        replicas, ca_pem, sha256 = start_replicas(folder)
        tables = {name: folder / f"{name}.json" for name in replicas}
        for name, replica in replicas.items():
            write_table(tables[name], replica.port)
        tls_table = json.loads(tables["tls"].read_text())
        tls_table["node_ca_pem"] = ca_pem
        tls_table["deployments"]["mlp"]["replicas"][0]["tls_sha256"] = sha256
        tables["tls"].write_text(json.dumps(tls_table))
        ports = {name: free_port() for name in replicas}
        gateways = {name: start_gateway(tables[name], ports[name]) for name in replicas}
        targets = [Target(name, f"http://{HOST}:{ports[name]}", GATEWAY_HEADERS)
                   for name in replicas]
        try:
            await wait_replicas(replicas, ca_pem)
            async with aiohttp.ClientSession() as session:
                for target in targets:
                    await wait_proxy(session, target, gateways[target.name], body)
            pids = {name: process.pid for name, process in gateways.items()}
            return await measure(targets, args, body, pids, folder)
        finally:
            stop([*gateways.values(), *(r.process for r in replicas.values())])


async def pool_only(args: argparse.Namespace) -> None:
    """The upstream pool alone, in this process on uvloop: requests/s and this process's
    CPU per request, plain vs TLS, at each concurrency (no gateway, no load generator)."""
    import time

    from serving.gateway.node_tls import UpstreamTls, upstream_tls
    from serving.gateway.upstream import UpstreamPool

    body = request_body()
    headers = [(b"authorization", f"Bearer {KEY}".encode()),
               (b"content-type", b"application/json")]
    with tempfile.TemporaryDirectory() as directory:
        replicas, ca_pem, sha256 = start_replicas(Path(directory))
        try:
            await wait_replicas(replicas, ca_pem)
            print("| concurrency | path | requests/s | client CPU us/req | connections |")
            print("|---|---|---|---|---|")
            for concurrency in args.concurrency:
                for name, replica in replicas.items():
                    tls = upstream_tls(ca_pem, sha256, HOST) if name == "tls" else None
                    pool, done = UpstreamPool(), 0
                    end_s = time.monotonic() + args.duration_s

                    async def loop(port: int = replica.port, pool: UpstreamPool = pool,
                                   tls: UpstreamTls | None = tls,
                                   end_s: float = end_s) -> None:
                        nonlocal done
                        while time.monotonic() < end_s:
                            response = await pool.request(HOST, port, b"POST",
                                                          b"/v2/models/mlp/infer", headers,
                                                          body, tls=tls)
                            assert response.status == 200, response.status
                            done += 1
                    cpu_s = time.process_time()
                    await asyncio.gather(*(loop() for _ in range(concurrency)))
                    cpu_us = (time.process_time() - cpu_s) / done * 1e6
                    print(f"| {concurrency} | {name} | {done / args.duration_s:,.0f} | "
                          f"{cpu_us:.0f} | {pool.connections_opened} |")
                    pool.close()
        finally:
            stop(replica.process for replica in replicas.values())


def print_report(cells: list[Cell], args: argparse.Namespace) -> None:
    print_run_line("node TLS", args)
    print_cell_table(cells, "gateway -> replica", ["gateway CPU us/req"],
                     lambda cell: [f"{cell.cpu_us_per_request(cell.target):.0f}"])
    print_ratio_table(cells, args.concurrency, "plain", "tls", "TLS")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_cell_options(parser)
    add_client_options(parser)
    parser.add_argument("--pool-only", action="store_true",
                        help="measure the upstream pool alone, in this process (uvloop)")
    args = parser.parse_args()
    args.load_before = load_average()
    if args.pool_only:
        import uvloop
        uvloop.run(pool_only(args))
        print(f"\nload average {args.load_before} before, {load_average()} after")
        return
    print_report(asyncio.run(run(args)), args)


if __name__ == "__main__":
    main()
