"""A service on a fresh data directory, with an admin and model `iris` (unsigned pushes)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from modelkeep.auth import Principal
from modelkeep.bootstrap import init_data_dir
from modelkeep.service import Service
from modelkeep.settings import Settings


@dataclass
class Env:
    service: Service
    admin: Principal
    data_dir: Path

    def key(self, role: str, models: list[str] | None = None) -> tuple[Principal, str]:
        created = self.service.create_key(self.admin, role=role, models=models, expires_at=None)
        return self.service.authenticate(f"Bearer {created.token}"), created.token


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    init = init_data_dir(tmp_path / "data")
    service = Service.open(Settings(data_dir=tmp_path / "data"))
    try:
        admin = service.authenticate(f"Bearer {init.admin_key}")
        service.put_model(admin, "iris", require_signature=False)
        yield Env(service, admin, tmp_path / "data")
    finally:
        service.stop()
