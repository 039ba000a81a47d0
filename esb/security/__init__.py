"""Channel security: basic_auth and api_key checks."""

from esb.security.checks import ApiKeyCheck, BasicAuthCheck, CredentialCheck

__all__ = ["ApiKeyCheck", "BasicAuthCheck", "CredentialCheck"]
