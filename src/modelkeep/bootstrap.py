"""`modelkeep init`: create a data directory with keys, TLS material, database and an admin key.

The directory is assembled under a temporary name beside its destination and renamed into place
at the end, so a crash never leaves a half-initialized data dir behind.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from modelkeep.audit import KEY_FILE as AUDIT_KEY_FILE
from modelkeep.audit import CheckpointSigner
from modelkeep.auth.apikeys import KeyRecord, generate_api_key
from modelkeep.crypto import LocalKeyService, create_tls_material
from modelkeep.errors import ConfigError
from modelkeep.store.metadata import MetadataStore

KEK_FILE = "kek.key"
DB_FILE = "modelkeep.db"
TLS_DIR = "tls"
BLOB_DIR = "blobs"


@dataclass(frozen=True, slots=True)
class InitResult:
    data_dir: Path
    admin_key: str
    ca_cert: Path


def init_data_dir(data_dir: Path, database_url: str | None = None) -> InitResult:
    """Create ``data_dir`` (mode 0700) and the first admin key; refuses an existing data dir."""
    data_dir = data_dir.expanduser().absolute()
    if data_dir.exists() and (not data_dir.is_dir() or any(data_dir.iterdir())):
        raise ConfigError(
            "the data directory already exists and is not empty; refusing to touch it"
        )
    if not data_dir.parent.is_dir():
        raise ConfigError("the parent of the data directory does not exist")
    staging = Path(tempfile.mkdtemp(prefix=f".{data_dir.name}.init-", dir=data_dir.parent))
    try:
        os.chmod(staging, 0o700)
        LocalKeyService.create(staging / KEK_FILE)
        CheckpointSigner.create(staging / AUDIT_KEY_FILE)
        create_tls_material(staging / TLS_DIR)
        (staging / BLOB_DIR).mkdir(mode=0o700)
        url = database_url or f"sqlite:///{staging / DB_FILE}"
        store = MetadataStore(url)
        try:
            store.migrate()
            if store.snapshot().keys:
                raise ConfigError("the database already holds modelkeep keys; use a fresh database")
            new = generate_api_key()
            now = datetime.now(UTC)
            store.create_key(
                KeyRecord(
                    key_id=new.key_id,
                    secret_hash=new.secret_hash,
                    role="admin",
                    models=None,
                    description="first admin key (modelkeep init)",
                    created_at=now,
                    expires_at=None,
                    revoked_at=None,
                ),
                created_by="init",
            )
        finally:
            store.close()
        if data_dir.exists():
            data_dir.rmdir()
        staging.rename(data_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return InitResult(data_dir=data_dir, admin_key=new.token, ca_cert=data_dir / TLS_DIR / "ca.pem")
