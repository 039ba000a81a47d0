"""Credential checks for channels, compared in constant time, built once per deploy."""

from __future__ import annotations

import base64
import hmac
from typing import Protocol

from esb.config import ApiKeyDef, BasicAuthDef


class CredentialCheck(Protocol):
    challenge: str | None

    def is_allowed(self, headers: dict[str, str]) -> bool: ...


class BasicAuthCheck:
    """HTTP basic auth against one username and password."""

    def __init__(self, username: str, password: str, realm: str = "esb"):
        token = base64.b64encode(f"{username}:{password}".encode()).decode("ascii")
        self._expected = f"Basic {token}".encode()
        self._has_password = bool(password)
        self.challenge = f'Basic realm="{realm}"'

    @classmethod
    def from_def(cls, definition: BasicAuthDef) -> BasicAuthCheck:
        return cls(definition.username, definition.password, definition.realm)

    def is_allowed(self, headers: dict[str, str]) -> bool:
        given = headers.get("AUTHORIZATION", "").encode()
        # An empty password never matches: a missing secret must not open the door.
        return hmac.compare_digest(given, self._expected) and self._has_password


class ApiKeyCheck:
    """A secret value in a named header."""

    challenge = None

    def __init__(self, header: str, value: str):
        self._header = header.upper()
        self._expected = value.encode()

    @classmethod
    def from_def(cls, definition: ApiKeyDef) -> ApiKeyCheck:
        return cls(definition.header, definition.value)

    def is_allowed(self, headers: dict[str, str]) -> bool:
        given = headers.get(self._header, "").encode()
        return hmac.compare_digest(given, self._expected) and bool(self._expected)
