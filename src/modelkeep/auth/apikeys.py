"""API keys: ``mk_<id>_<secret>`` bearer tokens.

Format, fixed so that secret scanners can spot a leaked key by its prefix and so that parsing
never has to guess::

    mk_<id>_<secret>
       id:     12 characters of lowercase base32 ``[a-z2-7]`` (60 random bits), public, the
               database key of the record
       secret: 43 characters of urlsafe base64 without padding (32 random bytes); may itself
               contain ``_`` and ``-``, which is why parsing is by position, not by splitting

Only ``hash_secret(secret)`` is stored. ``authenticate`` turns an ``Authorization`` header into a
``Principal`` or raises ``AuthFailure``, whose message is safe to show and never holds the token.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal

from modelkeep.auth.principal import Principal
from modelkeep.errors import InternalError, Unauthenticated

TOKEN_PREFIX = "mk_"  # noqa: S105  (a public marker for secret scanners, not a secret)

_ID_ALPHABET = "abcdefghijklmnopqrstuvwxyz234567"
_ID_LENGTH = 12
_SECRET_BYTES = 32
_SECRET_LENGTH = 43  # len(urlsafe_b64encode(32 bytes)) without the one "=" of padding
_TOKEN_LENGTH = len(TOKEN_PREFIX) + _ID_LENGTH + 1 + _SECRET_LENGTH
# Explicit ASCII classes and fullmatch: no locale, no Unicode digits, no trailing-newline slack.
_TOKEN_RE = re.compile(r"mk_([a-z2-7]{12})_([A-Za-z0-9_-]{43})")

AuthFailureReason = Literal["missing", "malformed", "invalid", "expired", "revoked"]


class AuthFailure(Unauthenticated):
    """Authentication refused. ``reason`` is for metrics and audit; ``message`` for the caller."""

    def __init__(self, message: str, *, reason: AuthFailureReason) -> None:
        super().__init__(message)
        self.reason: AuthFailureReason = reason


@dataclass(frozen=True, slots=True)
class NewApiKey:
    """A freshly generated key. ``token`` is shown to its owner once and never stored."""

    key_id: str
    token: str = field(repr=False)
    secret_hash: str


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """What the server keeps in memory per key, loaded from the metadata store."""

    key_id: str
    secret_hash: str = field(repr=False)
    role: str
    models: frozenset[str] | None
    description: str
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None


def hash_secret(secret: str) -> str:
    """Hex SHA-256 of ``secret``: the only form of a key secret that is ever stored.

    A fast hash is the right tool here, unlike for passwords: the secret is 256 random bits, so
    guessing it from a stolen hash is infeasible however fast each guess is, and a slow KDF
    (bcrypt, Argon2) would only add milliseconds to every authenticated request.
    """
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def generate_api_key() -> NewApiKey:
    """Create a new key from the OS CSPRNG. The token matches ``parse_token``'s format."""
    key_id = "".join(secrets.choice(_ID_ALPHABET) for _ in range(_ID_LENGTH))
    secret = secrets.token_urlsafe(_SECRET_BYTES)  # 43 chars, padding already stripped
    return NewApiKey(
        key_id=key_id,
        token=f"{TOKEN_PREFIX}{key_id}_{secret}",
        secret_hash=hash_secret(secret),
    )


def parse_token(token: str) -> tuple[str, str]:
    """Split an API key into ``(key_id, secret)``.

    Raises ``AuthFailure("malformed API key", reason="malformed")`` unless the whole token matches
    ``^mk_[a-z2-7]{12}_[A-Za-z0-9_-]{43}$``. The length is checked first, so hostile input of any
    size costs constant time.
    """
    if len(token) != _TOKEN_LENGTH:
        raise AuthFailure("malformed API key", reason="malformed")
    match = _TOKEN_RE.fullmatch(token)
    if match is None:
        raise AuthFailure("malformed API key", reason="malformed")
    return match.group(1), match.group(2)


def bearer_token(authorization: str | None) -> str:
    """Extract the token from an ``Authorization: Bearer <token>`` header value.

    Raises ``AuthFailure`` with reason ``missing`` when the header is absent or empty, and
    ``malformed`` unless it is exactly the scheme ``Bearer`` (any case), one space and a token
    without whitespace. The token itself is not checked here (API key or JWT).
    """
    if not authorization:
        raise AuthFailure("missing credentials", reason="missing")
    parts = authorization.split(" ")
    if len(parts) != 2:
        raise AuthFailure("malformed authorization header", reason="malformed")
    scheme, token = parts
    # isascii() first: lower() maps some non-ASCII letters onto ASCII ones.
    if not (scheme.isascii() and scheme.lower() == "bearer"):
        raise AuthFailure("malformed authorization header", reason="malformed")
    # Split on " " above; isprintable() is False for every other whitespace character (and
    # runs in C, where a per-character check costs more than the rest of authentication).
    if not token or not token.isprintable():
        raise AuthFailure("malformed authorization header", reason="malformed")
    return token


# Compared against when the key id is unknown, so that an unknown id costs the same hash and
# comparison as a known one and response timing does not reveal which ids exist.
_DUMMY_HASH = hash_secret(secrets.token_urlsafe(_SECRET_BYTES))


def authenticate(
    authorization: str | None, keys: Mapping[str, KeyRecord], *, now: datetime
) -> Principal:
    """Verify an ``Authorization`` header against the known keys and return the principal.

    Raises ``AuthFailure`` (an ``Unauthenticated``) with reason ``missing``, ``malformed``,
    ``invalid`` (unknown id or wrong secret, indistinguishable), ``revoked`` or ``expired``.
    Revocation and expiry are only reported once the secret matched, so they leak nothing to
    someone who merely knows a key id. ``now`` must be timezone-aware. No message holds the token.
    """
    if now.tzinfo is None or now.utcoffset() is None:
        raise InternalError("authenticate needs a timezone-aware clock")

    # 1. The header carries a well-formed API key.
    key_id, secret = parse_token(bearer_token(authorization))

    # 2. The secret matches the stored hash, compared in constant time; an unknown id is
    #    compared against a dummy hash so both paths do the same work.
    record = keys.get(key_id)
    expected = record.secret_hash if record is not None else _DUMMY_HASH
    matches = hmac.compare_digest(
        hash_secret(secret).encode("ascii"), expected.encode("utf-8", "replace")
    )
    if record is None or not matches:
        raise AuthFailure("invalid API key", reason="invalid")

    # 3. The key was not revoked.
    if record.revoked_at is not None:
        raise AuthFailure("API key revoked", reason="revoked")

    # 4. The key has not expired: it is valid strictly before expires_at.
    if record.expires_at is not None and record.expires_at <= now:
        raise AuthFailure("API key expired", reason="expired")

    return Principal(
        key_id=record.key_id,
        role=record.role,
        models=record.models,
        description=record.description,
        expires_at=record.expires_at,
    )
