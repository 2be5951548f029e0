"""The `swarm` command: login, then the registry, deployments, access, nodes and events.

It talks to the portal's REST API (and /v2 for `infer`) only. `app` is the console script
(pyproject: `swarm = "swarm_cli.main:app"`): it runs the Typer command `cli` and returns the
exit code, so usage errors exit 1 like other client errors (Click's own code is 2, which
here means "refused by the portal").
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Annotated

import typer

from swarm_cli import config, output
from swarm_cli.access import keys_app, tokens_app
from swarm_cli.client import EXIT_USAGE, Client, fail
from swarm_cli.deploy import deploy_app
from swarm_cli.events import events
from swarm_cli.infer import infer
from swarm_cli.logs import logs
from swarm_cli.models import alias_app, models_app, versions
from swarm_cli.nodes import nodes_app

PASSWORD_ENV = "SWARM_PASSWORD"  # noqa: S105 - a variable name
EPILOG = ("Exit codes: 0 done; 1 usage or client-side error (bad option, file, URL, not logged "
          "in); 2 refused by the portal (a 4xx answer: unknown name, bad value, no "
          "permission); 3 the portal failed or could not be reached (5xx, network, timeout). "
          "Errors are one line on stderr. --json prints results as JSON on stdout for scripts "
          "(allowed anywhere on the line). Config: $XDG_CONFIG_HOME/swarm/config.json (0600); "
          "SWARM_URL and SWARM_TOKEN override it.")

cli = typer.Typer(name="swarm", help="Swarm Portal from the command line (REST API client).",
                  epilog=EPILOG, no_args_is_help=True, add_completion=False,
                  pretty_exceptions_enable=False)
cli.add_typer(models_app, name="models")
cli.add_typer(alias_app, name="alias")
cli.add_typer(deploy_app, name="deploy")
cli.add_typer(keys_app, name="keys")
cli.add_typer(tokens_app, name="tokens")
cli.add_typer(nodes_app, name="nodes")
cli.command("versions")(versions)
cli.command("events")(events)
cli.command("logs")(logs)
cli.command("infer")(infer)


@cli.callback()
def root(json_output: Annotated[bool, typer.Option(
        "--json", help="print results as JSON (for scripts)")] = False) -> None:
    output.STATE.json = json_output


def _password(password_stdin: bool) -> str:
    if password_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    return os.environ.get(PASSWORD_ENV) or typer.prompt("Password", hide_input=True)


@cli.command()
def login(
    url: str,
    username: Annotated[str | None, typer.Option(help="default: asked")] = None,
    password_stdin: Annotated[bool, typer.Option(
        help=f"read the password from stdin (or set {PASSWORD_ENV}); never an argument")] = False,
    token_stdin: Annotated[bool, typer.Option(
        help="read an API token (e.g. from `make token`) from stdin instead")] = False,
) -> None:
    """Log in to the portal at URL and keep an API token in the config file (0600)."""
    try:
        portal = config.checked_url(url)
    except config.ConfigError as exc:
        fail(str(exc))
    if token_stdin:
        token = sys.stdin.readline().strip()
        who = "token"
        Client(portal, token).get("/api/models/", limit=1)  # refused (2) if the token is not
    else:
        who = username or typer.prompt("Username")
        reply = Client(portal).post("/api/auth/login/",
                                    {"username": who, "password": _password(password_stdin)})
        token = reply["token"]
    path = config.save(config.Config(portal, token))
    if output.wants_json():
        output.emit({"url": portal, "config": str(path)})
    else:
        output.note(f"Logged in to {portal} ({who}); the token is in {path} (mode 0600).")


@cli.command()
def logout() -> None:
    """Forget the stored token (it stays valid on the portal until it expires)."""
    forgotten = config.forget()
    output.note(f"removed {config.config_path()}" if forgotten else "not logged in")


def _hoist_json(args: list[str]) -> list[str]:
    """Move --json to the front, so `swarm models list --json` works like `swarm --json ...`."""
    end = args.index("--") if "--" in args else len(args)
    if "--json" not in args[:end]:
        return args
    return ["--json", *[arg for i, arg in enumerate(args) if arg != "--json" or i >= end]]


def app(argv: Sequence[str] | None = None) -> int:
    """Run `swarm` with `argv` (default: sys.argv[1:]); return the exit code."""
    args = _hoist_json(list(sys.argv[1:] if argv is None else argv))
    try:
        result = cli(args=args, prog_name="swarm", standalone_mode=False)
    except typer.TyperException as exc:  # usage errors (and `swarm` alone: its help)
        show = getattr(exc, "show", None)
        show() if callable(show) else print(f"swarm: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except typer.Abort:
        print("swarm: error: aborted", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(app())
