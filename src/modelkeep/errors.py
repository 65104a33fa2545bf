"""One error tree for modelkeep.

Every error carries a neutral ``code``; ``api/`` maps codes to HTTP status and ``cli/`` to exit
codes, each in one place. ``message`` is written for the honest caller and is safe to show: it
never holds a path, a secret or a stack trace. Foreign exceptions are translated where they enter,
with ``raise ... from exc``.

    ModelkeepError                 code
    ├── InvalidInput               invalid_input     malformed request, bad tensor, bad name
    ├── Unauthenticated            unauthenticated   no, malformed, unknown, expired or revoked key
    ├── Forbidden                  forbidden         authenticated but not allowed
    ├── NotFound                   not_found         no such model, version, label or key
    ├── Conflict                   conflict          already exists, concurrent change lost
    ├── TooLarge                   too_large         body, upload or tensor over its limit
    ├── ModelRefused               model_refused     an artifact modelkeep will not serve
    ├── RateLimited                rate_limited      over a limit; carries retry_after
    ├── Unavailable                unavailable       not ready, shutting down; carries retry_after
    │   └── KeyServiceError        unavailable       key service unreachable, sealed, refusing, or
    │                                                no longer holding the KEK that wrapped a key
    ├── IntegrityError             integrity         a sealed artifact or digest failed verification
    ├── ConfigError                config            settings or data dir unusable
    └── InternalError              internal          a bug; details are logged, never shown
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class ModelkeepError(Exception):
    """Base of every modelkeep error. ``message`` is safe to show to any caller."""

    code = "internal"

    def __init__(
        self,
        message: str,
        *,
        retry_after: float | None = None,
        details: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after
        # Structured, showable context (e.g. a scan report); never internal state.
        self.details = details


class InvalidInput(ModelkeepError):
    code = "invalid_input"


class Unauthenticated(ModelkeepError):
    code = "unauthenticated"


class Forbidden(ModelkeepError):
    code = "forbidden"


class NotFound(ModelkeepError):
    code = "not_found"


class Conflict(ModelkeepError):
    code = "conflict"


class TooLarge(ModelkeepError):
    code = "too_large"


class ModelRefused(ModelkeepError):
    code = "model_refused"


class RateLimited(ModelkeepError):
    code = "rate_limited"


class Unavailable(ModelkeepError):
    code = "unavailable"


class KeyServiceError(Unavailable):
    """The key service could not wrap or unwrap a data key; nothing falls back to another key.

    ``retry_after`` is set when the cause may pass (unreachable, sealed, credentials refused);
    it is None when the key-encryption key that wrapped the data key is gone for good.
    """


class IntegrityError(ModelkeepError):
    """A sealed artifact, wrapped key or digest did not verify. Deliberately opaque."""

    code = "integrity"


class ConfigError(ModelkeepError):
    code = "config"


class InternalError(ModelkeepError):
    code = "internal"
