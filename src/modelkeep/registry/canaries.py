"""Canary and shadow rows of the metadata store (docs/lifecycle.md, "Canary and shadow").

Starting, promoting and ending one bumps the change counter: workers route by the active rows of
their snapshot (``ModelRecord.canaries`` and ``.shadows``), never by reading this table.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import sqlalchemy as sa

from modelkeep.errors import NotFound
from modelkeep.registry.records import Canary
from modelkeep.store import schema as t
from modelkeep.store.metadata import MetadataStore, canary_from_row, live_canary, put_label

__all__ = ["LIVE", "CanaryStore"]

#: Statuses of a canary or shadow still running or waiting for approval.
LIVE = ("active", "pending")


class CanaryStore:
    """Canaries and shadows: start one, promote a canary, end either; list them."""

    def __init__(self, store: MetadataStore) -> None:
        self._store = store

    def start(self, new: Canary) -> None:
        """Record ``new`` (active, or pending a change request), replacing a live one of the
        same label and mode. NotFound when its version does not exist (or is deleted)."""
        with self._store._write() as conn:
            model_id = MetadataStore._model_id(conn, new.model)
            v = t.versions.c
            exists = conn.execute(
                sa.select(v.id).where(
                    v.model_id == model_id, v.number == new.version, v.deleted_at.is_(None)
                )
            ).scalar()
            if exists is None:
                raise NotFound(f"model '{new.model}' has no version {new.version}")
            c = t.canaries.c
            conn.execute(
                sa.update(t.canaries)
                .where(
                    c.model_id == model_id,
                    c.label == new.label,
                    c.mode == new.mode,
                    c.status.in_(LIVE),
                )
                .values(
                    status="ended",
                    ended_by=new.started_by,
                    ended_at=new.started_at,
                    reason="replaced",
                )
            )
            conn.execute(
                sa.insert(t.canaries).values(
                    id=new.id,
                    model_id=model_id,
                    label=new.label,
                    mode=new.mode,
                    version=new.version,
                    share=new.share,
                    thresholds=new.thresholds,
                    status=new.status,
                    change_id=new.change_id,
                    started_by=new.started_by,
                    started_at=new.started_at,
                )
            )

    def end(
        self,
        model: str,
        label: str,
        mode: str,
        *,
        status: str,
        by: str,
        now: datetime,
        reason: str | None = None,
        only_id: str | None = None,
    ) -> Canary | None:
        """End the live canary (or shadow) of ``label`` as ``status``; returns it as it was,
        or None when none was live (or it was not ``only_id`` any more)."""
        with self._store._write() as conn:
            model_id = MetadataStore._model_id(conn, model)
            found = _live(conn, model_id, model, label, mode)
            if found is None or (only_id is not None and found.id != only_id):
                return None
            conn.execute(
                sa.update(t.canaries)
                .where(t.canaries.c.id == found.id)
                .values(status=status, ended_by=by, ended_at=now, reason=reason)
            )
        return found

    def promote(self, model: str, label: str, *, by: str, now: datetime) -> Canary:
        """Point ``label`` at its active canary's version, ending the canary as promoted, in
        one transaction. NotFound when the label has no active canary."""
        with self._store._write() as conn:
            model_id = MetadataStore._model_id(conn, model)
            found = _live(conn, model_id, model, label, "canary")
            if found is None or found.status != "active":
                raise NotFound(f"label '{label}' of model '{model}' has no active canary")
            put_label(conn, model_id, model, label, found.version, by, now, "promote", None)
        return found

    def live(self, model: str, label: str, mode: str) -> Canary | None:
        with self._store._connect(self._store.engine) as conn:
            model_id = MetadataStore._model_id(conn, model)
            return _live(conn, model_id, model, label, mode)

    def of_model(self, model: str, *, limit: int = 50) -> list[Canary]:
        """``model``'s canaries and shadows, newest first: live ones and the last that ended."""
        c = t.canaries.c
        with self._store._connect(self._store.engine) as conn:
            model_id = MetadataStore._model_id(conn, model)
            rows = conn.execute(
                sa.select(t.canaries)
                .where(c.model_id == model_id)
                .order_by(c.started_at.desc(), c.id)
                .limit(limit)
            ).all()
        return [canary_from_row(model, row) for row in rows]


def _live(conn: Any, model_id: int, model: str, label: str, mode: str) -> Canary | None:
    c = t.canaries.c
    row = conn.execute(
        sa.select(t.canaries).where(
            c.model_id == model_id, c.label == label, c.mode == mode, live_canary()
        )
    ).first()
    return None if row is None else canary_from_row(model, row)
