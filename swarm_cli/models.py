"""`swarm models ...`, `swarm versions MODEL`, `swarm alias ...`: the model registry."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn

from swarm_cli import output
from swarm_cli.client import api, fail

UPLOAD_READ_TIMEOUT_S = 900.0  # the portal validates the upload before it answers
MODEL_COLUMNS = ["name", "latest_version", "aliases", "owner", "description"]
VERSION_COLUMNS = ["number", "format", "size_bytes", "sha256", "created_by", "created_at"]

models_app = typer.Typer(help="Models in the registry: list, create, upload a version.",
                         no_args_is_help=True)
alias_app = typer.Typer(help="Aliases (e.g. production): point at a version, roll back.",
                        no_args_is_help=True)


@models_app.command("list")
def list_models() -> None:
    """List the models with their latest version and aliases."""
    output.emit(api().list_all("/api/models/"), MODEL_COLUMNS)


@models_app.command("create")
def create_model(name: str, description: Annotated[str, typer.Option(help="free text")] = "",
                 ) -> None:
    """Create an empty model (upload versions to it next)."""
    output.emit(api().post("/api/models/", {"name": name, "description": description}),
                MODEL_COLUMNS)


def json_option(value: str, what: str) -> Any:
    """Return `value` parsed as JSON, or the JSON in the file it names; exit 1 if neither."""
    text = value
    if not value.lstrip().startswith(("{", "[")):
        try:
            text = Path(value).read_text()
        except OSError as exc:
            fail(f"{what}: cannot read {value}: {exc.strerror}")
    try:
        return json.loads(text)
    except ValueError as exc:
        fail(f"{what} is not valid JSON: {exc}")


def upload_fields(signature: str, metadata: str | None, artifact_format: str | None,
                  ) -> dict[str, str]:
    """Return the multipart form fields besides the file (`auto`: the portal infers it)."""
    fields: dict[str, str] = {}
    if signature != "auto":
        fields["signature"] = json.dumps(json_option(signature, "--signature"))
    if metadata is not None:
        fields["metadata"] = json.dumps(json_option(metadata, "--metadata"))
    if artifact_format:
        fields["format"] = artifact_format
    return fields


@models_app.command("upload")
def upload(
    model: str,
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, readable=True,
                                         help="the .pt/.pt2 (or other accepted) artifact")],
    signature: Annotated[str, typer.Option(
        help='"auto" (the portal infers it), a JSON file, or inline JSON '
             '{"inputs": [...], "outputs": [...]}')] = "auto",
    metadata: Annotated[str | None, typer.Option(help="a JSON object, inline or a file")] = None,
    artifact_format: Annotated[str | None, typer.Option(
        "--format", help="checked against the archive; detected if left out")] = None,
) -> None:
    """Upload a new version of MODEL from FILE (streamed, with a progress bar)."""
    fields = upload_fields(signature, metadata, artifact_format)
    client = api()
    size_bytes = file.stat().st_size
    show = output.stderr.is_terminal and not output.wants_json()
    columns = [*Progress.get_default_columns()[:1], BarColumn(), DownloadColumn(),
               TimeRemainingColumn()]
    with Progress(*columns, console=output.stderr, transient=True, disable=not show) as bar, \
            bar.open(file, "rb", total=size_bytes, description=f"uploading {file.name}") as body:
        version = client.request(
            "POST", f"/api/models/{model}/versions/", data=fields,
            files={"artifact": (file.name, body, "application/octet-stream")},
            timeout=httpx.Timeout(30.0, read=UPLOAD_READ_TIMEOUT_S, write=None))
    output.emit(version, ["model", "number", "format", "sha256", "size_bytes", "signature"])


def versions(model: str) -> None:
    """List the versions of MODEL, newest first."""
    rows = api().list_all(f"/api/models/{model}/versions/")
    output.emit(rows, VERSION_COLUMNS)


@alias_app.command("list")
def list_aliases(model: str) -> None:
    """List MODEL's aliases and the version each points at."""
    output.emit(api().get(f"/api/models/{model}/aliases/"), ["name", "version", "updated_at"])


@alias_app.command("set")
def set_alias(model: str, alias: str, version: int) -> None:
    """Point ALIAS of MODEL at VERSION (creates the alias when new)."""
    output.emit(api().request("PUT", f"/api/models/{model}/aliases/{alias}/",
                              json={"version": version}))


@alias_app.command("rollback")
def rollback_alias(model: str, alias: str) -> None:
    """Move ALIAS back to the version it pointed at before its last move."""
    output.emit(api().post(f"/api/models/{model}/aliases/{alias}/rollback/"))


@alias_app.command("history")
def alias_history(model: str, alias: str) -> None:
    """List every move of ALIAS, newest first."""
    rows = api().list_all(f"/api/models/{model}/aliases/{alias}/history/")
    output.emit(rows, ["from_version", "to_version", "moved_by", "moved_at", "is_rollback"])
