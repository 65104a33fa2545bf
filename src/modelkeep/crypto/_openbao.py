"""OpenBao / Vault Transit as the key service: data keys wrapped by ``transit/encrypt``.

The Transit key must be a *derived* key (``derived=true``): the caller's context is Transit's
key-derivation ``context``, so a wrapped key opens only under the same (model, version,
digest). Transit's ``associated_data`` would bind it just as well but ``transit/rewrap`` does not
accept it, and rotation must re-wrap without the data key ever leaving OpenBao.

A wrapped key is Transit's ciphertext text (``vault:vN:...``) as ASCII; the key id recorded
next to it names the mount, the key and the version N (``transit/modelkeep:v3``). Rotation is
``transit/keys/NAME/rotate`` followed by ``transit/rewrap`` of every data key; raising the key's
``min_decryption_version`` afterwards retires the old versions, and a data key still wrapped by
one is refused (KeyServiceError without retry), never served.

httpx rather than hvac: five JSON calls, and httpx already gives the timeouts and TLS
verification this needs; hvac's requests session would be a second HTTP stack for it.
"""

from __future__ import annotations

import base64
import ipaddress
import logging
import re
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import httpx

from modelkeep.errors import ConfigError, IntegrityError, KeyServiceError

if TYPE_CHECKING:
    from modelkeep.settings import Settings

log = logging.getLogger(__name__)

_RETRY_S = 5.0
_FAILED = "data key failed verification"
_KEY_PATH = re.compile(r"(?P<mount>[A-Za-z0-9_.\-/]+?)/keys/(?P<name>[A-Za-z0-9_.\-]+)")
_CIPHERTEXT = re.compile(rb"vault:v(?P<version>[0-9]{1,9}):[A-Za-z0-9+/=]+")
_MAX_KEY_ID = 64


class TransitKeyService:
    """Wraps data keys with one derived Transit key; every call bounded by ``timeout_s``."""

    def __init__(
        self,
        address: str,
        mount: str,
        name: str,
        *,
        token: _Credentials,
        ca_file: Path | None = None,
        timeout_s: float = 5.0,
    ) -> None:
        self._mount = mount.strip("/")
        self._name = name
        self._credentials = token
        verify: Any = True if ca_file is None else _ca_context(ca_file)
        self._http = httpx.Client(
            base_url=address.rstrip("/") + "/v1/",
            verify=verify,
            timeout=httpx.Timeout(timeout_s),
            follow_redirects=False,
        )
        self._latest: int | None = None
        # The version of this thread's last wrap or rewrap: what ``key_id`` reports right after
        # one, even while another thread rotates the key.
        self._made = threading.local()
        self._lock = threading.Lock()
        if len(self._id(999_999_999)) > _MAX_KEY_ID:
            raise ConfigError("the Transit mount and key name are too long (64 characters)")

    @classmethod
    def from_settings(cls, settings: Settings) -> TransitKeyService:
        """Address and key from ``openbao+https://HOST:PORT/MOUNT/keys/NAME`` or the bare form."""
        address, key = settings.key_service_address, settings.key_service_key
        if settings.key_service.startswith("openbao+"):
            parts = urlsplit(settings.key_service.removeprefix("openbao+"))
            address = f"{parts.scheme}://{parts.netloc}"
            key = parts.path.strip("/")
        if not address or not key:
            raise ConfigError(
                "the openbao key service needs MODELKEEP_KEY_SERVICE_ADDRESS and "
                "MODELKEEP_KEY_SERVICE_KEY (MOUNT/keys/NAME), or the URL form"
            )
        _check_address(address)
        found = _KEY_PATH.fullmatch(key.strip("/"))
        if found is None:
            raise ConfigError("the OpenBao key must be given as MOUNT/keys/NAME")
        return cls(
            address,
            found["mount"],
            found["name"],
            token=_Credentials.from_settings(settings),
            ca_file=settings.key_service_ca_file,
            timeout_s=settings.key_service_timeout_s,
        )

    # -- the KeyService protocol -------------------------------------------------------------

    @property
    def key_id(self) -> str:
        """``MOUNT/NAME:vN``: N is the version this thread's last wrap or rewrap used, else the
        newest version known."""
        made: int | None = getattr(self._made, "version", None)
        if made is not None:
            return self._id(made)
        latest = self._latest
        if latest is None:
            latest = self._read_latest()
        return self._id(latest)

    def wrap(self, data_key: bytes, context: bytes) -> bytes:
        """``transit/encrypt`` under the newest key version, ``context`` deriving the key."""
        if self._latest is None:
            # Checks that the key exists and is derived before the first encrypt: Transit
            # would otherwise create a missing key on the fly for a token allowed to.
            self._read_latest()
        data = self._call(
            f"{self._mount}/encrypt/{self._name}",
            {"plaintext": _b64(data_key), "context": _b64(context)},
        )
        return self._ciphertext(data)

    def unwrap(self, wrapped: bytes, context: bytes) -> bytes:
        """``transit/decrypt``; IntegrityError if ``wrapped`` or ``context`` does not match."""
        _check_ciphertext(wrapped)
        data = self._call(
            f"{self._mount}/decrypt/{self._name}",
            {"ciphertext": wrapped.decode("ascii"), "context": _b64(context)},
        )
        try:
            return base64.b64decode(str(data["plaintext"]), validate=True)
        except (KeyError, ValueError):
            raise KeyServiceError(
                "the key service gave a malformed answer", retry_after=_RETRY_S
            ) from None

    def rewrap(self, wrapped: bytes, context: bytes) -> bytes:
        """``transit/rewrap``: re-encrypted inside OpenBao, the data key never leaves it."""
        _check_ciphertext(wrapped)
        data = self._call(
            f"{self._mount}/rewrap/{self._name}",
            {"ciphertext": wrapped.decode("ascii"), "context": _b64(context)},
        )
        return self._ciphertext(data)

    def rotate(self, *, new_key: bool) -> str:
        """``transit/keys/NAME/rotate`` when ``new_key``; then the newest version's key id."""
        if new_key:
            self._call(f"{self._mount}/keys/{self._name}/rotate", {})
        self._made.version = None
        return self._id(self._read_latest())

    def close(self) -> None:
        self._http.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(key={self._mount}/keys/{self._name})"

    # -- plumbing ----------------------------------------------------------------------------

    def _id(self, version: int) -> str:
        return f"{self._mount}/{self._name}:v{version}"

    def _ciphertext(self, data: dict[str, Any]) -> bytes:
        text = str(data.get("ciphertext", "")).encode("ascii", "replace")
        found = _CIPHERTEXT.fullmatch(text)
        if found is None:
            raise KeyServiceError("the key service gave a malformed answer", retry_after=_RETRY_S)
        version = int(found["version"])
        self._made.version = version
        self._seen(version)
        return text

    def _seen(self, version: int) -> None:
        with self._lock:
            if self._latest is None or version > self._latest:
                self._latest = version

    def _read_latest(self) -> int:
        data = self._call(f"{self._mount}/keys/{self._name}", None)
        if data.get("derived") is not True:
            raise KeyServiceError(
                f"the Transit key '{self._name}' must be created with derived=true",
                retry_after=_RETRY_S,
            )
        latest = data.get("latest_version")
        if not isinstance(latest, int) or latest < 1:
            raise KeyServiceError("the key service gave a malformed answer", retry_after=_RETRY_S)
        with self._lock:
            self._latest = latest
        return latest

    def _call(self, path: str, body: dict[str, Any] | None) -> dict[str, Any]:
        """POST ``body`` (GET when None); the answer's ``data``, or the error it means."""
        for attempt in (1, 2):
            headers = {"X-Vault-Token": self._credentials.token(self._http)}
            try:
                if body is None:
                    response = self._http.get(path, headers=headers)
                else:
                    response = self._http.post(path, json=body, headers=headers)
            except httpx.TransportError as exc:
                raise _transport_failure(exc) from exc
            if response.status_code == 403 and attempt == 1:
                # A renewed token file or an expired AppRole token: fetch a fresh one, once.
                self._credentials.forget()
                continue
            return self._data(response)
        raise AssertionError("unreachable")

    def _data(self, response: httpx.Response) -> dict[str, Any]:
        if response.status_code in (200, 204):
            if response.status_code == 204:
                return {}
            data = _json(response).get("data")
            return data if isinstance(data, dict) else {}
        errors = " ".join(str(e) for e in _json(response).get("errors", []))
        status = response.status_code
        if status == 403:
            raise KeyServiceError(
                "the key service refused modelkeep's token (revoked, expired or not allowed)",
                retry_after=_RETRY_S,
            )
        if status == 503:
            raise KeyServiceError("the key service is sealed or unavailable", retry_after=_RETRY_S)
        if "disallowed by policy" in errors or "too old" in errors:
            raise KeyServiceError(
                "the key service no longer has the key-encryption key version that wrapped "
                "this data key"
            )
        if status == 404 or "not found" in errors:
            raise KeyServiceError(
                f"the key service has no Transit key '{self._mount}/keys/{self._name}'",
                retry_after=_RETRY_S,
            )
        if status == 400 and ("authentication failed" in errors or "invalid ciphertext" in errors):
            raise IntegrityError(_FAILED)
        log.error("key service answered %s: %s", status, errors[:200])
        raise KeyServiceError("the key service answered with an error", retry_after=_RETRY_S)


class _Credentials:
    """The token for OpenBao: read from a file, or obtained by AppRole login; cached."""

    def __init__(
        self,
        *,
        token_file: Path | None = None,
        role_id: str | None = None,
        secret_id_file: Path | None = None,
        approle_mount: str = "approle",
    ) -> None:
        if (token_file is None) == (role_id is None or secret_id_file is None):
            raise ConfigError(
                "the openbao key service needs MODELKEEP_KEY_SERVICE_TOKEN_FILE, or "
                "MODELKEEP_KEY_SERVICE_APPROLE_ROLE_ID and ..._APPROLE_SECRET_ID_FILE (one of them)"
            )
        self._token_file = token_file
        self._role_id = role_id
        self._secret_id_file = secret_id_file
        self._approle_mount = approle_mount.strip("/")
        self._token: str | None = None
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Settings) -> _Credentials:
        """ConfigError at start if the credential file cannot be read."""
        credentials = cls(
            token_file=settings.key_service_token_file,
            role_id=settings.key_service_approle_role_id,
            secret_id_file=settings.key_service_approle_secret_id_file,
            approle_mount=settings.key_service_approle_mount,
        )
        if settings.key_service_token_file is not None:
            _read_secret(settings.key_service_token_file, "token file")
        if settings.key_service_approle_secret_id_file is not None:
            _read_secret(settings.key_service_approle_secret_id_file, "secret id file")
        return credentials

    def token(self, http: httpx.Client) -> str:
        with self._lock:
            if self._token is None:
                self._token = self._fetch(http)
            return self._token

    def forget(self) -> None:
        with self._lock:
            self._token = None

    def _fetch(self, http: httpx.Client) -> str:
        if self._token_file is not None:
            return _read_secret(self._token_file, "token file")
        assert self._secret_id_file is not None
        body = {
            "role_id": self._role_id,
            "secret_id": _read_secret(self._secret_id_file, "secret id file"),
        }
        try:
            response = http.post(f"auth/{self._approle_mount}/login", json=body)
        except httpx.TransportError as exc:
            raise _transport_failure(exc) from exc
        token = _json(response).get("auth", {}) or {}
        client_token = token.get("client_token") if isinstance(token, dict) else None
        if response.status_code != 200 or not isinstance(client_token, str):
            raise KeyServiceError(
                "the key service refused modelkeep's AppRole login", retry_after=_RETRY_S
            )
        return client_token


def _transport_failure(exc: httpx.TransportError) -> KeyServiceError:
    """What a failed connection means, for the operator: time out, TLS, or unreachable."""
    if isinstance(exc, httpx.TimeoutException):
        message = "the key service did not answer in time"
    elif "CERTIFICATE_VERIFY_FAILED" in str(exc):
        message = (
            "the key service's TLS certificate did not verify "
            "(MODELKEEP_KEY_SERVICE_CA_FILE names the CA that issued it)"
        )
    else:
        message = "the key service is unreachable"
    return KeyServiceError(message, retry_after=_RETRY_S)


def _read_secret(path: Path, what: str) -> str:
    try:
        text = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(f"cannot read the key service {what}") from exc
    if not text:
        raise ConfigError(f"the key service {what} is empty")
    return text


def _json(response: httpx.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _check_ciphertext(wrapped: bytes) -> None:
    if _CIPHERTEXT.fullmatch(wrapped) is None:
        raise IntegrityError(_FAILED)


def _check_address(address: str) -> None:
    """https always; plain http only to a loopback address (a dev server on this host)."""
    parts = urlsplit(address)
    if parts.scheme == "https" and parts.hostname:
        return
    if parts.scheme == "http" and parts.hostname:
        host = parts.hostname
        try:
            loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        if loopback:
            return
    raise ConfigError("the OpenBao address must be https:// (plain http only to loopback)")


def _ca_context(ca_file: Path) -> Any:
    import ssl

    try:
        return ssl.create_default_context(cafile=str(ca_file))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError("cannot load the key service CA file") from exc
