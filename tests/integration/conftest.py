"""Integration fixtures over the harness (harness.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from harness import Server, init_server


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One server per test module, already holding model `iris` version 1."""
    srv = init_server(tmp_path_factory.mktemp("srv"))
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()
