"""Secrets in definitions and URLs: stored as written, never shown.

A ``[[security.basic_auth]]`` password, a ``[[security.api_key]]`` value and the password
in a URL (``amqp://user:pw@host``, an SQL outconn's ``url``) are secrets. Their fields are
declared with ``secret_field`` (kept out of ``repr``, so a definition in a log line or a
traceback shows no secret), and whatever prints a definition or a URL goes through
``masked`` or ``masked_url``. Better still, definitions name them as ``$ENV{...}``: then the
ODB holds no secret at all (the README says so).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

MASK = "**"


def secret_field(**kwargs: Any) -> Any:
    """A dataclass field holding a secret: left out of repr, shown masked."""
    metadata = dict(kwargs.pop("metadata", {}) or {}) | {"secret": True}
    return dataclasses.field(repr=False, metadata=metadata, **kwargs)


def masked_url(url: str) -> str:
    """URL with its password, if it has one, replaced by ``**``; the rest as written."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        host = parts.netloc.rsplit("@", 1)[1]
        return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:{MASK}@{host}"))
    except ValueError:
        return "<unparsable url>"


def masked(definition: Any) -> dict[str, Any]:
    """A definition as a dict fit to print: secret fields masked, URLs without passwords."""
    shown: dict[str, Any] = {}
    for f in dataclasses.fields(definition):
        value = getattr(definition, f.name)
        if f.metadata.get("secret") and value:
            value = MASK if "$ENV{" not in str(value) else value
        elif isinstance(value, str) and (f.name == "url" or f.name.endswith("_url")):
            value = masked_url(value)
        shown[f.name] = value
    return shown


def keep_private(directory: Path, odb_url: str) -> list[str]:
    """Make a server directory its owner's only: the directory, ``run/`` and ``logs/`` 0700
    with their files 0600, and a SQLite ODB (with its -wal and -shm) 0600.

    New files are private by the umask every esb process sets; this covers files made
    before that (an older esb, a copied directory). Answers the paths it changed.
    """
    changed: list[str] = []

    def tighten(path: Path, mode: int) -> None:
        try:
            if path.is_symlink() or path.stat().st_mode & 0o777 == mode:
                return
            path.chmod(mode)
            changed.append(str(path))
        except OSError:
            pass  # gone meanwhile, or not ours: nothing to tighten

    tighten(directory, 0o700)
    for sub in ("run", "logs"):
        root = directory / sub
        if not root.is_dir():
            continue
        tighten(root, 0o700)
        for path in root.rglob("*"):
            tighten(path, 0o700 if path.is_dir() else 0o600)
    if odb_url.startswith("sqlite:///"):
        odb = Path(odb_url.removeprefix("sqlite:///"))
        for path in (odb, odb.with_name(odb.name + "-wal"), odb.with_name(odb.name + "-shm")):
            if path.exists():
                tighten(path, 0o600)
    return changed
