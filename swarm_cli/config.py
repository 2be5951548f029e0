"""Where `swarm` keeps the portal URL and API token: a 0600 JSON file, env overrides.

The file is `$XDG_CONFIG_HOME/swarm/config.json` (or `~/.config/swarm/config.json`);
SWARM_URL and SWARM_TOKEN win over it, so scripts and CI need no file at all.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

URL_ENV, TOKEN_ENV = "SWARM_URL", "SWARM_TOKEN"


class ConfigError(Exception):
    """The configuration is missing or unusable: a message for the user."""


@dataclass(frozen=True)
class Config:
    url: str
    token: str


def config_path() -> Path:
    """Return the config file's path (it may not exist)."""
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "swarm" / "config.json"


def checked_url(url: str) -> str:
    """Return `url` without a trailing slash; ConfigError unless it is http(s)://host[...]."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"not a portal URL: {url!r} (expected http://host:port or https://host)")
    return url.strip().rstrip("/")


def _read_file() -> dict[str, str]:
    path = config_path()
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None
    return data if isinstance(data, dict) else {}


def load() -> Config:
    """Return the URL and token to use; ConfigError when either is unknown."""
    stored = _read_file()
    url = os.environ.get(URL_ENV) or stored.get("url") or ""
    token = os.environ.get(TOKEN_ENV) or stored.get("token") or ""
    if not url or not token:
        raise ConfigError(f"not logged in: run `swarm login URL` (or set {URL_ENV} and "
                          f"{TOKEN_ENV})")
    return Config(checked_url(url), token)


def load_url() -> str | None:
    """Return the portal URL from the environment or the file, if either has one."""
    url = os.environ.get(URL_ENV) or _read_file().get("url")
    return checked_url(url) if url else None


def save(config: Config) -> Path:
    """Write the config file with mode 0600 (its folder 0700); return its path."""
    path = config_path()
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    # Created 0600 before any byte is written: the token is never readable by others.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # an older file may have had looser bits
    with os.fdopen(fd, "w") as file:
        json.dump({"url": config.url, "token": config.token}, file)
        file.write("\n")
    return path


def forget() -> bool:
    """Delete the config file; return whether there was one."""
    try:
        config_path().unlink()
    except FileNotFoundError:
        return False
    return True
