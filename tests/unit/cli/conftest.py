"""A fake modelkeep server for the CLI tests: the management API of docs/api.md, in memory.

``FakeServer`` is an ``httpx`` transport, so the CLI runs unchanged against it; it records every
request with the chunks its body arrived in, and can be told to answer the next request with an
error. ``invoke`` runs the command line against it with ``typer.testing.CliRunner``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner, Result

from modelkeep.cli import app
from modelkeep.cli._client import ClientOverrides
from modelkeep.crypto.signing import load_public_key

ADMIN_TOKEN = "mk_abcdefgh2345_s3cretAdminSecret"
ADMIN_ID = "abcdefgh2345"
NOW = "2026-11-25T18:00:00Z"


@dataclass
class Recorded:
    method: str
    url: httpx.URL
    headers: httpx.Headers
    chunks: list[bytes]

    @property
    def path(self) -> str:
        return self.url.path

    @property
    def body(self) -> bytes:
        return b"".join(self.chunks)

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class FakeServer(httpx.BaseTransport):
    """In-memory management API. Tokens map to key ids; ``fail_next`` forces an error answer."""

    requests: list[Recorded] = field(default_factory=list)
    models: dict[str, dict[str, Any]] = field(default_factory=dict)
    versions: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    keys: dict[str, dict[str, Any]] = field(default_factory=dict)
    publishers: dict[str, dict[str, str]] = field(default_factory=dict)
    tokens: dict[str, str] = field(default_factory=dict)
    fail_next: httpx.Response | None = None

    def __post_init__(self) -> None:
        self.keys[ADMIN_ID] = _key(ADMIN_ID, "admin", None)
        self.tokens[ADMIN_TOKEN] = ADMIN_ID

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        # Iterating the stream (not request.read()) keeps the chunk boundaries the client sent.
        chunks = [bytes(chunk) for chunk in request.stream]  # type: ignore[union-attr]
        self.requests.append(Recorded(request.method, request.url, request.headers, chunks))
        if self.fail_next is not None:
            response, self.fail_next = self.fail_next, None
            return response
        caller = self.tokens.get(request.headers.get("authorization", "").removeprefix("Bearer "))
        if caller is None:
            return _error(401, "missing or unknown API key")
        for method, pattern, handler in self._routes():
            match = re.fullmatch(pattern, request.url.path)
            if match and method == request.method:
                return handler(request, b"".join(chunks), caller, *match.groups())
        return _error(404, "no such route")

    # -- routes -------------------------------------------------------------------------------

    def _routes(self) -> Sequence[tuple[str, str, Callable[..., httpx.Response]]]:
        m = r"/api/v1/models/([^/]+)"
        return (
            ("POST", rf"{m}/versions", self._push),
            ("GET", r"/api/v1/models", self._list_models),
            ("GET", m, self._get_model),
            ("PUT", m, self._put_model),
            ("GET", rf"{m}/publishers", self._list_publishers),
            ("POST", rf"{m}/publishers", self._add_publisher),
            ("DELETE", rf"{m}/publishers/([^/]+)", self._remove_publisher),
            ("GET", rf"{m}/versions", self._list_versions),
            ("PUT", rf"{m}/labels/([^/]+)", self._set_label),
            ("DELETE", rf"{m}/labels/([^/]+)", self._remove_label),
            ("POST", r"/api/v1/keys", self._create_key),
            ("GET", r"/api/v1/keys", self._list_keys),
            ("DELETE", r"/api/v1/keys/([^/]+)", self._revoke_key),
            ("GET", r"/api/v1/whoami", self._whoami),
        )

    def _push(self, request: httpx.Request, body: bytes, caller: str, name: str) -> httpx.Response:
        if request.headers.get("content-type") != "application/octet-stream":
            return _error(400, "expected application/octet-stream")
        if name not in self.models:
            return _error(404, f"no model {name}")
        model = self.models[name]
        encoded = request.headers.get("modelkeep-signature")
        if encoded is None and model["require_signature"]:
            return _error(422, f"model '{name}' requires a signature")
        model["latest_version"] = (model["latest_version"] or 0) + 1
        version = {
            "model": name,
            "version": model["latest_version"],
            "sha256": hashlib.sha256(body).hexdigest(),
            "size": len(body),
            "format": "onnx",
            "signature": {"inputs": [], "outputs": []},
            "uploaded_by": caller,
            "created_at": NOW,
            "layout": request.url.params.get("layout", "file"),
            "file_name": request.url.params.get("filename", "model"),
            # Not a real verification: the fake names the bundle's digest as its signer.
            "signer": None if encoded is None else fake_signer(base64.b64decode(encoded)),
        }
        self.versions.setdefault(name, []).append(version)
        return httpx.Response(201, json=version)

    def _put_model(
        self, request: httpx.Request, body: bytes, caller: str, name: str
    ) -> httpx.Response:
        data = json.loads(body)
        created = name not in self.models
        if created:
            self.create_model(name, caller=caller)
        model = self.models[name]
        if data.get("description") is not None:
            model["description"] = data["description"]
        if data.get("require_signature") is not None:
            model["require_signature"] = data["require_signature"]
        return httpx.Response(201 if created else 200, json=model)

    def _list_publishers(
        self, request: httpx.Request, body: bytes, caller: str, name: str
    ) -> httpx.Response:
        if name not in self.models:
            return _error(404, f"no model {name}")
        listed = [
            {"model": name, "fingerprint": fp, "public_key": pem}
            for fp, pem in sorted(self.publishers[name].items())
        ]
        return httpx.Response(200, json={"publishers": listed})

    def _add_publisher(
        self, request: httpx.Request, body: bytes, caller: str, name: str
    ) -> httpx.Response:
        if name not in self.models:
            return _error(404, f"no model {name}")
        key = load_public_key(json.loads(body)["public_key"])
        self.publishers[name][key.fingerprint] = key.pem
        self.models[name]["publishers"] = sorted(self.publishers[name])
        return httpx.Response(
            201, json={"model": name, "fingerprint": key.fingerprint, "public_key": key.pem}
        )

    def _remove_publisher(
        self, request: httpx.Request, body: bytes, caller: str, name: str, fingerprint: str
    ) -> httpx.Response:
        if fingerprint not in self.publishers.get(name, {}):
            return _error(404, f"no publisher {fingerprint} for {name}")
        del self.publishers[name][fingerprint]
        self.models[name]["publishers"] = sorted(self.publishers[name])
        return httpx.Response(204)

    def _list_models(self, request: httpx.Request, body: bytes, caller: str) -> httpx.Response:
        return httpx.Response(200, json={"models": list(self.models.values())})

    def _get_model(
        self, request: httpx.Request, body: bytes, caller: str, name: str
    ) -> httpx.Response:
        if name not in self.models:
            return _error(404, f"no model {name}")
        return httpx.Response(200, json=self.models[name])

    def _list_versions(
        self, request: httpx.Request, body: bytes, caller: str, name: str
    ) -> httpx.Response:
        if name not in self.models:
            return _error(404, f"no model {name}")
        return httpx.Response(200, json={"versions": self.versions[name]})

    def _set_label(
        self, request: httpx.Request, body: bytes, caller: str, name: str, label: str
    ) -> httpx.Response:
        version = json.loads(body)["version"]
        if name not in self.models or not 1 <= version <= self.models[name]["latest_version"]:
            return _error(404, f"no version {version} of {name}")
        self.models[name]["labels"][label] = version
        return httpx.Response(200, json={"model": name, "label": label, "version": version})

    def _remove_label(
        self, request: httpx.Request, body: bytes, caller: str, name: str, label: str
    ) -> httpx.Response:
        if label not in self.models.get(name, {}).get("labels", {}):
            return _error(404, f"no label {label} on {name}")
        del self.models[name]["labels"][label]
        return httpx.Response(204)

    def _create_key(self, request: httpx.Request, body: bytes, caller: str) -> httpx.Response:
        data = json.loads(body)
        key_id = f"key{len(self.keys):09d}"
        key = _key(key_id, data["role"], data["models"], data["description"], data["expires_at"])
        self.keys[key_id] = key
        secret = f"mk_{key_id}_freshSecret{len(self.keys)}"
        self.tokens[secret] = key_id
        return httpx.Response(201, json={**key, "key": secret})

    def _list_keys(self, request: httpx.Request, body: bytes, caller: str) -> httpx.Response:
        return httpx.Response(200, json={"keys": list(self.keys.values())})

    def _revoke_key(
        self, request: httpx.Request, body: bytes, caller: str, key_id: str
    ) -> httpx.Response:
        if key_id not in self.keys:
            return _error(404, "no such key")
        self.keys[key_id]["revoked_at"] = NOW
        return httpx.Response(200, json=self.keys[key_id])

    def _whoami(self, request: httpx.Request, body: bytes, caller: str) -> httpx.Response:
        return httpx.Response(200, json=self.keys[caller])

    # -- helpers for tests --------------------------------------------------------------------

    def create_model(
        self, name: str, *, caller: str = ADMIN_ID, require_signature: bool = True
    ) -> dict[str, Any]:
        """Create model ``name`` (no versions) without recording a request."""
        self.publishers[name] = {}
        self.models[name] = {
            "name": name,
            "description": "",
            "created_by": caller,
            "created_at": NOW,
            "latest_version": None,
            "labels": {},
            "require_signature": require_signature,
            "publishers": [],
        }
        return self.models[name]

    def add_model(self, name: str, *contents: bytes) -> None:
        """Create ``name`` if needed and push ``contents`` unsigned as versions 1, 2, ...,
        without recording requests."""
        if name not in self.models:
            self.create_model(name, require_signature=False)
        for content in contents:
            request = httpx.Request(
                "POST",
                f"https://x/api/v1/models/{name}/versions",
                content=content,
                headers={"content-type": "application/octet-stream"},
            )
            self._push(request, content, ADMIN_ID, name)


def fake_signer(bundle: bytes) -> str:
    """The signer the fake server reports for ``bundle``: a fingerprint-shaped digest of it."""
    return "sha256:" + hashlib.sha256(bundle).hexdigest()


def _key(
    key_id: str,
    role: str,
    models: list[str] | None,
    description: str = "",
    expires_at: str | None = None,
) -> dict[str, Any]:
    return {
        "id": key_id,
        "role": role,
        "models": models,
        "description": description,
        "created_at": NOW,
        "expires_at": expires_at,
        "revoked_at": None,
    }


def _error(status: int, message: str) -> httpx.Response:
    return httpx.Response(status, json={"error": message})


Invoke = Callable[..., Result]


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The developer's own MODELKEEP_* settings and proxies must not leak into a test."""
    for name in (
        "MODELKEEP_URL",
        "MODELKEEP_TOKEN",
        "MODELKEEP_CACERT",
        "MODELKEEP_DATA_DIR",
        "MODELKEEP_HOST",
        "MODELKEEP_PORT",
        "MODELKEEP_WORKERS",
        "MODELKEEP_DATABASE_URL",
        "MODELKEEP_DEBUG",
        # A proxy would stand between the client and the real local sockets some tests use.
        "HTTPS_PROXY",
        "https_proxy",
        "HTTP_PROXY",
        "http_proxy",
        "ALL_PROXY",
        "all_proxy",
    ):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def server() -> FakeServer:
    return FakeServer()


@pytest.fixture
def invoke(server: FakeServer) -> Invoke:
    """Run ``modelkeep ARGS`` against ``server`` with the admin token in MODELKEEP_TOKEN."""
    runner = CliRunner()

    def run(
        *args: str,
        token: str | None = ADMIN_TOKEN,
        env: dict[str, str] | None = None,
        transport: httpx.BaseTransport | None = server,
    ) -> Result:
        full_env = {"COLUMNS": "200", **(env or {})}
        if token is not None:
            full_env["MODELKEEP_TOKEN"] = token
        obj = ClientOverrides(transport=transport) if transport is not None else None
        return runner.invoke(app, list(args), env=full_env, obj=obj)

    return run
