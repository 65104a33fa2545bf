"""Authorization matrix over real HTTPS: every route crossed with every kind of credential.

The point: no route answers a caller it should refuse. ``MATRIX`` below is the specification, one
row per route and one column per credential; each cell is its own parametrized case. Semantics:
no, malformed, unknown, expired or revoked credentials get 401 with ``{"error": ...}``; admin may
do everything; a publisher reads, pushes and moves labels on its models; a consumer reads and runs
inference on its models; an auditor reads metadata and lists keys; every authenticated key may
read ``/v2``, the (filtered) model list, whoami and the OpenAPI document; only admins see and
rotate the key-encryption key; a key bound to another model gets 403 on this model's routes.
Lifecycle (docs/lifecycle.md): readers of a model read its BOM, evaluation, protections,
history and retention rule, and the drift status unless they are consumers; only admins
delete, set retention, drift, evaluation sets and protections; publishers may also roll back
and re-run evaluations; a change request that does not exist is 404 to every key.
The expired and revoked keys are admin keys, so a server that forgot to check expiry or
revocation would answer them.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from harness import Server, create_key, push, sign_bytes

from modelkeep.testing import build_iris_onnx, iris_rows

pytestmark = pytest.mark.integration

MODEL = "alpha"  # the model every scoped key of the matrix is bound to
OTHER = "beta"  # the model the "-other" keys are bound to
EXTRA = "gamma"  # a model only unscoped keys may see

# Column abbreviations used in MATRIX, in column order.
CREDENTIALS: dict[str, str] = {
    "none": "none",  # no Authorization header
    "hdr": "malformed-header",  # the admin key under a scheme other than Bearer
    "key": "malformed-key",  # the admin key with its last character cut off
    "unk": "unknown-key",  # a well-formed key whose id the server never issued
    "exp": "expired-key",  # an admin key whose expires_at has passed
    "rev": "revoked-key",  # an admin key that was revoked
    "adm": "admin",
    "pub": "publisher",  # publisher bound to MODEL
    "con": "consumer",  # consumer bound to MODEL
    "aud": "auditor",  # auditor over every model
    "pbo": "publisher-other",  # publisher bound to OTHER only
    "cbo": "consumer-other",  # consumer bound to OTHER only
}

# {m} = MODEL, {v} = 1, {l} = a label fresh per cell, {id} = a throwaway key fresh per cell,
# {fp} = a publisher key trusted for MODEL fresh per cell.
MATRIX = """
method route                                  none hdr key unk exp rev adm pub con aud pbo cbo
GET    /v2/health/live                        200  200 200 200 200 200 200 200 200 200 200 200
GET    /v2/health/ready                       200  200 200 200 200 200 200 200 200 200 200 200
GET    /v2                                    401  401 401 401 401 401 200 200 200 200 200 200
GET    /v2/models/{m}                         401  401 401 401 401 401 200 200 200 200 403 403
GET    /v2/models/{m}/versions/{v}            401  401 401 401 401 401 200 200 200 200 403 403
GET    /v2/models/{m}/ready                   401  401 401 401 401 401 200 200 200 200 403 403
GET    /v2/models/{m}/versions/{v}/ready      401  401 401 401 401 401 200 200 200 200 403 403
POST   /v2/models/{m}/infer                   401  401 401 401 401 401 200 403 200 403 403 403
POST   /v2/models/{m}/versions/{v}/infer      401  401 401 401 401 401 200 403 200 403 403 403
POST   /api/v1/models/{m}/versions            401  401 401 401 401 401 201 201 403 403 403 403
GET    /api/v1/models                         401  401 401 401 401 401 200 200 200 200 200 200
GET    /api/v1/models/{m}                     401  401 401 401 401 401 200 200 200 200 403 403
GET    /api/v1/models/{m}/versions            401  401 401 401 401 401 200 200 200 200 403 403
GET    /api/v1/models/{m}/versions/{v}        401  401 401 401 401 401 200 200 200 200 403 403
PUT    /api/v1/models/{m}                     401  401 401 401 401 401 200 403 403 403 403 403
GET    /api/v1/models/{m}/publishers          401  401 401 401 401 401 200 200 200 200 403 403
POST   /api/v1/models/{m}/publishers          401  401 401 401 401 401 201 403 403 403 403 403
DELETE /api/v1/models/{m}/publishers/{fp}     401  401 401 401 401 401 204 403 403 403 403 403
GET    /api/v1/models/{m}/policy              401  401 401 401 401 401 200 403 403 200 403 403
PUT    /api/v1/models/{m}/policy              401  401 401 401 401 401 200 403 403 403 403 403
POST   /api/v1/models/{m}/policy/calibrate    401  401 401 401 401 401 400 403 403 403 403 403
DELETE /api/v1/models/{m}/restrictions/{id}   401  401 401 401 401 401 404 403 403 403 403 403
POST   /api/v1/models/{m}/budgets/{id}/reset  401  401 401 401 401 401 204 403 403 403 403 403
GET    /api/v1/audit/entries                  401  401 401 401 401 401 200 403 403 200 403 403
GET    /api/v1/audit/verify                   401  401 401 401 401 401 200 403 403 200 403 403
PUT    /api/v1/models/{m}/labels/{l}          401  401 401 401 401 401 200 200 403 403 403 403
DELETE /api/v1/models/{m}/labels/{l}          401  401 401 401 401 401 204 204 403 403 403 403
POST   /api/v1/keys                           401  401 401 401 401 401 201 403 403 403 403 403
GET    /api/v1/keys                           401  401 401 401 401 401 200 403 403 200 403 403
DELETE /api/v1/keys/{id}                      401  401 401 401 401 401 200 403 403 403 403 403
GET    /api/v1/whoami                         401  401 401 401 401 401 200 200 200 200 200 200
GET    /api/v1/openapi.json                   401  401 401 401 401 401 200 200 200 200 200 200
GET    /api/v1/kek                            401  401 401 401 401 401 200 403 403 403 403 403
POST   /api/v1/kek/rotate                     401  401 401 401 401 401 200 403 403 403 403 403
POST   /api/v1/kek/rewrap                     401  401 401 401 401 401 200 403 403 403 403 403
GET    /api/v1/models/{m}/versions/{v}/bom    401  401 401 401 401 401 200 200 200 200 403 403
DELETE /api/v1/models/{m}/versions/{v}        401  401 401 401 401 401 409 403 403 403 403 403
GET    /api/v1/models/{m}/retention           401  401 401 401 401 401 200 200 200 200 403 403
PUT    /api/v1/models/{m}/retention           401  401 401 401 401 401 200 403 403 403 403 403
GET    /api/v1/models/{m}/drift               401  401 401 401 401 401 200 200 403 200 403 403
PUT    /api/v1/models/{m}/drift               401  401 401 401 401 401 400 403 403 403 403 403
GET    /api/v1/models/{m}/eval                401  401 401 401 401 401 200 200 200 200 403 403
PUT    /api/v1/models/{m}/eval                401  401 401 401 401 401 400 403 403 403 403 403
PUT    /api/v1/models/{m}/eval/gates          401  401 401 401 401 401 400 403 403 403 403 403
POST   /api/v1/models/{m}/versions/{v}/evaluate 401 401 401 401 401 401 404 404 403 403 403 403
GET    /api/v1/models/{m}/protection          401  401 401 401 401 401 200 200 200 200 403 403
PUT    /api/v1/models/{m}/protection/{l}      401  401 401 401 401 401 200 403 403 403 403 403
GET    /api/v1/models/{m}/history             401  401 401 401 401 401 200 200 200 200 403 403
POST   /api/v1/models/{m}/labels/{l}/rollback 401  401 401 401 401 401 404 404 403 403 403 403
GET    /api/v1/changes                        401  401 401 401 401 401 200 200 200 200 200 200
GET    /api/v1/changes/{id}                   401  401 401 401 401 401 404 404 404 404 404 404
POST   /api/v1/changes/{id}/approve           401  401 401 401 401 401 404 404 404 404 404 404
POST   /api/v1/changes/{id}/reject            401  401 401 401 401 401 404 404 404 404 404 404
"""

UNAUTHENTICATED_MESSAGE = {
    "none": "missing credentials",
    "malformed-header": "malformed authorization header",
    "malformed-key": "malformed API key",
    "unknown-key": "invalid API key",
    "expired-key": "API key expired",
    "revoked-key": "API key revoked",
}


@dataclass(frozen=True)
class Cell:
    method: str
    route: str
    credential: str
    expected: int


def parse_matrix(text: str) -> list[Cell]:
    lines = [line.split() for line in text.strip().splitlines()]
    header, rows = lines[0], lines[1:]
    assert header[2:] == list(CREDENTIALS), "MATRIX columns must follow CREDENTIALS"
    cells = []
    for method, route, *statuses in rows:
        assert len(statuses) == len(CREDENTIALS), route
        for column, status in zip(CREDENTIALS.values(), statuses, strict=True):
            cells.append(Cell(method, route, column, int(status)))
    return cells


CELLS = parse_matrix(MATRIX)
EXPECTED_ROUTE_COUNT = 53


def test_the_matrix_covers_every_route_and_credential() -> None:
    routes = {(cell.method, cell.route) for cell in CELLS}
    assert len(routes) == EXPECTED_ROUTE_COUNT
    assert len(routes) * len(CREDENTIALS) == len(CELLS)


def fresh_public_key() -> tuple[str, str]:
    """(fingerprint, PEM) of a new EC P-256 public key."""
    from modelkeep.crypto.signing import load_public_key

    pem = (
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    return load_public_key(pem).fingerprint, pem


def v2_body(rows: list[list[float]]) -> dict[str, object]:
    return {
        "inputs": [{"name": "input", "shape": [len(rows), 4], "datatype": "FP32", "data": rows}]
    }


@dataclass
class World:
    server: Server
    iris: bytes
    clients: dict[str, httpx.Client]
    key_ids: dict[str, str]

    @property
    def admin(self) -> httpx.Client:
        return self.clients["admin"]

    def model(self, name: str = MODEL) -> dict[str, Any]:
        r = self.admin.get(f"/api/v1/models/{name}")
        assert r.status_code == 200, r.text
        body: dict[str, Any] = r.json()
        return body

    def keys(self) -> dict[str, dict[str, Any]]:
        r = self.admin.get("/api/v1/keys")
        assert r.status_code == 200, r.text
        return {k["id"]: k for k in r.json()["keys"]}


def _client(server: Server, authorization: str | None) -> httpx.Client:
    headers = {"Authorization": authorization} if authorization is not None else {}
    return httpx.Client(base_url=server.url, verify=server.tls(), headers=headers, timeout=60)


@pytest.fixture(scope="module")
def world(server: Server) -> Iterator[World]:
    admin_key = server.admin_key
    admin_secret = admin_key.split("_", 2)[2]
    clients: dict[str, httpx.Client] = {}
    key_ids: dict[str, str] = {"admin": admin_key.split("_", 2)[1]}
    try:
        clients["admin"] = _client(server, f"Bearer {admin_key}")

        # The expired key comes first so that the rest of the setup overlaps its lifetime.
        expires_at = datetime.now(UTC) + timedelta(seconds=2)
        expiring = create_key(server, "admin", None, expires_at=expires_at.isoformat())
        clients["expired-key"] = _client(server, f"Bearer {expiring['key']}")
        # Control: the key works while it is valid, so its later 401 is the expiry's doing.
        assert clients["expired-key"].get("/api/v1/whoami").status_code == 200

        iris = build_iris_onnx()
        for name in (MODEL, OTHER, EXTRA):
            r = push(server, name, iris)
            assert r.status_code == 201, r.text
        # Pinned, so pushes made by matrix cells do not change which version infer serves.
        r = clients["admin"].put(f"/api/v1/models/{MODEL}/labels/production", json={"version": 1})
        assert r.status_code == 200, r.text

        scoped = {
            "publisher": ("publisher", [MODEL]),
            "consumer": ("consumer", [MODEL]),
            "auditor": ("auditor", None),
            "publisher-other": ("publisher", [OTHER]),
            "consumer-other": ("consumer", [OTHER]),
        }
        for credential, (role, models) in scoped.items():
            created = create_key(server, role, models)
            clients[credential] = _client(server, f"Bearer {created['key']}")
            key_ids[credential] = str(created["id"])

        revoked = create_key(server, "admin", None)
        clients["revoked-key"] = _client(server, f"Bearer {revoked['key']}")
        assert clients["revoked-key"].get("/api/v1/whoami").status_code == 200
        r = clients["admin"].delete(f"/api/v1/keys/{revoked['id']}")
        assert r.status_code == 200, r.text

        clients["none"] = _client(server, None)
        clients["malformed-header"] = _client(server, f"Token {admin_key}")
        clients["malformed-key"] = _client(server, f"Bearer {admin_key[:-1]}")
        clients["unknown-key"] = _client(server, f"Bearer mk_{'a' * 12}_{admin_secret}")

        # Expiry is judged by the server's wall clock, so the only way to get an expired key
        # from a real server is to let the time pass (once per module).
        remaining = (expires_at - datetime.now(UTC)).total_seconds()
        time.sleep(max(0.0, remaining) + 0.1)

        yield World(server=server, iris=iris, clients=clients, key_ids=key_ids)
    finally:
        for client in clients.values():
            client.close()


def _cell_id(cell: Cell) -> str:
    return f"{cell.method} {cell.route} | {cell.credential}"


@pytest.mark.parametrize("cell", [pytest.param(c, id=_cell_id(c)) for c in CELLS])
def test_cell(world: World, cell: Cell) -> None:
    """The route answers this credential with exactly the status the matrix states."""
    client = world.clients[cell.credential]
    route = (cell.method, cell.route)
    allowed = cell.expected < 400
    # Labels and throwaway keys are fresh per cell, so no cell depends on another's effects.
    label = f"l-{cell.credential}"
    key_id = ""
    fingerprint = ""
    kwargs: dict[str, Any] = {}
    before: Any = None

    if route[1].endswith("/infer"):
        kwargs["json"] = v2_body(iris_rows(3))
    elif route == ("POST", "/api/v1/models/{m}/versions"):
        kwargs["content"] = world.iris
        kwargs["params"] = {"filename": "model.onnx"}
        kwargs["headers"] = {
            "Content-Type": "application/octet-stream",
            "Modelkeep-Signature": base64.b64encode(sign_bytes(world.iris)).decode(),
        }
        before = world.model()["latest_version"]
    elif route == ("PUT", "/api/v1/models/{m}"):
        kwargs["json"] = {"description": f"set by {cell.credential}"}
        before = world.model()["description"]
    elif route == ("POST", "/api/v1/models/{m}/publishers"):
        kwargs["json"] = {"public_key": fresh_public_key()[1]}
        before = world.model()["publishers"]
    elif route == ("PUT", "/api/v1/models/{m}/policy"):
        kwargs["json"] = {"output": "full"}
    elif route == ("POST", "/api/v1/models/{m}/policy/calibrate"):
        kwargs["json"] = {"rows": [[5.1, 3.5, 1.4, 0.2]]}  # too few: an allowed caller gets 400
    elif route in (
        ("DELETE", "/api/v1/models/{m}/restrictions/{id}"),
        ("POST", "/api/v1/models/{m}/budgets/{id}/reset"),
    ):
        key_id = world.key_ids["consumer"]
    elif route == ("DELETE", "/api/v1/models/{m}/publishers/{fp}"):
        fingerprint, pem = fresh_public_key()
        r = world.admin.post(f"/api/v1/models/{MODEL}/publishers", json={"public_key": pem})
        assert r.status_code == 201, r.text
    elif route == ("PUT", "/api/v1/models/{m}/labels/{l}"):
        kwargs["json"] = {"version": 1}
        assert label not in world.model()["labels"]
    elif route == ("DELETE", "/api/v1/models/{m}/labels/{l}"):
        r = world.admin.put(f"/api/v1/models/{MODEL}/labels/{label}", json={"version": 1})
        assert r.status_code == 200, r.text
    elif route == ("POST", "/api/v1/keys"):
        kwargs["json"] = {"role": "consumer", "models": [MODEL], "description": cell.credential}
        before = len(world.keys())
    elif route == ("DELETE", "/api/v1/keys/{id}"):
        key_id = str(create_key(world.server, "consumer", [MODEL])["id"])
    # Lifecycle (docs/lifecycle.md): requests an allowed caller gets past authorization with,
    # refused after it where they would change lasting state (version 1 is under production;
    # the model has no evaluation set or drift reference; the label and change do not exist).
    elif route == ("PUT", "/api/v1/models/{m}/retention"):
        kwargs["json"] = {"keep_versions": None, "capture_days": None}
    elif route == ("PUT", "/api/v1/models/{m}/drift"):
        kwargs["json"] = {"window": 100}
    elif route == ("PUT", "/api/v1/models/{m}/eval"):
        kwargs["content"] = b"not an npz"
        kwargs["headers"] = {"Content-Type": "application/octet-stream"}
    elif route == ("PUT", "/api/v1/models/{m}/eval/gates"):
        kwargs["json"] = {"gates": ["accuracy>=0.5"]}
    elif route == ("PUT", "/api/v1/models/{m}/protection/{l}"):
        kwargs["json"] = {"approvals": 0}
    elif route[1].startswith("/api/v1/changes/{id}"):
        key_id = "c" * 32
        if route[1].endswith("/reject"):
            kwargs["json"] = {"reason": "matrix"}

    path = cell.route.format(m=MODEL, v=1, l=label, id=key_id, fp=fingerprint)
    r = client.request(cell.method, path, **kwargs)

    assert cell.expected == r.status_code, r.text
    if r.status_code == 401:
        assert {"error": UNAUTHENTICATED_MESSAGE[cell.credential]} == r.json()
    elif r.status_code == 403:
        body = r.json()
        assert list(body) == ["error"]
        assert isinstance(body["error"], str)

    # What the call did (or, refused, did not do) to the server's state.
    if route == ("POST", "/api/v1/models/{m}/versions"):
        assert before + (1 if allowed else 0) == world.model()["latest_version"]
    elif route == ("PUT", "/api/v1/models/{m}/labels/{l}"):
        assert (1 if allowed else None) == world.model()["labels"].get(label)
    elif route == ("PUT", "/api/v1/models/{m}"):
        expected_description = f"set by {cell.credential}" if allowed else before
        assert expected_description == world.model()["description"]
    elif route == ("POST", "/api/v1/models/{m}/publishers"):
        assert (len(before) + (1 if allowed else 0)) == len(world.model()["publishers"])
    elif route == ("PUT", "/api/v1/models/{m}/policy"):
        kwargs["json"] = {"output": "full"}
    elif route == ("POST", "/api/v1/models/{m}/policy/calibrate"):
        kwargs["json"] = {"rows": [[5.1, 3.5, 1.4, 0.2]]}  # too few: an allowed caller gets 400
    elif route in (
        ("DELETE", "/api/v1/models/{m}/restrictions/{id}"),
        ("POST", "/api/v1/models/{m}/budgets/{id}/reset"),
    ):
        key_id = world.key_ids["consumer"]
    elif route == ("DELETE", "/api/v1/models/{m}/publishers/{fp}"):
        assert allowed == (fingerprint not in world.model()["publishers"])
    elif route == ("DELETE", "/api/v1/models/{m}/labels/{l}"):
        assert (None if allowed else 1) == world.model()["labels"].get(label)
    elif route == ("POST", "/api/v1/keys"):
        assert before + (1 if allowed else 0) == len(world.keys())
    elif route == ("DELETE", "/api/v1/keys/{id}"):
        assert allowed == (world.keys()[key_id]["revoked_at"] is not None)
    elif allowed and route == ("GET", "/api/v1/kek"):
        assert r.json()["key_service"] == "local"
    elif allowed and route == ("POST", "/api/v1/kek/rewrap"):
        assert (r.json()["remaining"], r.json()["after"]) == (0, None)
    elif allowed and route == ("GET", "/api/v1/whoami"):
        assert world.key_ids[cell.credential] == r.json()["id"]
    elif allowed and route[1].endswith("/ready") and route[1].startswith("/v2/models"):
        assert r.json() == {"name": MODEL, "ready": True}
    elif allowed and route[1].endswith("/infer"):
        assert (r.json()["model_name"], r.json()["model_version"]) == (MODEL, "1")


@pytest.mark.parametrize(
    ("credential", "expected"),
    [
        ("admin", [MODEL, OTHER, EXTRA]),
        ("auditor", [MODEL, OTHER, EXTRA]),
        ("publisher", [MODEL]),
        ("consumer", [MODEL]),
        ("publisher-other", [OTHER]),
        ("consumer-other", [OTHER]),
    ],
)
def test_model_list_shows_only_the_models_in_the_keys_scope(
    world: World, credential: str, expected: list[str]
) -> None:
    r = world.clients[credential].get("/api/v1/models")
    assert r.status_code == 200, r.text
    assert expected == [m["name"] for m in r.json()["models"]]


@pytest.mark.parametrize(
    "path",
    ["/v2/models/{m}", "/v2/models/{m}/ready", "/api/v1/models/{m}", "/api/v1/models/{m}/versions"],
)
def test_a_scoped_key_cannot_tell_other_models_from_missing_ones(world: World, path: str) -> None:
    client = world.clients["consumer-other"]
    existing = client.get(path.format(m=MODEL))
    missing = client.get(path.format(m="no-such-model"))
    assert (403, existing.json()) == (missing.status_code, missing.json())
