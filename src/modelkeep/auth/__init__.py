"""Who is calling: principals and the credentials that prove them (API keys).

``authenticate`` turns an ``Authorization`` header into a ``Principal`` or raises
``AuthFailure``; what the principal may then do is decided by ``modelkeep.policy``.
"""

from modelkeep.auth.apikeys import (
    TOKEN_PREFIX,
    AuthFailure,
    AuthFailureReason,
    KeyRecord,
    NewApiKey,
    authenticate,
    bearer_token,
    generate_api_key,
    hash_secret,
    parse_token,
)
from modelkeep.auth.principal import ROLES, Principal

__all__ = [
    "ROLES",
    "TOKEN_PREFIX",
    "AuthFailure",
    "AuthFailureReason",
    "KeyRecord",
    "NewApiKey",
    "Principal",
    "authenticate",
    "bearer_token",
    "generate_api_key",
    "hash_secret",
    "parse_token",
]
