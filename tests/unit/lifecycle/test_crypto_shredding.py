"""Deletion by crypto-shredding: after `versions delete`, a copy of the blob taken beforehand
cannot be opened with anything the server or the key service still holds."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import pytest
import sqlalchemy as sa

from conftest import Env
from modelkeep.api.v2.infer import v2_call
from modelkeep.audit.verify import verify_chain
from modelkeep.crypto import associated_data_for
from modelkeep.crypto.sealed import unseal_segments
from modelkeep.errors import Conflict, Forbidden, IntegrityError, KeyServiceError, NotFound
from modelkeep.store import schema as t
from modelkeep.testing import build_iris_onnx

INFER = b'{"inputs":[{"name":"input","shape":[1,4],"datatype":"FP32","data":[5.1,3.5,1.4,0.2]}]}'


def unseal(path: Path, key: bytes, context: bytes, size: int) -> bytes:
    """The real unsealing code the server loads versions with."""
    with path.open("rb") as src:
        return b"".join(unseal_segments(src, key, context, expected_size=size))


def push(env: Env, seed: int) -> int:
    model = build_iris_onnx(seed=seed)
    return env.service.push(env.admin, "iris", model, file_name="iris.onnx").number


def every_wrapped_key(env: Env) -> list[bytes]:
    """Every wrapped data key the metadata database still holds: versions and captures."""
    with env.service.store.engine.connect() as conn:
        keys = list(conn.execute(sa.select(t.versions.c.wrapped_key)).scalars())
        keys += list(conn.execute(sa.select(t.payload_captures.c.wrapped_key)).scalars())
    return [bytes(k) for k in keys]


def database_bytes(data_dir: Path) -> bytes:
    """The SQLite database with its write-ahead log, as a backup of the directory would hold."""
    found = b""
    for path in sorted(data_dir.glob("*.db*")):
        found += path.read_bytes()
    return found


def test_a_deleted_version_cannot_be_opened_from_a_copy_of_its_blob(
    env: Env, tmp_path: Path
) -> None:
    svc = env.service
    assert (push(env, 0), push(env, 1)) == (1, 2)
    victim = svc.snapshot.models["iris"].versions[1]
    # A backup of the blob store and of the database, taken before the delete.
    aside = tmp_path / "aside.blob"
    with svc.registry.blobs.open(victim.blob_key) as src, aside.open("wb") as dst:
        shutil.copyfileobj(src, dst)
    context = associated_data_for("iris", 1, victim.sha256)
    # Before: the copy opens with the key the server holds (the test can tell success).
    data_key = svc.registry.keys.unwrap(victim.wrapped_key, context)
    plain = unseal(aside, data_key, context, victim.size)
    assert len(plain) == victim.size
    assert victim.wrapped_key in database_bytes(env.data_dir)

    deleted = svc.delete_version(env.admin, "iris", "1")

    assert (deleted.number, deleted.sha256, deleted.deleted_by) == (
        1,
        victim.sha256,
        env.admin.key_id,
    )
    assert deleted.deleted_at is not None
    # Every wrapped key left in the database fails to unwrap under the version's context, or
    # unwraps to a key that does not open the copy.
    for wrapped in every_wrapped_key(env):
        try:
            key = svc.registry.keys.unwrap(wrapped, context)
        except (IntegrityError, KeyServiceError):
            continue
        with pytest.raises(IntegrityError):
            unseal(aside, key, context, victim.size)
    # The old wrapped key is nowhere in the database files (nor in the WAL).
    assert victim.wrapped_key not in database_bytes(env.data_dir)
    # The blob is gone from the store; the other version is untouched.
    assert victim.blob_key not in set(svc.registry.blobs.keys())
    assert sorted(svc.snapshot.models["iris"].versions) == [2]
    assert svc.registry.open_version(svc.snapshot.models["iris"].versions[2])


def test_deleted_metadata_shows_deleted_and_inference_is_404(env: Env) -> None:
    svc = env.service
    push(env, 0)
    push(env, 1)
    consumer, _ = env.key("consumer")
    svc.dataplane.infer_now(consumer, "iris", v2_call(INFER), "1")  # loaded into this worker
    svc.delete_version(env.admin, "iris", 1)
    shown = svc.version_record(env.admin, "iris", "1")
    assert shown.deleted_at is not None
    assert shown.wrapped_key == b""
    assert [(v.number, v.deleted_at is not None) for v in svc.all_versions(env.admin, "iris")] == [
        (1, True),
        (2, False),
    ]
    with pytest.raises(NotFound):
        svc.dataplane.infer_now(consumer, "iris", v2_call(INFER), "1")
    assert ("iris", 1) not in svc.core._sessions
    # The default version is the newest live one.
    svc.dataplane.infer_now(consumer, "iris", v2_call(INFER), None)


def test_a_labelled_version_is_refused_and_the_audit_log_keeps_every_step(env: Env) -> None:
    svc = env.service
    push(env, 0)
    svc.set_label(env.admin, "iris", "production", 1)
    with pytest.raises(Conflict, match="under label"):
        svc.delete_version(env.admin, "iris", "1")
    assert 1 in svc.snapshot.models["iris"].versions
    svc.delete_label(env.admin, "iris", "production")
    sha = svc.snapshot.models["iris"].versions[1].sha256
    svc.delete_version(env.admin, "iris", "1")
    entries = list(svc.audit.entries(action="version.delete"))
    assert [(e.outcome, e.actor) for e in entries] == [
        ("failure", env.admin.key_id),
        ("success", env.admin.key_id),
    ]
    assert (entries[1].details["sha256"], entries[1].details["version"]) == (sha, 1)
    assert verify_chain(svc.store.engine, None).ok


def test_only_admins_delete_and_nonexistent_versions_are_404(env: Env) -> None:
    svc = env.service
    push(env, 0)
    publisher, _ = env.key("publisher", ["iris"])
    with pytest.raises(Forbidden):
        svc.delete_version(publisher, "iris", "1")
    with pytest.raises(Forbidden):
        svc.delete_model(publisher, "iris")
    for bad in ("9", "0", "-1", "x" * 40, "1.0", "../1"):
        with pytest.raises(NotFound):
            svc.delete_version(env.admin, "iris", bad)
    with pytest.raises(NotFound):
        svc.delete_version(env.admin, "nosuch", "1")
    svc.delete_version(env.admin, "iris", "1")
    with pytest.raises(Conflict, match="already deleted"):
        svc.delete_version(env.admin, "iris", "1")


def test_concurrent_deletes_of_one_version_shred_it_once(env: Env) -> None:
    svc = env.service
    push(env, 0)
    outcomes: list[str] = []
    barrier = threading.Barrier(4)

    def delete() -> None:
        barrier.wait()
        try:
            svc.delete_version(env.admin, "iris", "1")
            outcomes.append("deleted")
        except Conflict:
            outcomes.append("conflict")

    threads = [threading.Thread(target=delete) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes) == ["conflict"] * 3 + ["deleted"]
    assert verify_chain(svc.store.engine, None).ok


def test_deleting_a_model_shreds_versions_and_captures(env: Env, tmp_path: Path) -> None:
    svc = env.service
    push(env, 0)
    push(env, 1)
    svc.set_label(env.admin, "iris", "production", 2)
    svc.set_policy(env.admin, "iris", {"capture": {"sample": 1.0, "days": 7}})
    consumer, _ = env.key("consumer")
    svc.dataplane.infer_now(consumer, "iris", v2_call(INFER), None)
    svc.captures.capture_writer.flush(timeout=10)
    [info] = svc.captures.store.find("iris")
    _, capture_key, sealed = svc.captures.store.get("iris", info.id)
    versions = dict(svc.snapshot.models["iris"].versions)
    assert capture_key in database_bytes(env.data_dir)

    done = svc.delete_model(env.admin, "iris")

    assert ([s.number for s in done.versions], done.captures) == ([1, 2], 1)
    assert "iris" not in svc.snapshot.models
    with pytest.raises(NotFound):
        svc.dataplane.infer_now(consumer, "iris", v2_call(INFER), None)
    with pytest.raises(NotFound):
        svc.captures.store.get("iris", info.id)
    files = database_bytes(env.data_dir)
    assert capture_key not in files
    assert sealed not in files
    for version in versions.values():
        assert version.wrapped_key not in files
        assert version.blob_key not in set(svc.registry.blobs.keys())
    with pytest.raises(Conflict, match="reserved"):
        svc.put_model(env.admin, "iris")
    [entry] = svc.audit.entries(action="model.delete")
    assert entry.details["captures"] == 1
    assert entry.details["labels"] == {"production": 2}
    assert verify_chain(svc.store.engine, None).ok


def test_kek_rotation_skips_shredded_versions(env: Env) -> None:
    svc = env.service
    push(env, 0)
    push(env, 1)
    svc.delete_version(env.admin, "iris", "1")
    new_key = svc.kek_rotate(env.admin, new_key=True)
    done = svc.kek_rewrap(env.admin)
    assert (done.rewrapped, done.refused) == ([("iris", 2)], [])
    assert svc.kek_status(env.admin)["versions_by_key"] == {new_key: 1}


def test_a_blob_store_failure_after_the_shred_is_audited_and_collected_later(env: Env) -> None:
    svc = env.service
    push(env, 0)
    push(env, 1)
    victim = svc.snapshot.models["iris"].versions[1]
    real_delete = svc.registry.blobs.delete

    def broken(key: str) -> None:
        raise PermissionError("read-only blob store")

    svc.registry.blobs.delete = broken  # type: ignore[method-assign]
    svc.delete_version(env.admin, "iris", "1")
    svc.registry.blobs.delete = real_delete  # type: ignore[method-assign]
    [entry] = svc.audit.entries(action="version.delete")
    assert (entry.outcome, entry.details["blob_deleted"]) == ("success", False)
    assert victim.blob_key in set(svc.registry.blobs.keys())
    # The garbage collector removes what no live version references.
    assert svc.registry.collect_garbage(grace_s=0) == 1
    assert victim.blob_key not in set(svc.registry.blobs.keys())


@pytest.mark.postgres
def test_shredding_on_postgresql(tmp_path: Path, postgres_url: str) -> None:
    """The same guarantees with the metadata in PostgreSQL: the copy aside does not open with
    any key left in the database, the version shows deleted, inference is 404."""
    from modelkeep.bootstrap import init_data_dir
    from modelkeep.service import Service
    from modelkeep.settings import Settings

    init = init_data_dir(tmp_path / "data", postgres_url)
    svc = Service.open(Settings(data_dir=tmp_path / "data", database_url=postgres_url))
    try:
        admin = svc.authenticate(f"Bearer {init.admin_key}")
        svc.put_model(admin, "iris", require_signature=False)
        env = Env(svc, admin, tmp_path / "data")
        push(env, 0)
        push(env, 1)
        victim = svc.snapshot.models["iris"].versions[1]
        aside = tmp_path / "aside.blob"
        with svc.registry.blobs.open(victim.blob_key) as src, aside.open("wb") as dst:
            shutil.copyfileobj(src, dst)
        context = associated_data_for("iris", 1, victim.sha256)
        svc.delete_version(admin, "iris", "1")
        opened = 0
        for wrapped in every_wrapped_key(env):
            try:
                key = svc.registry.keys.unwrap(wrapped, context)
            except (IntegrityError, KeyServiceError):
                continue
            with pytest.raises(IntegrityError):
                unseal(aside, key, context, victim.size)
            opened += 1
        assert opened == 0
        assert svc.version_record(admin, "iris", "1").deleted_at is not None
        with pytest.raises(NotFound):
            svc.dataplane.infer_now(admin, "iris", v2_call(INFER), "1")
        assert verify_chain(svc.store.engine, None).ok
    finally:
        svc.stop()
