"""The served OpenAPI description tells the truth: schemathesis, every check, finds nothing.

A real server on a throwaway data directory, an admin key, and ``schemathesis run --checks
all`` against ``/api/v1/openapi.json``: every status a route answers is documented with the
error schema, responses match their schemas and content types, schema-valid requests are
accepted and schema-violating ones refused, 405s name the allowed methods, nothing answers
5xx. The run creates, changes and deletes freely (models, keys, labels, KEKs); only the key it
runs with is kept (schemathesis_hooks.py). Operations whose acceptable input JSON Schema cannot
describe (a model file, an .npz, a future expiry, tensors that fit a model) are listed in
schemathesis.toml.

The protocols' routes are in the run too (V2 infer, TF Serving, Vertex AI's configured routes;
SageMaker's and Azure ML's contracts are not in this description, they have their own), called
on the model the run pushes, its version 1 and a label naming it (schemathesis.toml), so that
they reach the data plane rather than a 404.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from harness import init_server, push

from modelkeep.testing import build_iris_onnx

pytestmark = pytest.mark.integration

HERE = Path(__file__).parent
SCHEMATHESIS = str(Path(sys.executable).parent / "schemathesis")
# Per operation: enough to reach every documented status on this API in well under a minute.
EXAMPLES = "10"


def test_schemathesis_with_every_check_finds_no_failure(tmp_path: Path) -> None:
    # Vertex AI's routes are described (and fuzzed) only when configured.
    server = init_server(
        tmp_path,
        extra_env={
            "MODELKEEP_VERTEX_PREDICT_ROUTE": "/vertex/predict",
            "MODELKEEP_VERTEX_HEALTH_ROUTE": "/vertex/health",
            "MODELKEEP_VERTEX_MODEL": "iris",
        },
    )
    server.start()
    try:
        # Something to find: the run otherwise meets only 404s on the model routes.
        assert push(server, "iris", build_iris_onnx()).status_code == 201
        with server.client(server.admin_key) as client:
            key_id = client.get("/api/v1/whoami").json()["id"]
            # The label the protocols' label routes are called with (schemathesis.toml).
            labelled = client.put("/api/v1/models/iris/labels/canary", json={"version": 1})
            assert labelled.status_code == 200, labelled.text
        run = subprocess.run(
            [
                SCHEMATHESIS,
                "--config-file",
                str(HERE / "schemathesis.toml"),
                "--no-color",
                "run",
                f"{server.url}/api/v1/openapi.json",
                "--header",
                f"Authorization: Bearer {server.admin_key}",
                "--tls-verify",
                str(server.ca_cert),
                "--checks",
                "all",
                "--max-examples",
                EXAMPLES,
                "--workers",
                "1",
                "--generation-database",
                "none",
            ],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            env={
                **os.environ,
                "SCHEMATHESIS_HOOKS": "schemathesis_hooks",
                "PYTHONPATH": str(HERE),
                "MODELKEEP_FUZZ_KEPT_KEY_ID": key_id,
            },
            timeout=240,
        )
    finally:
        server.stop()
    report = run.stdout[-12_000:] + run.stderr[-2_000:]
    assert run.returncode == 0, report
    # Every selected operation was reached (none skipped for an error of the run itself).
    selected = re.search(r"Selected: (\d+)/\d+", run.stdout)
    tested = re.search(r"Tested: (\d+)", run.stdout)
    assert selected is not None, report
    assert tested is not None, report
    assert selected.group(1) == tested.group(1), report
