"""A push through the service: staged sealed, checked from the sealed copy, idempotent by key."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from safetensors.numpy import save_file as save

from modelkeep.auth import Principal
from modelkeep.bootstrap import init_data_dir
from modelkeep.crypto.signing import generate_signing_key, sign_path
from modelkeep.errors import Conflict, InvalidInput, ModelRefused
from modelkeep.runtime.onnx import OnnxModel
from modelkeep.service import Service
from modelkeep.settings import Settings
from modelkeep.testing import build_dense_onnx, build_iris_onnx

KEY = "3f1c7a52-9b8e-4c1d-a2f0-5e6d7c8b9a01"


@pytest.fixture
def service(tmp_path: Path) -> Iterator[tuple[Service, Principal]]:
    init = init_data_dir(tmp_path / "data")
    service = Service.open(Settings(data_dir=tmp_path / "data"))
    try:
        admin = service.authenticate(f"Bearer {init.admin_key}")
        service.put_model(admin, "iris", require_signature=False)
        yield service, admin
    finally:
        service.stop()


def stored_blobs(service: Service) -> set[str]:
    return set(service.registry.blobs.keys())


def test_a_retried_key_gets_the_same_version_and_no_duplicate(
    service: tuple[Service, Principal],
) -> None:
    svc, admin = service
    model = build_iris_onnx()
    first = svc.push(admin, "iris", model, file_name="iris.onnx", idempotency_key=KEY)
    again = svc.push(admin, "iris", model, file_name="iris.onnx", idempotency_key=KEY)
    assert (again.number, again.sha256) == (first.number, first.sha256) == (1, again.sha256)
    assert sorted(svc.snapshot.models["iris"].versions) == [1]
    assert len(stored_blobs(svc)) == 1


def test_a_key_reused_for_another_model_file_is_refused_clearly(
    service: tuple[Service, Principal],
) -> None:
    svc, admin = service
    svc.push(admin, "iris", build_iris_onnx(seed=0), file_name="iris.onnx", idempotency_key=KEY)
    with pytest.raises(Conflict) as info:
        svc.push(admin, "iris", build_iris_onnx(seed=1), file_name="iris.onnx", idempotency_key=KEY)
    assert "Idempotency-Key was already used for a different upload" in info.value.message
    with pytest.raises(Conflict):  # same bytes, other file name: another request too
        svc.push(admin, "iris", build_iris_onnx(seed=0), file_name="x.onnx", idempotency_key=KEY)
    assert sorted(svc.snapshot.models["iris"].versions) == [1]


def test_without_a_key_each_push_makes_a_version(service: tuple[Service, Principal]) -> None:
    svc, admin = service
    model = build_iris_onnx()
    numbers = [svc.push(admin, "iris", model, file_name="iris.onnx").number for _ in range(2)]
    assert numbers == [1, 2]


def test_concurrent_pushes_with_one_key_make_one_version(
    service: tuple[Service, Principal],
) -> None:
    svc, admin = service
    model = build_iris_onnx()
    numbers: list[int] = []
    barrier = threading.Barrier(4)

    def run() -> None:
        barrier.wait()
        numbers.append(
            svc.push(admin, "iris", model, file_name="m.onnx", idempotency_key=KEY).number
        )

    threads = [threading.Thread(target=run) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert numbers == [1, 1, 1, 1]
    assert sorted(svc.snapshot.models["iris"].versions) == [1]
    assert len(stored_blobs(svc)) == 1


@pytest.mark.parametrize("key", ["short", "x" * 129, "no spaces allowed", "-leading-dash"])
def test_a_malformed_key_is_refused(service: tuple[Service, Principal], key: str) -> None:
    svc, admin = service
    with pytest.raises(InvalidInput, match="invalid Idempotency-Key"):
        svc.push(admin, "iris", build_iris_onnx(), file_name="iris.onnx", idempotency_key=key)


def test_a_wrongly_signed_push_leaves_no_blob_and_no_staged_file(
    service: tuple[Service, Principal], tmp_path: Path
) -> None:
    svc, admin = service
    trusted = generate_signing_key(tmp_path / "pub.key", tmp_path / "pub.pub")
    stranger = tmp_path / "stranger.key"
    generate_signing_key(stranger, tmp_path / "stranger.pub")
    svc.put_model(admin, "signed")
    svc.add_publisher(admin, "signed", trusted.pem)
    model = build_iris_onnx()
    (tmp_path / "iris.onnx").write_bytes(model)
    sign_path(tmp_path / "iris.onnx", stranger, tmp_path / "iris.sig")
    with pytest.raises(ModelRefused):
        svc.push(
            admin,
            "signed",
            model,
            file_name="iris.onnx",
            bundle=(tmp_path / "iris.sig").read_bytes(),
        )
    assert stored_blobs(svc) == set()
    assert svc.registry.staging_dir is not None
    assert list(svc.registry.staging_dir.iterdir()) == []
    assert list((svc.settings.data_dir / "blobs" / ".tmp").iterdir()) == []


def test_a_signed_directory_push_is_checked_from_the_sealed_copy(
    service: tuple[Service, Principal], tmp_path: Path
) -> None:
    import io
    import tarfile

    svc, admin = service
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "iris.onnx").write_bytes(build_iris_onnx())
    save({"scale": np.ones(4, dtype=np.float32)}, str(folder / "scale.safetensors"))
    trusted = generate_signing_key(tmp_path / "pub.key", tmp_path / "pub.pub")
    sign_path(folder, tmp_path / "pub.key", tmp_path / "model.sig")
    svc.put_model(admin, "dir")
    svc.add_publisher(admin, "dir", trusted.pem)
    packed = io.BytesIO()
    with tarfile.open(fileobj=packed, mode="w") as tar:
        for name in ("iris.onnx", "scale.safetensors"):
            tar.add(folder / name, arcname=name)
    version = svc.push(
        admin,
        "dir",
        packed.getvalue(),
        file_name="model",
        is_directory=True,
        bundle=(tmp_path / "model.sig").read_bytes(),
    )
    assert (version.number, version.layout, version.file_name) == (1, "directory", "iris.onnx")
    assert svc.registry.open_version(version) == packed.getvalue()


def test_each_file_of_a_directory_is_scanned_from_its_own_bytes_in_the_tar(
    service: tuple[Service, Principal], tmp_path: Path
) -> None:
    """Companions are scanned through views of the sealed tar at their data offsets: one
    behind a long-name (PAX) header is read from the right place, a malicious one refuses."""
    import io
    import tarfile

    svc, admin = service
    svc.put_model(admin, "dir2", require_signature=False)
    long_name = "weights-" + "x" * 120 + ".safetensors"
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "iris.onnx").write_bytes(build_iris_onnx())
    save({"scale": np.ones(4, dtype=np.float32)}, str(folder / long_name))
    # A hand-made pickle that calls os.system("id") when loaded.
    (folder / "evil.pkl").write_bytes(
        b"\x80\x04\x95\x1c\x00\x00\x00\x00\x00\x00\x00\x8c\x02os\x8c\x06system\x93\x8c\x02id\x85R."
    )

    def pushed(names: tuple[str, ...]) -> int:
        packed = io.BytesIO()
        with tarfile.open(fileobj=packed, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for name in names:
                tar.add(folder / name, arcname=name)
        return svc.push(
            admin, "dir2", packed.getvalue(), file_name="model", is_directory=True
        ).number

    assert pushed(("iris.onnx", long_name)) == 1
    with pytest.raises(ModelRefused) as info:
        pushed((long_name, "evil.pkl", "iris.onnx"))
    assert "the scan refused evil.pkl (malicious)" in info.value.message


class _DownOnce:
    """A blob store that is unreachable until ``up`` is set (an object store outage)."""

    def __init__(self, real: object) -> None:
        self.real = real
        self.up = False

    def __getattr__(self, name: str) -> object:
        return getattr(self.real, name)

    def open(self, key: str) -> object:
        from modelkeep.errors import Unavailable

        if not self.up:
            raise Unavailable("the blob store is unavailable; try again later", retry_after=5)
        return self.real.open(key)  # type: ignore[attr-defined]


def test_a_load_refused_by_a_blob_store_outage_is_retried_once_it_is_back(
    service: tuple[Service, Principal],
) -> None:
    from modelkeep.errors import Unavailable

    svc, admin = service
    svc.push(admin, "iris", build_iris_onnx(), file_name="iris.onnx")
    svc.refresh()
    version = svc.snapshot.models["iris"].versions[1]
    flaky = _DownOnce(svc.registry.blobs)
    svc.registry.blobs = flaky  # type: ignore[assignment]
    with pytest.raises(Unavailable) as refused:
        svc.core.session(version)
    assert refused.value.retry_after == 5
    flaky.up = True
    assert svc.core.session(version) is not None


@pytest.mark.parametrize("on_tmpfs", [True, False])
def test_an_onnx_model_is_pushed_and_served_from_the_configured_tmpfs_directory_or_from_memory(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    on_tmpfs: bool,
) -> None:
    # A fresh directory on tmpfs, or one on disk (the test's own), which is never written to.
    plaintext_dir = Path(tempfile.mkdtemp(dir="/dev/shm")) if on_tmpfs else tmp_path / "disk"
    plaintext_dir.mkdir(exist_ok=True)
    loaded_from: list[str] = []
    real_load = OnnxModel.load.__func__  # type: ignore[attr-defined]

    def load(cls: type[OnnxModel], data: object, **options: object) -> OnnxModel:
        loaded_from.append(type(data).__name__)
        return real_load(cls, data, **options)  # type: ignore[no-any-return]

    monkeypatch.setattr(OnnxModel, "load", classmethod(load))
    model = build_dense_onnx(8 << 20, layer_bytes=4 << 20)
    init = init_data_dir(tmp_path / "data")
    svc = Service.open(Settings(data_dir=tmp_path / "data", plaintext_dir=plaintext_dir))
    try:
        admin = svc.authenticate(f"Bearer {init.admin_key}")
        svc.put_model(admin, "dense", require_signature=False)
        with caplog.at_level(logging.WARNING):
            version = svc.push(admin, "dense", model, file_name="dense.onnx")
            served = svc.core.session(version)
        assert version.number == 1
        warned = "is not a memory filesystem (tmpfs)" in caplog.text
        assert warned is not on_tmpfs
        # The push's smoke load and the server's load both take the plaintext file on tmpfs,
        # or both the bytes in memory.
        assert loaded_from == (["PlaintextFile"] * 2 if on_tmpfs else ["bytes"] * 2)
        # Served from the mapped file, the model answers as ONNX Runtime does on the bytes.
        reference = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
        x = np.random.default_rng(1).standard_normal((3, 1024)).astype(np.float32)
        (expected,) = reference.run(None, {"x": x})
        np.testing.assert_allclose(served.run({"x": x})["y"], expected, rtol=1e-4, atol=1e-4)
        # The process's private directory is made on tmpfs only, and left empty but its lock:
        # the file a load maps is unlinked once ONNX Runtime has it.
        made = list(plaintext_dir.iterdir())
        assert len(made) == (1 if on_tmpfs else 0)
        for directory in made:
            assert directory.name.startswith(f"modelkeep-plaintext-{os.getpid()}-")
            assert [path.name for path in directory.iterdir()] == [".lock"]
    finally:
        svc.stop()
        shutil.rmtree(plaintext_dir, ignore_errors=True)
