"""``modelkeep audit verify|ls|export`` against a data directory on SQLite and PostgreSQL."""

from __future__ import annotations

import hashlib
import itertools
import json
import stat
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from typer.testing import CliRunner, Result

from modelkeep.audit import KEY_FILE, AuditEvent, AuditLog, CheckpointSigner
from modelkeep.cli import app
from modelkeep.store.metadata import MetadataStore

NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("MODELKEEP_DATA_DIR", "MODELKEEP_DATABASE_URL", "MODELKEEP_DEBUG"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    path = tmp_path / "data"
    path.mkdir(mode=0o700)
    return path


@pytest.fixture
def store(database_url: str) -> Iterator[MetadataStore]:
    s = MetadataStore(database_url)
    s.migrate()
    yield s
    s.close()


@pytest.fixture
def log(store: MetadataStore, data_dir: Path) -> AuditLog:
    """Six entries about two models and a key, checkpointed, with the key in the data dir."""
    ticks = itertools.count()
    log = AuditLog(
        store.engine,
        signer=CheckpointSigner.create(data_dir / KEY_FILE),
        clock=lambda: NOW + timedelta(hours=next(ticks)),
    )
    for actor, action, target in [
        ("key:alice", "model.push", "model:iris/versions/1"),
        ("key:alice", "label.set", "model:iris/labels/production"),
        ("key:bob", "model.push", "model:wine/versions/1"),
        ("key:alice", "key.create", "key:k3"),
        ("key:carol", "infer", "model:iris"),
        ("key:bob", "infer", "model:wine"),
    ]:
        log.append(AuditEvent(actor, action, target, "success", {"by": actor}))
    log.checkpoint()
    return log


def run(data_dir: Path, database_url: str, *args: str) -> Result:
    return CliRunner().invoke(
        app,
        ["audit", *args, "--data-dir", str(data_dir), "--database-url", database_url],
        env={"COLUMNS": "200"},
    )


# -- verify -----------------------------------------------------------------------------------


def test_verify_an_intact_log_exits_0(log: AuditLog, data_dir: Path, database_url: str) -> None:
    result = run(data_dir, database_url, "verify")

    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == "audit log intact: 6 entries, 1 signed checkpoint"


def test_verify_json_reports_the_counts(log: AuditLog, data_dir: Path, database_url: str) -> None:
    result = run(data_dir, database_url, "verify", "--json")

    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {
        "ok": True,
        "entries": 6,
        "checkpoints": 1,
        "first_bad_seq": None,
        "problem": None,
        "signatures_checked": True,
    }


def test_verify_a_tampered_log_exits_1_naming_the_first_bad_entry(
    log: AuditLog, store: MetadataStore, data_dir: Path, database_url: str
) -> None:
    with store.engine.begin() as conn:
        conn.execute(sa.text("UPDATE audit_log SET outcome = 'denied' WHERE seq = 3"))

    text = run(data_dir, database_url, "verify")
    as_json = run(data_dir, database_url, "verify", "--json")

    assert (text.exit_code, as_json.exit_code) == (1, 1)
    assert "first bad entry is 3" in text.stdout
    assert "entry 3 was altered" in text.stdout
    report = json.loads(as_json.stdout)
    assert (report["ok"], report["first_bad_seq"], report["entries"]) == (False, 3, 2)


def test_verify_uses_the_public_key_given_rather_than_the_data_dirs(
    log: AuditLog, data_dir: Path, database_url: str, tmp_path: Path
) -> None:
    CheckpointSigner.create(tmp_path / "other.key")

    result = run(data_dir, database_url, "verify", "--public-key", str(tmp_path / "other.key.pub"))

    assert result.exit_code == 1, result.output
    assert "invalid signature" in result.stdout


def test_verify_without_a_public_key_exits_3(
    log: AuditLog, data_dir: Path, database_url: str
) -> None:
    (data_dir / f"{KEY_FILE}.pub").unlink()

    result = run(data_dir, database_url, "verify")

    assert result.exit_code == 3
    assert result.stderr.strip() == "error: the audit public key file does not exist"


def test_verify_a_database_without_audit_tables_exits_3(data_dir: Path) -> None:
    CheckpointSigner.create(data_dir / KEY_FILE)
    empty = sa.create_engine(f"sqlite:///{data_dir / 'modelkeep.db'}")
    with empty.begin() as conn:
        conn.execute(sa.text("CREATE TABLE unrelated (id INTEGER)"))
    empty.dispose()

    result = CliRunner().invoke(app, ["audit", "verify", "--data-dir", str(data_dir)])

    assert result.exit_code == 3
    assert "has no audit log" in result.stderr


def test_verify_a_data_dir_without_a_database_exits_3_and_creates_none(data_dir: Path) -> None:
    CheckpointSigner.create(data_dir / KEY_FILE)

    result = CliRunner().invoke(app, ["audit", "verify", "--data-dir", str(data_dir)])

    assert result.exit_code == 3
    assert "no database" in result.stderr
    assert not (data_dir / "modelkeep.db").exists()


def test_verify_defaults_to_the_sqlite_database_in_the_data_dir(data_dir: Path) -> None:
    store = MetadataStore(f"sqlite:///{data_dir / 'modelkeep.db'}")
    store.migrate()
    log = AuditLog(store.engine, signer=CheckpointSigner.create(data_dir / KEY_FILE))
    log.append(AuditEvent("key:alice", "model.push", "model:iris", "success", {}))
    log.checkpoint()
    store.close()

    result = CliRunner().invoke(
        app, ["audit", "verify", "--json"], env={"MODELKEEP_DATA_DIR": str(data_dir)}
    )

    assert result.exit_code == 0, result.output
    assert (json.loads(result.stdout)["entries"], json.loads(result.stdout)["checkpoints"]) == (
        1,
        1,
    )


# -- ls ---------------------------------------------------------------------------------------


def listed(result: Result) -> list[int]:
    assert result.exit_code == 0, result.output
    return [entry["seq"] for entry in json.loads(result.stdout)]


def test_ls_filters_by_model_actor_action_and_time(
    log: AuditLog, data_dir: Path, database_url: str
) -> None:
    assert listed(run(data_dir, database_url, "ls", "--json")) == [1, 2, 3, 4, 5, 6]
    assert listed(run(data_dir, database_url, "ls", "--json", "--model", "iris")) == [1, 2, 5]
    assert listed(run(data_dir, database_url, "ls", "--json", "--actor", "key:bob")) == [3, 6]
    assert listed(run(data_dir, database_url, "ls", "--json", "--action", "infer")) == [5, 6]
    since_until = ["--since", "2026-11-25T13:00:00Z", "--until", "2026-11-25T15:00:00"]
    assert listed(run(data_dir, database_url, "ls", "--json", *since_until)) == [2, 3]


def test_ls_shows_the_newest_entries_oldest_first(
    log: AuditLog, data_dir: Path, database_url: str
) -> None:
    assert listed(run(data_dir, database_url, "ls", "--json", "--limit", "2")) == [5, 6]


def test_ls_prints_a_table_for_people(log: AuditLog, data_dir: Path, database_url: str) -> None:
    result = run(data_dir, database_url, "ls", "--model", "wine")

    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["SEQ", "TIME", "ACTOR", "ACTION", "OUTCOME", "TARGET", "DETAILS"]
    assert lines[1].split()[:6] == [
        "3",
        "2026-11-25",
        "14:00:00",
        "key:bob",
        "model.push",
        "success",
    ]
    assert len(lines) == 3


def test_ls_refuses_an_unreadable_time_as_a_usage_error(
    log: AuditLog, data_dir: Path, database_url: str
) -> None:
    result = run(data_dir, database_url, "ls", "--since", "last tuesday")

    assert result.exit_code == 2
    assert "neither a duration" in result.output


# -- export -----------------------------------------------------------------------------------


def rehash(entry: dict[str, object]) -> str:
    """An exported entry's hash, recomputed from the JSON line alone as docs/audit.md says."""
    details = json.dumps(entry["details"], sort_keys=True, separators=(",", ":"))
    fields = [
        b"modelkeep/audit-entry/v1",
        str(entry["seq"]).encode(),
        *(str(entry[name]).encode() for name in ("time", "actor", "action", "target", "outcome")),
        details.encode(),
        str(entry["prev_hash"]).encode(),
    ]
    return hashlib.sha256(b"".join(len(f).to_bytes(8, "big") + f for f in fields)).hexdigest()


def test_export_writes_json_lines_that_verify_without_the_database(
    log: AuditLog, data_dir: Path, database_url: str
) -> None:
    result = run(data_dir, database_url, "export")

    assert result.exit_code == 0, result.output
    entries = [json.loads(line) for line in result.stdout.splitlines()]
    assert [entry["seq"] for entry in entries] == [1, 2, 3, 4, 5, 6]
    assert entries[0]["time"] == "2026-11-25T12:00:00.000000Z"
    assert entries[0]["prev_hash"] == "0" * 64
    for previous, entry in zip([None, *entries], entries, strict=False):
        assert rehash(entry) == entry["hash"]
        if previous is not None:
            assert entry["prev_hash"] == previous["hash"]


def test_export_applies_the_filters(log: AuditLog, data_dir: Path, database_url: str) -> None:
    result = run(data_dir, database_url, "export", "--model", "wine", "--action", "infer")

    assert result.exit_code == 0, result.output
    assert [json.loads(line)["seq"] for line in result.stdout.splitlines()] == [6]


def test_export_to_a_file_is_private_and_never_overwrites(
    log: AuditLog, data_dir: Path, database_url: str, tmp_path: Path
) -> None:
    target = tmp_path / "audit.jsonl"

    first = run(data_dir, database_url, "export", "--output", str(target))
    second = run(data_dir, database_url, "export", "--output", str(target))

    assert first.exit_code == 0, first.output
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert len(target.read_text().splitlines()) == 6
    assert second.exit_code == 1
    assert "refusing to overwrite" in second.stderr
