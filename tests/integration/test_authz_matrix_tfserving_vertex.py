"""Authorization matrix for the TensorFlow Serving and Vertex AI routes, as for V2.

The same credentials and the same world as ``test_authz_matrix.py`` (imported from it), on a
server that is also a Vertex AI container serving the matrix's model. A protocol is a way in,
never around: each new route refuses exactly whom the V2 route it mirrors refuses.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from harness import Server, init_server
from test_authz_matrix import (  # the shared world fixture and its credentials
    MODEL,
    UNAUTHENTICATED_MESSAGE,
    Cell,
    World,
    parse_matrix,
    world,
)

from modelkeep.testing import iris_rows

pytestmark = pytest.mark.integration

__all__ = ["world"]  # re-exported: pytest finds the fixture in this module

VERTEX_PREDICT = "/vertex:predict"
VERTEX_HEALTH = "/vertex/health"

# {m} = MODEL, {v} = 1, production = the label pinned to version 1 by the world.
MATRIX = """
method route                                        none hdr key unk exp rev adm pub con aud pbo cbo
POST   /v1/models/{m}:predict                       401  401 401 401 401 401 200 403 200 403 403 403
POST   /v1/models/{m}/versions/{v}:predict          401  401 401 401 401 401 200 403 200 403 403 403
POST   /v1/models/{m}/labels/production:predict     401  401 401 401 401 401 200 403 200 403 403 403
POST   /v1/models/{m}:classify                      401  401 401 401 401 401 200 403 200 403 403 403
POST   /v1/models/{m}/versions/{v}:classify         401  401 401 401 401 401 200 403 200 403 403 403
POST   /v1/models/{m}:regress                       401  401 401 401 401 401 400 403 400 403 403 403
GET    /v1/models/{m}                               401  401 401 401 401 401 200 200 200 200 403 403
GET    /v1/models/{m}/versions/{v}                  401  401 401 401 401 401 200 200 200 200 403 403
GET    /v1/models/{m}/labels/production             401  401 401 401 401 401 200 200 200 200 403 403
GET    /v1/models/{m}/metadata                      401  401 401 401 401 401 200 200 200 200 403 403
GET    /v1/models/{m}/versions/{v}/metadata         401  401 401 401 401 401 200 200 200 200 403 403
GET    /v1/models/{m}/labels/production/metadata    401  401 401 401 401 401 200 200 200 200 403 403
POST   /vertex:predict                              401  401 401 401 401 401 200 403 200 403 403 403
GET    /vertex/health                               200  200 200 200 200 200 200 200 200 200 200 200
"""

CELLS = parse_matrix(MATRIX)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The matrix's server, also a Vertex AI container serving the matrix's model."""
    srv = init_server(tmp_path_factory.mktemp("srv"))
    srv.extra_env = {
        "AIP_PREDICT_ROUTE": VERTEX_PREDICT,
        "AIP_HEALTH_ROUTE": VERTEX_HEALTH,
        "MODELKEEP_VERTEX_MODEL": MODEL,
    }
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


def test_the_matrix_covers_every_new_route() -> None:
    routes = {(cell.method, cell.route) for cell in CELLS}
    assert len(routes) == 14


def _cell_id(cell: Cell) -> str:
    return f"{cell.method} {cell.route} | {cell.credential}"


@pytest.mark.parametrize("cell", [pytest.param(c, id=_cell_id(c)) for c in CELLS])
def test_cell(world: World, cell: Cell) -> None:
    """The route answers this credential with exactly the status the matrix states."""
    client = world.clients[cell.credential]
    kwargs: dict[str, Any] = {}
    rows = iris_rows(3)
    if cell.route.endswith((":classify", ":regress")):
        kwargs["json"] = {"examples": [{"input": row} for row in rows]}
    elif cell.method == "POST":
        kwargs["json"] = {"instances": rows}
    r = client.request(cell.method, cell.route.format(m=MODEL, v=1), **kwargs)

    assert cell.expected == r.status_code, r.text
    if r.status_code == 401:
        assert {"error": UNAUTHENTICATED_MESSAGE[cell.credential]} == r.json()
    elif r.status_code in (400, 403):
        body = r.json()
        assert list(body) == ["error"]
        assert isinstance(body["error"], str)
    elif (
        cell.route.endswith(":predict") and cell.route.startswith("/v1/models")
    ) or cell.route == VERTEX_PREDICT:
        assert len(r.json()["predictions"]) == 3
    elif cell.route.endswith("/metadata"):
        assert r.json()["model_spec"] == {"name": MODEL, "signature_name": "", "version": "1"}
    elif cell.method == "GET" and cell.route.startswith("/v1/models"):
        assert r.json()["model_version_status"][0]["state"] == "AVAILABLE"


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v1/models/{m}:predict"),
        ("GET", "/v1/models/{m}"),
        ("GET", "/v1/models/{m}/metadata"),
        ("GET", "/v1/models/{m}/labels/production"),
    ],
)
def test_a_scoped_key_cannot_tell_other_models_from_missing_ones(
    world: World, method: str, path: str
) -> None:
    client = world.clients["consumer-other"]
    body = {"instances": iris_rows(1)} if method == "POST" else None
    existing = client.request(method, path.format(m=MODEL), json=body)
    missing = client.request(method, path.format(m="no-such-model"), json=body)
    assert (403, existing.json()) == (missing.status_code, missing.json())
