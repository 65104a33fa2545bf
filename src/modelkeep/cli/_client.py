"""A small synchronous client for the management API (``docs/api.md``).

One ``ApiClient`` wraps one ``httpx.Client`` for the length of one command. Every method returns
the decoded JSON answer or raises a ``ModelkeepError``: error answers become the class of their
HTTP status (see ``_errors.ERROR_TABLE``), and requests that get no answer at all become
``Unavailable`` with a sentence naming the server. The API key is sent only in the
``Authorization`` header and never appears in a message.
"""

from __future__ import annotations

import base64
import ipaddress
import ssl
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Literal
from urllib.parse import quote, urlsplit

import httpx

from modelkeep import __version__
from modelkeep.cli._errors import error_from_response, transport_failure
from modelkeep.errors import ConfigError, InternalError, InvalidInput, Unauthenticated

__all__ = [
    "CONNECT_TIMEOUT_S",
    "DEFAULT_URL",
    "PUSH_READ_TIMEOUT_S",
    "PUSH_RETRIES",
    "READ_TIMEOUT_S",
    "ApiClient",
    "ClientOverrides",
    "Connection",
    "Invocation",
    "JSONObject",
    "client_from",
]

JSONObject = dict[str, Any]

DEFAULT_URL = "https://127.0.0.1:8443"
CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 30.0
# A push is answered only after the server has scanned, encrypted and smoke-tested the model.
PUSH_READ_TIMEOUT_S = 300.0
# A push whose connection is lost is sent again (same Idempotency-Key) this many times at most,
# waiting 1, 2, 4, 8 s between attempts: long enough for a server to restart.
PUSH_RETRIES = 4
PUSH_BACKOFF_S = 1.0

_API = "/api/v1"
#: The request header that carries a push's signature bundle, base64 (docs/api.md).
SIGNATURE_HEADER = "Modelkeep-Signature"
#: The request header that makes a push safe to retry (docs/api.md).
IDEMPOTENCY_HEADER = "Idempotency-Key"
#: The request header that carries a push's declared lineage, base64 JSON (docs/lifecycle.md).
LINEAGE_HEADER = "Modelkeep-Lineage"


@dataclass(frozen=True)
class Connection:
    """Where the server is and how to prove who we are."""

    url: str
    token: str | None
    cacert: Path | None = None


@dataclass(frozen=True)
class ClientOverrides:
    """Test seam: passed as the command line's context ``obj`` to replace the network."""

    transport: httpx.BaseTransport | None = None
    sleep: Callable[[float], None] = time.sleep


@dataclass(frozen=True)
class Invocation:
    """What the ``modelkeep`` group's options say for every command under it: where the server
    is and how to reach it, given once (``modelkeep --url ... models ls``) or by environment."""

    connection: Connection
    overrides: ClientOverrides = ClientOverrides()


def client_from(obj: object, *, read_timeout: float = READ_TIMEOUT_S) -> ApiClient:
    """The ``ApiClient`` for one command. ``obj`` is the command line's context object, which
    the ``modelkeep`` group sets to an :class:`Invocation` from its connection options (tests
    pass ``ClientOverrides`` in, which it keeps, to replace the network)."""
    if not isinstance(obj, Invocation):  # every client command runs under the group
        raise InternalError("a client command ran without the modelkeep group's options")
    return ApiClient(
        obj.connection,
        read_timeout=read_timeout,
        transport=obj.overrides.transport,
        sleep=obj.overrides.sleep,
    )


class ApiClient:
    """The management API, one method per route; use as a context manager."""

    def __init__(
        self,
        connection: Connection,
        *,
        read_timeout: float = READ_TIMEOUT_S,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._sleep = sleep
        if not connection.token:
            raise Unauthenticated("no API key: set MODELKEEP_TOKEN or pass --token")
        self._url = _check_url(connection.url)
        self._http = httpx.Client(
            base_url=self._url,
            headers={
                "Authorization": f"Bearer {connection.token}",
                "Accept": "application/json",
                "User-Agent": f"modelkeep-cli/{__version__}",
            },
            verify=_tls_context(connection.cacert),
            timeout=httpx.Timeout(read_timeout, connect=CONNECT_TIMEOUT_S),
            transport=transport,
            # Never send the key anywhere the user did not name.
            follow_redirects=False,
        )

    def __enter__(self) -> ApiClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # -- models and versions ------------------------------------------------------------------

    def push(
        self,
        model: str,
        body: Callable[[], Iterable[bytes]],
        *,
        file_name: str,
        layout: Literal["file", "directory"] = "file",
        size: int | None = None,
        signature: bytes | None = None,
        idempotency_key: str | None = None,
        retries: int = PUSH_RETRIES,
        lineage: bytes | None = None,
    ) -> JSONObject:
        """Upload one model, streamed from ``body()``; returns the new Version.

        ``body()`` yields the model file's bytes, or for ``layout="directory"`` an uncompressed
        tar of the directory's files, from the start each time it is called; ``file_name`` is
        the file's (or directory's) base name. ``signature`` is the bundle written by
        ``modelkeep sign``, sent base64 in the ``Modelkeep-Signature`` header; without it the
        push is unsigned. With ``idempotency_key`` (sent as ``Idempotency-Key``), a push whose
        connection is lost is sent again up to ``retries`` times with backoff: the server
        answers a repeat with the version the first attempt made, never a second one. A
        refusal by the scan raises ``ModelRefused`` whose ``details["report"]`` is the
        server's scan report. ``lineage`` is the declared lineage JSON, sent base64 in the
        ``Modelkeep-Lineage`` header.
        """
        headers = {"Content-Type": "application/octet-stream"}
        if size is not None:
            # A declared length lets the server refuse an oversized upload before it arrives.
            headers["Content-Length"] = str(size)
        if signature is not None:
            headers[SIGNATURE_HEADER] = base64.b64encode(signature).decode("ascii")
        if lineage is not None:
            headers[LINEAGE_HEADER] = base64.b64encode(lineage).decode("ascii")
        if idempotency_key is not None:
            headers[IDEMPOTENCY_HEADER] = idempotency_key
        else:
            retries = 0
        path = f"{_API}/models/{_segment(model)}/versions"
        params = {"filename": file_name, "layout": layout}
        for attempt in range(retries + 1):
            try:
                response = self._http.request(
                    "POST", path, content=_as_iterator(body()), headers=headers, params=params
                )
            except httpx.TransportError as exc:
                if attempt == retries:
                    raise transport_failure(self._url, exc) from exc
                self._sleep(PUSH_BACKOFF_S * 2**attempt)
                continue
            return _object_of(response)
        raise AssertionError("unreachable")

    def put_model(
        self,
        model: str,
        *,
        description: str | None = None,
        require_signature: bool | None = None,
    ) -> JSONObject:
        """Create ``model`` or change its settings; ``None`` leaves a setting as it is."""
        body = {"description": description, "require_signature": require_signature}
        return self._object("PUT", f"{_API}/models/{_segment(model)}", json=body)

    def list_models(self) -> list[JSONObject]:
        return self._list("GET", f"{_API}/models", key="models")

    def get_model(self, model: str) -> JSONObject:
        return self._object("GET", f"{_API}/models/{_segment(model)}")

    def list_versions(self, model: str) -> list[JSONObject]:
        return self._list("GET", f"{_API}/models/{_segment(model)}/versions", key="versions")

    def set_label(self, model: str, label: str, version: int) -> JSONObject:
        path = f"{_API}/models/{_segment(model)}/labels/{_segment(label)}"
        return self._object("PUT", path, json={"version": version})

    def remove_label(self, model: str, label: str) -> None:
        path = f"{_API}/models/{_segment(model)}/labels/{_segment(label)}"
        self._send("DELETE", path)

    # -- lifecycle: bills of materials, deletion, retention, drift ---------------------------

    def version_bom(self, model: str, version: str) -> str:
        """The CycloneDX JSON of a version, as the server sent it."""
        path = f"{_API}/models/{_segment(model)}/versions/{_segment(version)}/bom"
        return self._send("GET", path).text

    def delete_version(self, model: str, version: str) -> JSONObject:
        path = f"{_API}/models/{_segment(model)}/versions/{_segment(version)}"
        return self._object("DELETE", path)

    def delete_model(self, model: str) -> JSONObject:
        return self._object("DELETE", f"{_API}/models/{_segment(model)}")

    def get_retention(self, model: str) -> JSONObject:
        return self._object("GET", f"{_API}/models/{_segment(model)}/retention")

    def put_retention(
        self, model: str, *, keep_versions: int | None, capture_days: int | None
    ) -> JSONObject:
        body = {"keep_versions": keep_versions, "capture_days": capture_days}
        return self._object("PUT", f"{_API}/models/{_segment(model)}/retention", json=body)

    def get_drift(self, model: str) -> JSONObject:
        return self._object("GET", f"{_API}/models/{_segment(model)}/drift")

    def put_drift(self, model: str, body: JSONObject) -> JSONObject:
        return self._object("PUT", f"{_API}/models/{_segment(model)}/drift", json=body)

    # -- trusted publishers -------------------------------------------------------------------

    def list_publishers(self, model: str) -> list[JSONObject]:
        path = f"{_API}/models/{_segment(model)}/publishers"
        return self._list("GET", path, key="publishers")

    def add_publisher(self, model: str, public_key_pem: str) -> JSONObject:
        """Trust a publisher's public key (PEM) for ``model``; returns it with its fingerprint."""
        path = f"{_API}/models/{_segment(model)}/publishers"
        return self._object("POST", path, json={"public_key": public_key_pem})

    def remove_publisher(self, model: str, fingerprint: str) -> None:
        path = f"{_API}/models/{_segment(model)}/publishers/{_segment(fingerprint)}"
        self._send("DELETE", path)

    # -- guard policy -------------------------------------------------------------------------

    def get_policy(self, model: str) -> JSONObject:
        """The guard policy of ``model``, with ``restrictions`` (the keys blocked or throttled)."""
        return self._object("GET", f"{_API}/models/{_segment(model)}/policy")

    def put_policy(self, model: str, policy: JSONObject) -> JSONObject:
        """Replace the guard policy of ``model`` with ``policy``; returns the stored policy.

        Fields left out get their defaults: send back everything ``get_policy`` returned, with
        ``ood_reference`` as shown (``{"fitted": true}``), to keep what is not being changed.
        """
        return self._object("PUT", f"{_API}/models/{_segment(model)}/policy", json=policy)

    def calibrate_policy(self, model: str, rows: list[list[float]]) -> JSONObject:
        """Fit the PRADA threshold and the OOD reference of ``model`` on benign ``rows``."""
        path = f"{_API}/models/{_segment(model)}/policy/calibrate"
        return self._object("POST", path, json={"rows": rows})

    def assess_policy(
        self,
        model: str,
        data: bytes,
        *,
        version: str | None,
        target_auc: float,
        apply: bool,
    ) -> JSONObject:
        """Run ``policy assess`` on the server with ``data`` (an .npz of the four arrays)."""
        params: dict[str, str] = {"target_auc": repr(target_auc), "apply": str(apply).lower()}
        if version is not None:
            params["version"] = version
        return self._object(
            "POST",
            f"{_API}/models/{_segment(model)}/policy/assess",
            params=params,
            content=data,
            headers={"Content-Type": "application/octet-stream"},
        )

    def unblock_key(self, model: str, key_id: str) -> None:
        """Lift a detector's block or throttle of ``key_id`` on ``model``."""
        self._send("DELETE", f"{_API}/models/{_segment(model)}/restrictions/{_segment(key_id)}")

    def reset_budget(self, model: str, key_id: str) -> None:
        """Give ``key_id`` its whole budget on ``model`` back."""
        path = f"{_API}/models/{_segment(model)}/budgets/{_segment(key_id)}/reset"
        self._send("POST", path)

    # -- keys ---------------------------------------------------------------------------------

    def create_key(
        self,
        *,
        role: str,
        models: list[str] | None,
        expires_at: datetime | None,
        description: str,
    ) -> JSONObject:
        """Create an API key; the answer holds the secret ``key``, which is never shown again."""
        body = {
            "role": role,
            "models": models,
            "expires_at": _utc_text(expires_at) if expires_at is not None else None,
            "description": description,
        }
        return self._object("POST", f"{_API}/keys", json=body)

    def list_keys(self) -> list[JSONObject]:
        return self._list("GET", f"{_API}/keys", key="keys")

    def revoke_key(self, key_id: str) -> JSONObject:
        return self._object("DELETE", f"{_API}/keys/{_segment(key_id)}")

    def whoami(self) -> JSONObject:
        return self._object("GET", f"{_API}/whoami")

    def kek_status(self) -> JSONObject:
        return self._object("GET", f"{_API}/kek")

    def kek_rotate(self, *, new_key: bool) -> JSONObject:
        return self._object("POST", f"{_API}/kek/rotate", json={"new_key": new_key})

    def kek_rewrap(self, *, limit: int, after: object, capture_after: object) -> JSONObject:
        body = {"limit": limit, "after": after, "capture_after": capture_after}
        return self._object("POST", f"{_API}/kek/rewrap", json=body)

    # -- lifecycle (docs/lifecycle.md) --------------------------------------------------------

    def set_evalset(self, model: str, data: bytes | None, gates: list[str] | None) -> JSONObject:
        """Send an evaluation set (.npz bytes) and/or gates; ``None`` keeps what is stored."""
        base = f"{_API}/models/{_segment(model)}/eval"
        if data is None:
            return self._object("PUT", f"{base}/gates", json={"gates": gates or []})
        return self._object(
            "PUT",
            base,
            params=[("gate", g) for g in gates or []],
            content=data,
            headers={"Content-Type": "application/octet-stream"},
        )

    def show_evaluation(self, model: str, version: int | None) -> JSONObject:
        params = {} if version is None else {"version": str(version)}
        return self._object("GET", f"{_API}/models/{_segment(model)}/eval", params=params)

    def run_evaluation(self, model: str, version: int) -> JSONObject:
        path = f"{_API}/models/{_segment(model)}/versions/{version}/evaluate"
        return self._object("POST", path)

    def protect_label(self, model: str, label: str, approvals: int) -> JSONObject:
        """The protection now, or (202) the change request that lowering it opened."""
        path = f"{_API}/models/{_segment(model)}/protection/{_segment(label)}"
        return self._object("PUT", path, json={"approvals": approvals})

    def rollback_label(self, model: str, label: str, *, emergency: bool) -> JSONObject:
        path = f"{_API}/models/{_segment(model)}/labels/{_segment(label)}/rollback"
        return self._object("POST", path, json={"emergency": emergency})

    def label_history(self, model: str, label: str | None) -> list[JSONObject]:
        params = {} if label is None else {"label": label}
        path = f"{_API}/models/{_segment(model)}/history"
        items = self._object("GET", path, params=params).get("history")
        if not isinstance(items, list):
            raise InternalError("the server's answer has no history")
        return [item for item in items if isinstance(item, dict)]

    def list_changes(self, status: str | None) -> list[JSONObject]:
        params = {} if status is None else {"status": status}
        items = self._object("GET", f"{_API}/changes", params=params).get("changes")
        if not isinstance(items, list):
            raise InternalError("the server's answer has no list of changes")
        return [item for item in items if isinstance(item, dict)]

    def get_change(self, change_id: str) -> JSONObject:
        return self._object("GET", f"{_API}/changes/{_segment(change_id)}")

    def approve_change(self, change_id: str) -> JSONObject:
        return self._object("POST", f"{_API}/changes/{_segment(change_id)}/approve")

    def reject_change(self, change_id: str, reason: str) -> JSONObject:
        path = f"{_API}/changes/{_segment(change_id)}/reject"
        return self._object("POST", path, json={"reason": reason})

    def start_canary(self, model: str, label: str, body: dict[str, Any]) -> JSONObject:
        """The canary started, or (202) the change request a protected label opened."""
        path = f"{_API}/models/{_segment(model)}/labels/{_segment(label)}/canary"
        return self._object("PUT", path, json=body)

    def start_shadow(self, model: str, label: str, version: int, sample: float) -> JSONObject:
        path = f"{_API}/models/{_segment(model)}/labels/{_segment(label)}/shadow"
        return self._object("PUT", path, json={"version": version, "sample": sample})

    def canary_status(self, model: str, label: str | None) -> list[JSONObject]:
        params = {} if label is None else {"label": label}
        path = f"{_API}/models/{_segment(model)}/canary"
        items = self._object("GET", path, params=params).get("canaries")
        if not isinstance(items, list):
            raise InternalError("the server's answer has no list of canaries")
        return [item for item in items if isinstance(item, dict)]

    def promote_canary(self, model: str, label: str) -> JSONObject:
        path = f"{_API}/models/{_segment(model)}/labels/{_segment(label)}/canary/promote"
        return self._object("POST", path)

    def abort_canary(self, model: str, label: str, mode: str) -> None:
        self._send("DELETE", f"{_API}/models/{_segment(model)}/labels/{_segment(label)}/{mode}")

    # -- plumbing -----------------------------------------------------------------------------

    def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise transport_failure(self._url, exc) from exc
        return _checked(response)

    def _object(self, method: str, path: str, **kwargs: Any) -> JSONObject:
        return _object_of(self._send(method, path, **kwargs))

    def _list(self, method: str, path: str, *, key: str) -> list[JSONObject]:
        items = self._object(method, path).get(key)
        if not isinstance(items, list) or not all(isinstance(item, dict) for item in items):
            raise InternalError(f"the server's answer has no list of {key}")
        return items


def _checked(response: httpx.Response) -> httpx.Response:
    """``response`` if it is a success, else the ModelkeepError its status and body stand for."""
    if not response.is_success:
        error = error_from_response(response)
        report = _scan_report(response)
        if report is not None:
            error.details = {"report": report}
        raise error
    return response


def _object_of(response: httpx.Response) -> JSONObject:
    body = _json(_checked(response))
    if not isinstance(body, dict):
        raise InternalError("the server's answer is not a JSON object")
    return body


def _json(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError as exc:
        raise InternalError("the server's answer is not JSON") from exc


def _scan_report(response: httpx.Response) -> JSONObject | None:
    """The scan report a refused push's answer carries next to its ``error``, if any."""
    try:
        body = response.json()
    except ValueError:
        return None
    report = body.get("report") if isinstance(body, dict) else None
    return report if isinstance(report, dict) else None


def _segment(value: str) -> str:
    # Quoting keeps a name inside its own path segment; dot segments would still be collapsed.
    if value in ("", ".", ".."):
        raise InvalidInput(f"{value!r} is not a valid name")
    return quote(value, safe="")


def _as_iterator(chunks: Iterable[bytes]) -> Iterator[bytes]:
    # httpx sends bytes-like content in one piece; an iterator is streamed chunk by chunk.
    yield from chunks


def _check_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise InvalidInput(f"--url must look like https://host:port, not {url!r}")
    if parts.username or parts.password or parts.query or parts.fragment:
        raise InvalidInput("--url must not hold credentials, a query or a fragment")
    if parts.scheme == "http" and not _is_loopback(parts.hostname):
        raise InvalidInput("refusing to send an API key over plain http to another host; use https")
    return url.rstrip("/")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _tls_context(cacert: Path | None) -> ssl.SSLContext:
    """Verify the server against ``cacert`` if given, else against the system trust store."""
    try:
        context = ssl.create_default_context(cafile=str(cacert) if cacert else None)
    except FileNotFoundError as exc:
        raise ConfigError(f"CA certificate {str(cacert)!r} does not exist") from exc
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"CA certificate {str(cacert)!r} is not a readable PEM file") from exc
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def _utc_text(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
