"""AWS KMS as the key service: data keys wrapped by ``Encrypt`` under one symmetric KMS key.

The caller's context goes into KMS's encryption context (``modelkeep-context``, base64), so a
wrapped key decrypts only under the same binding; for a model version the context also names
the model and version in the clear, which is what CloudTrail shows an operator. The key id
recorded next to a wrapped key is ``awskms:`` and the KMS key's id (its UUID).

Rotation: KMS rotates key material itself (automatic or on-demand rotation) and keeps
decrypting under older material, so there is nothing to re-wrap for it. Moving to another KMS
key is pointing the configured alias (or setting) at it and running
``modelkeep kek rotate --rewrap-only``: ``ReEncrypt`` moves every data key inside KMS. A data key
wrapped by a key that is disabled or pending deletion is refused (KeyServiceError without
retry), never served.

Tested against moto's KMS-compatible server, not a real AWS account (docs/scale-out.md).
"""

from __future__ import annotations

import base64
import logging
import threading
from typing import TYPE_CHECKING, Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, ConnectionError, ReadTimeoutError

from modelkeep.crypto.sealed import model_and_version_of
from modelkeep.errors import ConfigError, IntegrityError, InvalidInput, KeyServiceError

if TYPE_CHECKING:
    from modelkeep.settings import Settings

log = logging.getLogger(__name__)

_RETRY_S = 5.0
_FAILED = "data key failed verification"
_RETIRED = {"DisabledException", "KMSInvalidStateException", "NotFoundException"}
_REFUSED = {"AccessDeniedException", "UnrecognizedClientException", "InvalidSignatureException"}


class KmsKeyService:
    """Wraps data keys with one KMS key (id, ARN or alias); every call bounded by ``timeout_s``."""

    def __init__(
        self,
        key: str,
        *,
        region: str | None = None,
        endpoint_url: str | None = None,
        timeout_s: float = 5.0,
    ) -> None:
        self._key = key
        config = Config(
            connect_timeout=timeout_s,
            read_timeout=timeout_s,
            retries={"max_attempts": 2, "mode": "standard"},
        )
        try:
            self._kms = boto3.session.Session().client(
                "kms", region_name=region, endpoint_url=endpoint_url, config=config
            )
        except BotoCoreError as exc:
            raise ConfigError("the AWS KMS client cannot be set up (region?)") from exc
        self._key_uuid: str | None = None
        # The key of this thread's last wrap or rewrap: what ``key_id`` reports right after one.
        self._made = threading.local()
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Settings) -> KmsKeyService:
        key = settings.key_service_key
        if settings.key_service.startswith("awskms:"):
            key = settings.key_service.removeprefix("awskms:")
        if not key:
            raise ConfigError(
                "the awskms key service needs a key: MODELKEEP_KEY_SERVICE=awskms:alias/NAME "
                "(or a key id or ARN), or MODELKEEP_KEY_SERVICE_KEY"
            )
        return cls(
            key,
            region=settings.key_service_region,
            endpoint_url=settings.key_service_endpoint,
            timeout_s=settings.key_service_timeout_s,
        )

    # -- the KeyService protocol -------------------------------------------------------------

    @property
    def key_id(self) -> str:
        """``awskms:<key uuid>`` of the key this thread's last wrap or rewrap used, else of the
        key this process last resolved."""
        uuid: str | None = getattr(self._made, "uuid", None) or self._key_uuid
        if uuid is None:
            return self.rotate(new_key=False)
        return f"awskms:{uuid}"

    def wrap(self, data_key: bytes, context: bytes) -> bytes:
        """``Encrypt`` under the configured key with the context as encryption context."""
        answer = self._call(
            "encrypt", KeyId=self._key, Plaintext=data_key, EncryptionContext=_context(context)
        )
        self._seen(answer)
        return bytes(answer["CiphertextBlob"])

    def unwrap(self, wrapped: bytes, context: bytes) -> bytes:
        """``Decrypt``; IntegrityError if ``wrapped`` or ``context`` does not match."""
        answer = self._call("decrypt", CiphertextBlob=wrapped, EncryptionContext=_context(context))
        return bytes(answer["Plaintext"])

    def rewrap(self, wrapped: bytes, context: bytes) -> bytes:
        """``ReEncrypt`` to the configured key: the data key never leaves KMS."""
        labels = _context(context)
        answer = self._call(
            "re_encrypt",
            CiphertextBlob=wrapped,
            SourceEncryptionContext=labels,
            DestinationKeyId=self._key,
            DestinationEncryptionContext=labels,
        )
        self._seen(answer)
        return bytes(answer["CiphertextBlob"])

    def rotate(self, *, new_key: bool) -> str:
        """The key id the configured key (or alias) names now; KMS makes new material itself."""
        if new_key:
            raise InvalidInput(
                "AWS KMS rotates key material itself and keeps decrypting older material; to "
                "move to another KMS key, point the alias at it and run "
                "`modelkeep kek rotate --rewrap-only`"
            )
        answer = self._call("describe_key", KeyId=self._key)
        self._seen(answer["KeyMetadata"])
        uuid: str | None = self._made.uuid
        if uuid is None:
            raise KeyServiceError("the key service gave a malformed answer", retry_after=_RETRY_S)
        return f"awskms:{uuid}"

    def close(self) -> None:
        self._kms.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(key={self._key!r})"

    # -- plumbing ----------------------------------------------------------------------------

    def _seen(self, answer: dict[str, Any]) -> None:
        uuid = str(answer.get("KeyId", "")).rsplit("/", 1)[-1] or None
        self._made.uuid = uuid
        with self._lock:
            self._key_uuid = uuid or self._key_uuid

    def _call(self, operation: str, **kwargs: Any) -> dict[str, Any]:
        try:
            answer: dict[str, Any] = getattr(self._kms, operation)(**kwargs)
        except (ConnectionError, ReadTimeoutError) as exc:
            raise KeyServiceError(
                "the key service is unreachable or did not answer in time", retry_after=_RETRY_S
            ) from exc
        except ClientError as exc:
            raise _translate(exc, operation) from exc
        except BotoCoreError as exc:
            raise KeyServiceError("the key service is unreachable", retry_after=_RETRY_S) from exc
        return answer


def _translate(exc: ClientError, operation: str) -> Exception:
    code = str(exc.response.get("Error", {}).get("Code", ""))
    if code in ("InvalidCiphertextException", "IncorrectKeyException"):
        return IntegrityError(_FAILED)
    if code == "NotFoundException" and operation in ("encrypt", "describe_key"):
        return KeyServiceError("the key service has no such KMS key", retry_after=_RETRY_S)
    if code in _RETIRED:
        return KeyServiceError(
            "the key service no longer has the key-encryption key that wrapped this data key "
            "(disabled, pending deletion or deleted)"
        )
    if code in _REFUSED:
        return KeyServiceError(
            "the key service refused modelkeep's credentials", retry_after=_RETRY_S
        )
    log.error("AWS KMS answered %s", code or "an unknown error")
    return KeyServiceError("the key service answered with an error", retry_after=_RETRY_S)


def _context(context: bytes) -> dict[str, str]:
    """KMS encryption context: the whole binding, plus model and version readable in logs."""
    labels = {"modelkeep-context": base64.b64encode(context).decode("ascii")}
    described = model_and_version_of(context)
    if described is not None:
        labels["model"], labels["version"] = described[0], str(described[1])
    return labels
