"""Model signatures: OpenSSF model-signing bundles made with EC keys, verified offline in memory.

A publisher signs with ``sign_path`` (or ``model_signing sign key``, which writes the same
bundle); the server checks the bundle with ``verify_in_memory`` against the public keys it trusts
for the model, on bytes it holds in memory, without network access and without ever writing the
model to disk.

What a bundle is (written by ``model_signing`` 1.x with an elliptic-curve key): Sigstore bundle
JSON, media type v0.3, whose ``dsseEnvelope`` carries an in-toto v1 statement and one ECDSA
signature over its DSSE pre-authentication encoding (SHA-256 for P-256, SHA-384 for P-384). The
statement's predicate (``https://model_signing/signature/v1.0``) lists every file of the model
with the SHA-256 of its content, by path relative to the model directory. A model that is a
single file is recorded under the name ``"."``; its real name appears only in the statement's
subject, which model_signing treats as informative, so renaming a signed file keeps its
signature valid. modelkeep verifies only that default per-file SHA-256 manifest: sharded or
BLAKE manifests are refused with a message saying how to re-sign.

Every failure to verify is a ``SignatureError`` (a ``ModelRefused``, so code ``model_refused``:
HTTP 422, CLI exit 8) whose message tells the publisher what to do and repeats nothing from the
bundle except file names.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import hmac
import json
import os
import re
import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from types import MappingProxyType

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa, x448, x25519

from modelkeep.errors import Conflict, InvalidInput, ModelRefused

__all__ = [
    "MAX_BUNDLE_SIZE",
    "SignatureError",
    "TrustedKey",
    "Verified",
    "generate_signing_key",
    "load_public_key",
    "sign_path",
    "verify_digests",
    "verify_in_memory",
]

#: A model_signing bundle is a few kilobytes even for thousands of files.
MAX_BUNDLE_SIZE = 1024 * 1024

_BUNDLE_MEDIA_TYPE = "application/vnd.dev.sigstore.bundle.v0.3+json"
_PAYLOAD_TYPE = "application/vnd.in-toto+json"
_STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
_PREDICATE_TYPE = "https://model_signing/signature/v1.0"
# model_signing's name for the one resource of a model that is a single file.
_SINGLE_FILE = "."
# model_signing also takes P-521; modelkeep's key policy names only these two curves.
_CURVES: dict[str, tuple[str, type[hashes.HashAlgorithm]]] = {
    "secp256r1": ("P-256", hashes.SHA256),
    "secp384r1": ("P-384", hashes.SHA384),
}
_NEW_CURVES: dict[str, type[ec.EllipticCurve]] = {"P-256": ec.SECP256R1, "P-384": ec.SECP384R1}
_KEY_KINDS: tuple[tuple[type, str], ...] = (
    (rsa.RSAPublicKey, "RSA"),
    (ed25519.Ed25519PublicKey, "Ed25519"),
    (ed448.Ed448PublicKey, "Ed448"),
    (dsa.DSAPublicKey, "DSA"),
    (x25519.X25519PublicKey, "X25519"),
    (x448.X448PublicKey, "X448"),
)
_MAX_PEM_SIZE = 16 * 1024
_MAX_NAMES_SHOWN = 5
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")

_RESIGN = "sign the model again with `modelkeep sign` or `model_signing sign key`"


class SignatureError(ModelRefused):
    """A signature bundle that does not prove the given files came from a trusted publisher."""


@dataclass(frozen=True, slots=True)
class TrustedKey:
    """A publisher's public key: ``fingerprint`` is ``sha256:`` + hex SHA-256 of its DER SPKI."""

    fingerprint: str
    pem: str
    curve: str


@dataclass(frozen=True, slots=True)
class Verified:
    """What a verified bundle proves: who signed (``signer``, a fingerprint) and which files.

    ``files`` maps each given relative path to the SHA-256 hex of its content; ``bundle_digest``
    is the SHA-256 hex of the bundle bytes, for the record.
    """

    signer: str
    files: Mapping[str, str]
    bundle_digest: str


# -- keys -------------------------------------------------------------------------------------


def load_public_key(pem: str | bytes) -> TrustedKey:
    """Parse a PEM public key; only EC P-256 and P-384 are accepted (``InvalidInput`` otherwise).

    The returned ``pem`` is the key re-encoded as SubjectPublicKeyInfo PEM, so two spellings of
    one key give equal ``TrustedKey`` values.
    """
    data = pem.encode("ascii", "replace") if isinstance(pem, str) else bytes(pem)
    if len(data) > _MAX_PEM_SIZE:
        raise InvalidInput("the public key is too large to be a PEM EC public key")
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise InvalidInput(
            "not a PEM public key: expected '-----BEGIN PUBLIC KEY-----' (for example the "
            ".pub file written by `modelkeep keygen`)"
        ) from exc
    return _trusted_key(key)


def _trusted_key(key: object) -> TrustedKey:
    if not isinstance(key, ec.EllipticCurvePublicKey):
        kind = next((name for cls, name in _KEY_KINDS if isinstance(key, cls)), "non-EC")
        raise InvalidInput(
            f"only EC P-256 and P-384 keys are supported, not {kind} keys; "
            "make one with `modelkeep keygen`"
        )
    if key.curve.name not in _CURVES:
        raise InvalidInput(
            f"EC curve {key.curve.name} is not supported: use P-256 or P-384 "
            "(`modelkeep keygen --curve P-384`)"
        )
    der = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    pem = key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return TrustedKey(
        fingerprint="sha256:" + hashlib.sha256(der).hexdigest(),
        pem=pem.decode("ascii"),
        curve=_CURVES[key.curve.name][0],
    )


@lru_cache(maxsize=256)
def _loaded(pem: str) -> tuple[ec.EllipticCurvePublicKey, TrustedKey]:
    # Re-derived from the PEM, so a hand-made TrustedKey cannot claim another fingerprint.
    trusted = load_public_key(pem)
    key = serialization.load_pem_public_key(trusted.pem.encode("ascii"))
    assert isinstance(key, ec.EllipticCurvePublicKey)
    return key, trusted


def generate_signing_key(
    private_out: Path, public_out: Path, *, curve: str = "P-256"
) -> TrustedKey:
    """Create an EC key pair: PKCS#8 PEM private key (mode 0600) and SPKI PEM public key.

    Never overwrites: if either file exists, ``Conflict`` and nothing is written. The private key
    is not encrypted, because ``model_signing sign key`` must be able to read it unattended;
    keep it on the publisher's machine or in a secret store.
    """
    if curve not in _NEW_CURVES:
        raise InvalidInput(f"unknown curve {curve!r}: use P-256 or P-384")
    if private_out.exists() or public_out.exists():
        raise Conflict("a key file already exists there; refusing to overwrite it")
    private_key = ec.generate_private_key(_NEW_CURVES[curve]())
    private_pem = private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    trusted = _trusted_key(private_key.public_key())
    _write_new_file(private_out, private_pem, 0o600)
    try:
        _write_new_file(public_out, trusted.pem.encode("ascii"), 0o644)
    except BaseException:
        private_out.unlink(missing_ok=True)
        raise
    return trusted


def _write_new_file(path: Path, content: bytes, mode: int) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        raise Conflict("a key file already exists there; refusing to overwrite it") from None
    except OSError as exc:
        raise InvalidInput(f"cannot write the key file: {exc.strerror or 'I/O error'}") from None
    try:
        os.fchmod(fd, mode)  # the umask may have narrowed the mode given to open
        with os.fdopen(fd, "wb") as handle:
            handle.write(content)
    except BaseException:
        path.unlink(missing_ok=True)
        raise


# -- verification -----------------------------------------------------------------------------


def verify_in_memory(
    files: Mapping[str, bytes], bundle: bytes, trusted: Sequence[TrustedKey]
) -> Verified:
    """Verify that ``bundle`` is a trusted publisher's signature over exactly ``files``.

    ``files`` maps relative POSIX paths (as in the signed model directory) to contents; for a
    model signed as a single file, pass one entry under its file name (any name: model_signing
    records a single file as ``"."``). Offline, in memory, fail closed: see ``verify_digests``.
    """
    digests = {name: hashlib.sha256(content).hexdigest() for name, content in files.items()}
    return verify_digests(digests, bundle, trusted)


def verify_digests(
    digests: Mapping[str, str], bundle: bytes, trusted: Sequence[TrustedKey]
) -> Verified:
    """Verify that ``bundle`` is a trusted publisher's signature over files with ``digests``.

    ``digests`` maps each file's relative POSIX path to the SHA-256 (hex) of its content, as
    the caller computed it while the bytes streamed past; the names are as for
    ``verify_in_memory``. Anything short of the full checklist below raises ``SignatureError``.
    """
    # 1. The bundle parses: bounded size, a Sigstore v0.3 bundle with one DSSE signature over an
    #    in-toto payload. Nothing inside the payload is read yet.
    if len(bundle) > MAX_BUNDLE_SIZE:
        raise SignatureError(
            "the signature bundle is larger than 1 MiB, far more than any model signature; "
            f"send the .sig file made when signing, or {_RESIGN}"
        )
    envelope = _parse_bundle(bundle)

    # 2. Its signature verifies against exactly one trusted key; no trusted key means refusal.
    if not trusted:
        raise SignatureError(
            "no publisher key is trusted for this model, so no signature can be accepted; "
            "an admin must first add the publisher's public key to the model"
        )
    signer = _signer(envelope, trusted)

    # 3. The signed manifest is a model_signing v1.0 per-file SHA-256 manifest and names exactly
    #    the given files: no unsigned extra file, no signed file missing, only clean names.
    signed = _signed_digests(envelope.payload)
    expected = _match_names(signed, digests)

    # 4. Every file's content has its signed digest.
    for name, digest in digests.items():
        if not hmac.compare_digest(digest, expected[name]):
            raise SignatureError(
                f"{_show(name)} does not match its signed digest: it changed after signing; "
                "upload exactly the signed bytes, or sign this version"
            )
    return Verified(
        signer=signer.fingerprint,
        files=MappingProxyType(dict(digests)),
        bundle_digest=hashlib.sha256(bundle).hexdigest(),
    )


@dataclass(frozen=True, slots=True)
class _Envelope:
    payload: bytes  # unverified until _signer has accepted it
    payload_type: str
    signature: bytes
    key_hint: str | None


def _parse_bundle(bundle: bytes) -> _Envelope:
    not_a_bundle = SignatureError(
        "the signature is not a model_signing bundle (Sigstore bundle v0.3 JSON signed with a "
        f"key); send the .sig file made when signing, or {_RESIGN}"
    )
    try:
        document = json.loads(bundle)
        if not isinstance(document, dict) or document.get("mediaType") != _BUNDLE_MEDIA_TYPE:
            raise not_a_bundle
        material = document.get("verificationMaterial")
        dsse = document.get("dsseEnvelope")
        if not isinstance(material, dict) or not isinstance(dsse, dict):
            raise not_a_bundle
        public_key = material.get("publicKey", {})
        hint = public_key.get("hint") if isinstance(public_key, dict) else None
        signatures = dsse.get("signatures")
        if (
            dsse.get("payloadType") != _PAYLOAD_TYPE
            or not isinstance(signatures, list)
            or len(signatures) != 1
            or not isinstance(signatures[0], dict)
            or (hint is not None and not isinstance(hint, str))
        ):
            raise not_a_bundle
        return _Envelope(
            payload=base64.b64decode(dsse["payload"], validate=True),
            payload_type=_PAYLOAD_TYPE,
            signature=base64.b64decode(signatures[0]["sig"], validate=True),
            key_hint=hint or None,
        )
    except (ValueError, TypeError, KeyError, RecursionError, binascii.Error) as exc:
        raise not_a_bundle from exc


def _pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE v1 pre-authentication encoding: what the signature actually covers."""
    kind = payload_type.encode("utf-8")
    return b"DSSEv1 %d %s %d %s" % (len(kind), kind, len(payload), payload)


def _signer(envelope: _Envelope, trusted: Sequence[TrustedKey]) -> TrustedKey:
    message = _pae(envelope.payload_type, envelope.payload)
    matches: dict[str, TrustedKey] = {}
    for candidate in trusted:
        key, checked = _loaded(candidate.pem)
        algorithm = _CURVES[key.curve.name][1]()
        try:
            key.verify(envelope.signature, message, ec.ECDSA(algorithm))
        except InvalidSignature:
            continue
        matches[checked.fingerprint] = checked
    if len(matches) != 1:
        raise SignatureError(
            "the signature was not made by a publisher key trusted for this model (or the "
            "bundle was altered); sign with a trusted key, or ask an admin to trust yours"
        )
    (signer,) = matches.values()
    # model_signing refuses a bundle whose key hint names another key; so do we, so that a
    # bundle accepted here is also accepted by `model_signing verify key`.
    if envelope.key_hint is not None and envelope.key_hint != _key_hint(signer.pem):
        raise SignatureError(f"the bundle's key hint does not match its signer; {_RESIGN}")
    return signer


def _key_hint(pem: str) -> str:
    # model_signing's hint: SHA-256 hex of the SPKI PEM text (not of the DER, unlike fingerprints)
    return hashlib.sha256(pem.encode("ascii")).hexdigest()


def _signed_digests(payload: bytes) -> dict[str, str]:
    """The signed manifest as name -> SHA-256 hex, from a payload whose signature verified."""
    not_a_manifest = SignatureError(
        f"the signed statement is not a model_signing v1.0 manifest; {_RESIGN}"
    )
    unsupported = SignatureError(
        "the signature uses a manifest modelkeep does not verify (sharded or not SHA-256); "
        "sign with the defaults of `modelkeep sign` or `model_signing sign key`: one SHA-256 "
        "digest per file"
    )
    try:
        statement = json.loads(payload)
        if (
            statement["_type"] != _STATEMENT_TYPE
            or statement["predicateType"] != _PREDICATE_TYPE
            or len(statement["subject"]) != 1
        ):
            raise not_a_manifest
        root_digest = statement["subject"][0]["digest"]["sha256"]
        predicate = statement["predicate"]
        serialization_args = predicate["serialization"]
        if serialization_args["method"] != "files" or serialization_args["hash_type"] != "sha256":
            raise unsupported
        signed: dict[str, str] = {}
        root = hashlib.sha256()
        for resource in predicate["resources"]:
            name, algorithm, digest = resource["name"], resource["algorithm"], resource["digest"]
            if algorithm != "sha256":
                raise unsupported
            if (
                not isinstance(digest, str)
                or not _SHA256_HEX.fullmatch(digest)
                or not isinstance(name, str)
                or name in signed
            ):
                raise not_a_manifest
            signed[name] = digest
            root.update(bytes.fromhex(digest))
    except (ValueError, TypeError, KeyError, IndexError, RecursionError) as exc:
        raise not_a_manifest from exc
    # The subject digest covers the resource digests in order, as model_signing checks too.
    if not isinstance(root_digest, str) or root.hexdigest() != root_digest:
        raise not_a_manifest
    return signed


def _match_names(signed: Mapping[str, str], files: Mapping[str, object]) -> dict[str, str]:
    """The signed digest for each given name; refuses any difference between the two sets."""
    if not files:
        raise SignatureError("no model files were given to check against the signature")
    for name in files:
        if not _is_clean_name(name):
            raise SignatureError(
                f"file name {_show(name)} is not a normalized relative path (no leading '/', "
                "no '.', '..' or empty parts, '/' as separator)"
            )
    if _SINGLE_FILE in signed:
        if len(signed) != 1:
            raise SignatureError(f"the signed manifest contains a file named '.'; {_RESIGN}")
        if len(files) != 1:
            raise SignatureError(
                f"the signature covers a single file but {len(files)} files were given; send "
                "only the signed file, or sign the whole model directory"
            )
        return dict.fromkeys(files, signed[_SINGLE_FILE])
    unclean = sorted(name for name in signed if not _is_clean_name(name))
    if unclean:
        raise SignatureError(
            f"the signed manifest names {_names(unclean)}, which is not a normalized relative "
            f"path; {_RESIGN}"
        )
    extra = sorted(set(files) - set(signed))
    if extra:
        raise SignatureError(
            f"not covered by the signature: {_names(extra)}; sign the model again with "
            "these files, or leave them out"
        )
    missing = sorted(set(signed) - set(files))
    if missing:
        raise SignatureError(
            f"the signature covers files that were not given: {_names(missing)}; send every "
            "signed file"
        )
    return {name: signed[name] for name in files}


def _is_clean_name(name: object) -> bool:
    if not isinstance(name, str) or not name or len(name) > 4096:
        return False
    if name.startswith("/") or "\\" in name or "\x00" in name:
        return False
    return all(part not in ("", ".", "..") for part in name.split("/"))


def _show(name: str) -> str:
    """A file name safe to put in a message: quoted, escaped, and cut if very long."""
    if len(name) > 120:
        name = name[:117] + "..."
    escaped = "".join(
        ch if ch.isprintable() else ch.encode("unicode_escape").decode() for ch in name
    )
    return f"'{escaped}'"


def _names(names: Sequence[str]) -> str:
    shown = ", ".join(_show(name) for name in names[:_MAX_NAMES_SHOWN])
    more = len(names) - _MAX_NAMES_SHOWN
    return f"{shown} and {more} more" if more > 0 else shown


# -- signing ----------------------------------------------------------------------------------


def sign_path(path: Path, private_key_pem: Path, out: Path) -> None:
    """Sign the model file or directory at ``path`` with an EC private key into ``out``.

    The bundle is the one ``model_signing sign key --private_key KEY --signature OUT PATH``
    writes (it is made by model_signing itself): one SHA-256 per file, git files (``.git``,
    ``.github``, ``.gitattributes``, ``.gitignore``) and ``out`` itself left out. A directory
    holding a symlink, or a symlink given as ``path``, is refused (``SignatureError``). ``out``
    is replaced atomically, so a failed run leaves any older signature in place.
    """
    _check_model_path(path)
    _check_private_key(private_key_pem)
    out = Path(os.path.abspath(out))
    if out.is_dir():
        raise InvalidInput("the signature output is a directory; give a file name")
    if out == Path(os.path.abspath(path)):
        raise InvalidInput("the signature output would overwrite the model itself")

    import model_signing.hashing
    import model_signing.signing

    # model_signing's Config.__init__ lacks a return annotation, hence the two ignores.
    hashing_config = model_signing.hashing.Config()  # type: ignore[no-untyped-call]
    hashing_config.set_ignored_paths(paths=_ignored_paths(path, out), ignore_git_paths=True)
    signer = model_signing.signing.Config()  # type: ignore[no-untyped-call]
    signer.use_elliptic_key_signer(private_key=private_key_pem)
    # The temporary file must not exist while the model is hashed: model_signing creates it
    # only after hashing, and it is renamed over ``out`` only once complete.
    temporary = out.with_name(f".{out.name}.{secrets.token_hex(6)}.tmp")
    try:
        signer.set_hashing_config(hashing_config).sign(path, temporary)
        os.replace(temporary, out)
    except (ValueError, OSError) as exc:
        raise InvalidInput(
            "signing failed: the model must hold only regular files and directories, all "
            "readable, and the signature's directory must be writable"
        ) from exc
    finally:
        with contextlib.suppress(OSError):
            temporary.unlink(missing_ok=True)


def _check_model_path(path: Path) -> None:
    if path.is_symlink():
        raise SignatureError("the model path is a symlink; sign the real file or directory")
    if path.is_file():
        return
    if not path.is_dir():
        raise InvalidInput("the model path is neither a file nor a directory")
    regular_files = 0
    for root, directories, names in os.walk(path, onerror=_raise_walk_error):
        for name in (*directories, *names):
            if Path(root, name).is_symlink():
                raise SignatureError(
                    "the model directory contains a symlink; replace it with the real file "
                    "before signing, so the signature covers what is actually served"
                )
        regular_files += sum(1 for name in names if Path(root, name).is_file())
    if regular_files == 0:
        raise InvalidInput("the model directory has no files to sign")


def _raise_walk_error(exc: OSError) -> None:
    raise InvalidInput("cannot read the model directory: permission denied or I/O error") from exc


def _check_private_key(private_key_pem: Path) -> None:
    """Fail early, in modelkeep's words, where model_signing would raise a foreign error."""
    try:
        data = private_key_pem.read_bytes()
    except OSError as exc:
        raise InvalidInput(f"cannot read the private key: {exc.strerror or 'I/O error'}") from exc
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError as exc:
        raise InvalidInput(
            "the private key is encrypted; modelkeep sign needs an unencrypted PEM key"
        ) from exc
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise InvalidInput(
            "not a PEM private key (expected the .key file written by `modelkeep keygen`)"
        ) from exc
    _trusted_key(key.public_key())


def _ignored_paths(path: Path, out: Path) -> Iterable[Path]:
    # As the model_signing CLI does: a signature written inside the model is not part of it.
    if not path.is_dir():
        return []
    try:
        return [out.resolve().relative_to(path.resolve())]
    except ValueError:
        return []
