"""Large files of the formats the server only scans, written in pieces (never held whole), for
the tests and benches that push or scan them: zeros, so they compress well where compressed,
and are quick to write. Each writer takes the path and the size of the content in bytes."""

from __future__ import annotations

import gzip
import io
import json
import struct
import tarfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

__all__ = [
    "deflated_keras_archive",
    "deflated_npz",
    "gzipped_npy",
    "keras_archive",
    "keras_h5",
    "npy_pieces",
    "safetensors_tar",
    "safetensors_tar_gz",
    "seven_zip_safetensors",
    "sparse_safetensors",
    "stored_npz",
]

MiB = 1 << 20


def sparse_safetensors(path: Path, nbytes: int) -> None:
    """A valid safetensors file of one FP32 tensor of ``nbytes`` zeros, written sparse (fast)."""
    header = json.dumps(
        {"w": {"dtype": "F32", "shape": [nbytes // 4], "data_offsets": [0, nbytes]}}
    ).encode()
    with path.open("wb") as out:
        out.write(struct.pack("<Q", len(header)) + header)
        out.truncate(8 + len(header) + nbytes)


def stored_npz(path: Path, nbytes: int) -> None:
    """A NumPy ``.npz`` (a zip, stored as ``np.savez`` stores) of one FP32 array of ``nbytes``
    zeros, written in pieces: a zip scanned member by member, never inflated."""
    with zipfile.ZipFile(path, "w") as archive, archive.open("w.npy", "w") as member:
        header = {"descr": "<f4", "fortran_order": False, "shape": (nbytes // 4,)}
        np.lib.format.write_array_header_1_0(member, header)
        zeros = bytes(4 * MiB)
        for _ in range(nbytes // len(zeros)):
            member.write(zeros)


def safetensors_tar(path: Path, nbytes: int) -> None:
    """A tar holding one safetensors file of ``nbytes`` zeros (see ``sparse_safetensors``)."""
    inner = path.with_suffix(".safetensors")
    sparse_safetensors(inner, nbytes)
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as archive:
        archive.add(inner, arcname="weights.safetensors")
    inner.unlink()


def npy_pieces(nbytes: int) -> Iterator[bytes]:
    """A NumPy ``.npy`` of one FP32 array of ``nbytes`` zeros, in pieces."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "<f4", "fortran_order": False, "shape": (nbytes // 4,)}
    )
    yield header.getvalue()
    zeros = bytes(4 * MiB)
    for _ in range(nbytes // len(zeros)):
        yield zeros


def gzipped_npy(path: Path, nbytes: int) -> None:
    """A gzip of a ``.npy`` of ``nbytes`` zeros (as joblib or ``gzip`` compress one)."""
    with gzip.open(path, "wb", compresslevel=1) as out:
        for piece in npy_pieces(nbytes):
            out.write(piece)


def safetensors_tar_gz(path: Path, nbytes: int) -> None:
    """A ``.tar.gz`` holding one safetensors file of ``nbytes`` zeros."""
    inner = path.with_name("weights.safetensors")
    sparse_safetensors(inner, nbytes)
    with tarfile.open(path, "w:gz", compresslevel=1, format=tarfile.PAX_FORMAT) as archive:
        archive.add(inner, arcname="weights.safetensors")
    inner.unlink()


def deflated_npz(path: Path, nbytes: int) -> None:
    """A NumPy ``.npz`` as ``np.savez_compressed`` writes it (its member deflated), of one FP32
    array of ``nbytes`` zeros, written in pieces."""
    with (
        zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as archive,
        archive.open("w.npy", "w", force_zip64=True) as member,
    ):
        for piece in npy_pieces(nbytes):
            member.write(piece)


def keras_h5(path: Path, nbytes: int) -> None:
    """A Keras ``.h5`` model: a configuration and one dataset of ``nbytes`` FP32 zeros."""
    import h5py

    config = {"class_name": "Sequential", "config": {"name": "s", "layers": []}}
    with h5py.File(path, "w") as handle:
        handle.attrs["model_config"] = json.dumps(config)
        weights = handle.create_dataset("w", shape=(nbytes // 4,), dtype="<f4")
        piece = np.zeros(MiB, dtype="<f4")
        for start in range(0, nbytes // 4, len(piece)):
            weights[start : start + len(piece)] = piece


def keras_archive(path: Path, nbytes: int, *, deflated: bool = False) -> None:
    """A ``.keras`` archive as Keras writes it (members stored): its weights an HDF5 file
    with one dataset of ``nbytes`` FP32 zeros (see ``keras_h5``); ``deflated``: the weights
    deflated, as a zip tool repacking the archive would store them."""
    weights = path.with_name("model.weights.h5")
    keras_h5(weights, nbytes)
    config = {"class_name": "Sequential", "config": {"name": "s", "layers": []}}
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("metadata.json", json.dumps({"keras_version": "3.0.0"}))
        archive.writestr("config.json", json.dumps(config))
        archive.write(
            weights,
            "model.weights.h5",
            compress_type=zipfile.ZIP_DEFLATED if deflated else zipfile.ZIP_STORED,
            compresslevel=1 if deflated else None,
        )
    weights.unlink()


def deflated_keras_archive(path: Path, nbytes: int) -> None:
    """:func:`keras_archive` with its weights deflated."""
    keras_archive(path, nbytes, deflated=True)


def seven_zip_safetensors(path: Path, nbytes: int) -> None:
    """A 7z archive holding one safetensors file of ``nbytes`` zeros, stored (py7zr's COPY
    method: what the scan holds is then the scan's own, not the decompressor's; LZMA2, 7-Zip's
    default, costs py7zr about 380 MiB whatever the size)."""
    import py7zr

    inner = path.with_suffix(".safetensors")
    sparse_safetensors(inner, nbytes)
    with py7zr.SevenZipFile(path, "w", filters=[{"id": py7zr.FILTER_COPY}]) as out:
        out.write(inner, arcname="weights.safetensors")
    inner.unlink()
