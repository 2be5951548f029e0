"""`swarm keys ...` (API keys for /v2 clients) and `swarm tokens ...` (join tokens)."""

from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import Annotated, Any

import typer

from swarm_cli import output
from swarm_cli.client import api, fail

KEY_COLUMNS = ["id", "name", "prefix", "deployments", "all_deployments", "rate_limit_rps",
               "rate_limit_tokens_per_minute", "status", "expires_at"]
TOKEN_COLUMNS = ["id", "name", "prefix", "uses_left", "status", "expires_at", "created_by"]
ExpiresOption = Annotated[float | None, typer.Option(help="lifetime in hours; default: never")]

keys_app = typer.Typer(help="API keys for /v2 clients: the secret is shown once.",
                       no_args_is_help=True)
tokens_app = typer.Typer(help="Join tokens for new GPU servers: the secret is shown once.",
                         no_args_is_help=True)


def _without_none(**fields: Any) -> dict[str, Any]:
    return {key: value for key, value in fields.items() if value is not None}


@keys_app.command("list")
def list_keys() -> None:
    """List API keys (never their secrets)."""
    output.emit(api().list_all("/api/api-keys/"), KEY_COLUMNS)


@keys_app.command("create")
def create_key(
    name: str,
    deployment: Annotated[list[str] | None, typer.Option(
        help="a deployment the key may call (repeat); default: every deployment")] = None,
    expires_in_hours: ExpiresOption = None,
    rate_limit_rps: Annotated[float | None, typer.Option(help="requests per second")] = None,
    burst: Annotated[int | None, typer.Option(help="extra requests allowed at once")] = None,
    tokens_per_minute: Annotated[int | None, typer.Option(
        help="tokens of generative answers per minute; default: no limit")] = None,
) -> None:
    """Create an API key; its secret is printed once (store it: it cannot be shown again)."""
    body = _without_none(name=name, deployments=deployment or None,
                         expires_in_hours=expires_in_hours, rate_limit_rps=rate_limit_rps,
                         burst=burst, rate_limit_tokens_per_minute=tokens_per_minute)
    key = api().post("/api/api-keys/", body)
    output.emit(key, [*KEY_COLUMNS, "key"])
    if not output.wants_json():
        output.note("The key is shown only now: it is stored hashed. Clients send "
                    "`Authorization: Bearer KEY`.")


@keys_app.command("revoke")
def revoke_key(key_id: Annotated[int, typer.Argument(metavar="ID")]) -> None:
    """Revoke API key ID at once (see `swarm keys list`)."""
    output.emit(api().post(f"/api/api-keys/{key_id}/revoke/"), KEY_COLUMNS)


@tokens_app.command("list")
def list_tokens() -> None:
    """List join tokens (never their secrets)."""
    output.emit(api().list_all("/api/join-tokens/"), TOKEN_COLUMNS)


def write_secret(path: Path, secret: str) -> None:
    """Write `secret` to a new file readable only by its owner; exit 1 if it exists."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        fail(f"{path} exists: choose a new file for the token")
    except OSError as exc:
        fail(f"cannot write {path}: {exc.strerror}")
    with os.fdopen(fd, "w") as file:
        file.write(secret + "\n")


def join_command(portal_url: str, token_file: Path | None) -> str:
    """Return the `swarm-worker` command; the token comes from a file or the environment."""
    command = f"swarm-worker --portal {shlex.quote(portal_url)}"
    if token_file is not None:
        return f"{command} --token-file {shlex.quote(str(token_file.resolve()))}"
    return command


@tokens_app.command("create")
def create_token(
    name: str,
    uses: Annotated[int | None, typer.Option(
        help="how many servers may join; default: any")] = None,
    expires_in_hours: ExpiresOption = None,
    token_file: Annotated[Path | None, typer.Option(
        help="write the secret to this new 0600 file instead of printing it")] = None,
) -> None:
    """Create a join token and print the command that joins a GPU server with it."""
    client = api()
    token = client.post("/api/join-tokens/",
                        _without_none(name=name, uses=uses, expires_in_hours=expires_in_hours))
    secret = token["token"]
    if token_file is not None:
        write_secret(token_file, secret)
        token = {**token, "token": None, "token_file": str(token_file.resolve())}
    command = join_command(client.url, token_file)
    if output.wants_json():
        output.emit({**token, "command": command,
                     "environment": {} if token_file else {"SWARM_JOIN_TOKEN": secret}})
        return
    print_join_instructions(secret, command, token_file)


def print_join_instructions(secret: str, command: str, token_file: Path | None) -> None:
    """Tell a person how to join: the secret goes in the environment or a file, never argv."""
    if token_file is not None:
        output.note(f"Join token written to {token_file} (0600). Copy it to the GPU server, "
                    "then run there:")
        print(command)
        return
    output.note("Join token (shown only now; stored hashed). On the GPU server run:")
    print(f"export SWARM_JOIN_TOKEN={secret}")
    print(command)
