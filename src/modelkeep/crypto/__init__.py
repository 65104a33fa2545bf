"""Cryptographic recipes: sealed artifacts, key services, TLS material.

Safe, high-level functions only; the wire-format details live in private modules. Every failure
to verify is one opaque :class:`~modelkeep.errors.IntegrityError`.
"""

from modelkeep.crypto.keyservice import (
    InMemoryKeyService,
    KeyService,
    LocalKeyService,
    open_key_service,
)
from modelkeep.crypto.sealed import (
    KEY_SIZE,
    SEGMENT_SIZE,
    associated_data_for,
    new_data_key,
    seal,
    sealed_size,
    unseal,
)
from modelkeep.crypto.signing import (
    MAX_BUNDLE_SIZE,
    SignatureError,
    TrustedKey,
    Verified,
    generate_signing_key,
    load_public_key,
    sign_path,
    verify_in_memory,
)
from modelkeep.crypto.tls import (
    TLS_CIPHERS,
    TLS_GROUPS,
    certificate_not_after,
    create_tls_material,
    renew_server_certificate,
    server_ssl_context,
)

__all__ = [
    "KEY_SIZE",
    "MAX_BUNDLE_SIZE",
    "SEGMENT_SIZE",
    "TLS_CIPHERS",
    "TLS_GROUPS",
    "InMemoryKeyService",
    "KeyService",
    "LocalKeyService",
    "SignatureError",
    "TrustedKey",
    "Verified",
    "associated_data_for",
    "certificate_not_after",
    "create_tls_material",
    "generate_signing_key",
    "load_public_key",
    "new_data_key",
    "open_key_service",
    "renew_server_certificate",
    "seal",
    "sealed_size",
    "server_ssl_context",
    "sign_path",
    "unseal",
    "verify_in_memory",
]
