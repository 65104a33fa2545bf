"""Byte compatibility with the ``tink`` package, in both directions.

Tink is given a keyset holding one ``AesGcmHkdfStreamingKey`` whose key value is our raw data
key, with the parameters of Tink's AES256_GCM_HKDF_1MB template. Tink must open what ``seal``
wrote, and ``unseal`` must open what Tink wrote.
"""

from __future__ import annotations

import hashlib
import io
from typing import Any

import pytest
import tink
from tink import proto_keyset_format, secret_key_access, streaming_aead
from tink.proto import aes_gcm_hkdf_streaming_pb2, common_pb2, tink_pb2

from modelkeep.crypto import SEGMENT_SIZE, associated_data_for, new_data_key, seal, unseal
from modelkeep.errors import IntegrityError

FIRST = SEGMENT_SIZE - 40 - 16
LATER = SEGMENT_SIZE - 16
SIZES = [0, 1, FIRST - 1, FIRST, FIRST + 1, FIRST + LATER, 3_670_016]
TYPE_URL = "type.googleapis.com/google.crypto.tink.AesGcmHkdfStreamingKey"


@pytest.fixture(scope="module", autouse=True)
def _register_tink() -> None:
    streaming_aead.register()


class _KeptOpen(io.BytesIO):
    """Tink closes the destination when its stream closes; keep the bytes readable."""

    def close(self) -> None:
        pass


def _tink_primitive(key: bytes) -> Any:
    params = aes_gcm_hkdf_streaming_pb2.AesGcmHkdfStreamingParams(
        ciphertext_segment_size=SEGMENT_SIZE,
        derived_key_size=32,
        hkdf_hash_type=common_pb2.SHA256,
    )
    tink_key = aes_gcm_hkdf_streaming_pb2.AesGcmHkdfStreamingKey(
        version=0, params=params, key_value=key
    )
    keyset = tink_pb2.Keyset(
        primary_key_id=42,
        key=[
            tink_pb2.Keyset.Key(
                key_data=tink_pb2.KeyData(
                    type_url=TYPE_URL,
                    value=tink_key.SerializeToString(),
                    key_material_type=tink_pb2.KeyData.SYMMETRIC,
                ),
                status=tink_pb2.ENABLED,
                key_id=42,
                output_prefix_type=tink_pb2.RAW,
            )
        ],
    )
    handle = proto_keyset_format.parse(keyset.SerializeToString(), secret_key_access.TOKEN)
    return handle.primitive(streaming_aead.StreamingAead)


def _plaintext(size: int) -> bytes:
    return (bytes(range(253)) * (size // 253 + 1))[:size]


def _ad(plaintext: bytes, version: int = 1) -> bytes:
    return associated_data_for("compat", version, hashlib.sha256(plaintext).hexdigest())


def _tink_seal(key: bytes, plaintext: bytes, ad: bytes) -> bytes:
    destination = _KeptOpen()
    with _tink_primitive(key).new_encrypting_stream(destination, ad) as stream:
        stream.write(plaintext)
    return destination.getvalue()


def _tink_open(key: bytes, blob: bytes, ad: bytes) -> bytes:
    with _tink_primitive(key).new_decrypting_stream(io.BytesIO(blob), ad) as stream:
        data: bytes = stream.read()
    return data


@pytest.mark.parametrize("size", SIZES)
def test_tink_opens_what_seal_wrote(size: int) -> None:
    key = new_data_key()
    plaintext = _plaintext(size)
    out = io.BytesIO()
    seal(plaintext, key, _ad(plaintext), out)
    assert plaintext == _tink_open(key, out.getvalue(), _ad(plaintext))


@pytest.mark.parametrize("size", SIZES)
def test_unseal_opens_what_tink_wrote(size: int) -> None:
    key = new_data_key()
    plaintext = _plaintext(size)
    blob = _tink_seal(key, plaintext, _ad(plaintext))
    assert plaintext == unseal(io.BytesIO(blob), key, _ad(plaintext), expected_size=size)


def test_tink_refuses_our_blob_under_another_versions_associated_data() -> None:
    key = new_data_key()
    plaintext = _plaintext(1000)
    out = io.BytesIO()
    seal(plaintext, key, _ad(plaintext, 1), out)
    with pytest.raises(tink.TinkError):
        _tink_open(key, out.getvalue(), _ad(plaintext, 2))


def test_unseal_refuses_tinks_blob_under_another_versions_associated_data() -> None:
    key = new_data_key()
    plaintext = _plaintext(1000)
    blob = _tink_seal(key, plaintext, _ad(plaintext, 1))
    with pytest.raises(IntegrityError) as info:
        unseal(io.BytesIO(blob), key, _ad(plaintext, 2))
    assert info.value.message == "sealed artifact failed verification"


@pytest.mark.parametrize("size", SIZES)
def test_tink_opens_what_the_streaming_sealer_wrote(size: int) -> None:
    from modelkeep.crypto.sealed import Sealer

    key = new_data_key()
    plaintext = _plaintext(size)
    out = io.BytesIO()
    sealer = Sealer(key, _ad(plaintext), out)
    for start in range(0, size, 100_000):
        sealer.update(plaintext[start : start + 100_000])
    sealer.finish()
    assert plaintext == _tink_open(key, out.getvalue(), _ad(plaintext))
