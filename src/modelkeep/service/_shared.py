"""Small helpers the service's parts share: their logger, per-snapshot memos, audit targets."""

from __future__ import annotations

import logging
from typing import Generic, TypeVar

from modelkeep.errors import InvalidInput
from modelkeep.registry.records import Snapshot, check_name

# The core's logger: log records keep the name they had before the service was split up.
log = logging.getLogger("modelkeep.service")

K = TypeVar("K")
V = TypeVar("V")


class SnapshotMemo(Generic[K, V]):
    """Answers that hold for one snapshot: all dropped when the snapshot changes.

    ``table(snapshot)`` is the dict for ``snapshot``, a fresh one when it is not the snapshot
    last asked about. Callers read ``self._snapshot`` once and both look up and store in the
    table they got, so an answer worked out while another thread refreshes lands in the old
    table, never in the new snapshot's. ``remember`` clears a table that holds ``limit``
    answers: keys may come from clients.
    """

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._state: tuple[Snapshot | None, dict[K, V]] = (None, {})

    def table(self, snapshot: Snapshot) -> dict[K, V]:
        known, table = self._state  # one read: a pair written together
        if known is not snapshot:
            table = {}
            self._state = (snapshot, table)
        return table

    def remember(self, table: dict[K, V], key: K, value: V) -> None:
        if len(table) >= self._limit:
            table.clear()
        table[key] = value


def model_target(model: str) -> str:
    return f"model:{model}" if is_safe_name(model) else "model:?"


def is_safe_name(name: str) -> bool:
    try:
        check_name("model", name)
    except InvalidInput:
        return False
    return True
