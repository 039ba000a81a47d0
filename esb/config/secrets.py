"""Secrets in definitions and URLs: stored as written, never shown.

A ``[[security.basic_auth]]`` password, a ``[[security.api_key]]`` value and the password
in a URL (``amqp://user:pw@host``, an SQL outconn's ``url``) are secrets. Their fields are
declared with ``secret_field`` or ``url_field`` (kept out of ``repr``, so a definition in a
log line or a traceback shows no secret), and whatever prints a definition or a URL goes
through ``masked`` or ``masked_url``, the one place that knows how to hide them. A URL
whose password cannot be told apart from the rest is refused at deploy (``url_problem``).
Better still, definitions name them as ``$ENV{...}``: then the ODB holds no secret at all
(the README says so).
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

MASK = "**"


def secret_field(**kwargs: Any) -> Any:
    """A dataclass field holding a secret: left out of repr, shown masked (a table of
    driver arguments, ``connect_args``, shown with every value masked)."""
    metadata = dict(kwargs.pop("metadata", {}) or {}) | {"secret": True}
    return dataclasses.field(repr=False, metadata=metadata, **kwargs)


def url_field(**kwargs: Any) -> Any:
    """A dataclass field holding a URL that may carry a password: left out of repr,
    shown through ``masked_url``."""
    metadata = dict(kwargs.pop("metadata", {}) or {}) | {"url": True}
    return dataclasses.field(repr=False, metadata=metadata, **kwargs)


_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://")
# A query parameter that names a secret (?password=..., &sslpassword=..., ?token=...).
_SECRET_PARAM = re.compile(r"([?&;][^=&;#]*(?:pass|pwd|secret|token)[^=&;#]*=)[^&;#]*", re.IGNORECASE)
_BAD_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")
RESERVED_ADVICE = (
    "the user name or password holds a character that URLs reserve ('@', '/', '?', '#', ...) "
    "unencoded, or an '@' follows the host; percent-encode it ('@' as %40, '/' as %2F, "
    "'?' as %3F, '#' as %23, '%' as %25)"
)


def _userinfo_split(url: str) -> tuple[str, str | None, str] | None:
    """(scheme with ``://``, userinfo or None, the rest after it) of URL, or None when its
    userinfo cannot be told apart from the rest with certainty.

    A userinfo ends at the authority's last '@', and the authority at the first '/', '?'
    or '#'. A password holding one of those unencoded moves that end into the password;
    such a URL shows as an '@' after the authority (or two '@' in it), and is None: no
    reading of it is safe to print.
    """
    scheme = _SCHEME.match(url)
    if scheme is None:
        return None if "@" in url else ("", None, url)
    rest = url[scheme.end():]
    end = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
    authority, tail = rest[:end], rest[end:]
    if "@" in tail:
        return None
    if "@" not in authority:
        return scheme.group(0), None, rest
    userinfo, host = authority.rsplit("@", 1)
    if "@" in userinfo:
        return None
    return scheme.group(0), userinfo, host + tail


def masked_url(url: str) -> str:
    """URL fit to print: its password, and any query parameter naming a secret, as
    ``**``; the rest as written. A URL whose password cannot be told apart from the rest
    (an unencoded '@', '/', '?' or '#' in it) shows its scheme only."""
    parts = _userinfo_split(url)
    if parts is None:
        scheme = _SCHEME.match(url)
        return f"{scheme.group(0) if scheme else ''}<hidden: reserved characters unencoded>"
    scheme, userinfo, rest = parts
    if userinfo is not None and ":" in userinfo:
        userinfo = f"{userinfo.split(':', 1)[0]}:{MASK}"
    rest = _SECRET_PARAM.sub(lambda m: m.group(1) + MASK, rest)
    return f"{scheme}{userinfo}@{rest}" if userinfo is not None else f"{scheme}{rest}"


def url_problem(url: str) -> str | None:
    """Why URL cannot be read safely (for a deploy to refuse), or None. The answer never
    holds any part of URL."""
    parts = _userinfo_split(url)
    if parts is None:
        return RESERVED_ADVICE
    userinfo = parts[1]
    if userinfo is not None and _BAD_PERCENT.search(userinfo):
        return RESERVED_ADVICE
    return None


def masked(definition: Any) -> dict[str, Any]:
    """A definition as a dict fit to print: secret fields masked, URLs without passwords."""
    shown: dict[str, Any] = {}
    for f in dataclasses.fields(definition):
        value = getattr(definition, f.name)
        if f.metadata.get("secret") and value:
            if isinstance(value, dict):
                value = dict.fromkeys(value, MASK)
            else:
                value = MASK if "$ENV{" not in str(value) else value
        elif isinstance(value, str) and (f.metadata.get("url") or f.name == "url" or f.name.endswith("_url")):
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
