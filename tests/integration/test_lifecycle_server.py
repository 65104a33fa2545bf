"""The lifecycle on a real HTTPS server and the installed `modelkeep` command: a protected label
moves only with a second person's approval, gates block a bad version, every step is audited and
`modelkeep audit verify` still passes."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import numpy as np
import pytest
from harness import Server, create_key, push, run_cli

from modelkeep.testing import build_iris_onnx

pytestmark = pytest.mark.integration

MODEL = "lifecycle"


def iris_evalset(path: Path) -> Path:
    from sklearn.datasets import load_iris

    iris = load_iris()
    buffer = io.BytesIO()
    np.savez(buffer, inputs=iris.data.astype(np.float32), expected=iris.target.astype(np.int64))
    path.write_bytes(buffer.getvalue())
    return path


def wait_evaluated(server: Server, version: int) -> dict[str, object]:
    deadline = time.monotonic() + 60
    with server.client(server.admin_key) as c:
        while True:
            r = c.get(f"/api/v1/models/{MODEL}/eval", params={"version": version})
            found: dict[str, object] = r.json()["versions"][0]
            if found["status"] != "pending" or time.monotonic() > deadline:
                return found
            time.sleep(0.2)


def test_a_protected_label_moves_only_with_a_second_persons_approval(
    server: Server, tmp_path: Path
) -> None:
    publisher = create_key(server, "publisher", [MODEL])
    approver = create_key(server, "approver", [MODEL])
    data = iris_evalset(tmp_path / "eval.npz")
    admin_env = server.cli_env()
    publisher_env = server.cli_env(str(publisher["key"]))
    approver_env = server.cli_env(str(approver["key"]))

    assert push(server, MODEL, build_iris_onnx(), token=str(publisher["key"])).status_code == 201
    run_cli("eval", "set", MODEL, "--data", str(data), "--gate", "accuracy>=0.9", env=admin_env)
    run_cli("label", "protect", MODEL, "production", "--approvals", "1", env=admin_env)
    assert wait_evaluated(server, 1)["status"] == "passed"

    opened = json.loads(
        run_cli("label", "set", MODEL, "production", "1", "--json", env=publisher_env).stdout
    )
    assert (opened["status"], opened["approvals_needed"]) == ("pending", 1)
    own = run_cli("changes", "approve", opened["id"], env=publisher_env, check=False)
    assert (own.returncode, own.stderr) == (
        4,
        "error: not allowed to change.approve on this model\n",
    )
    # The admin made the publisher's key: its approval would be the same person's.
    maker = run_cli("changes", "approve", opened["id"], env=admin_env, check=False)
    assert maker.returncode != 0
    assert "created one from the other" in maker.stderr
    with server.client(server.admin_key) as c:
        assert "production" not in c.get(f"/api/v1/models/{MODEL}").json()["labels"]

    done = json.loads(
        run_cli("changes", "approve", opened["id"], "--json", env=approver_env).stdout
    )
    assert done["status"] == "applied"
    with server.client(server.admin_key) as c:
        assert c.get(f"/api/v1/models/{MODEL}").json()["labels"]["production"] == 1

    listed = run_cli("versions", "ls", MODEL, env={**publisher_env, "COLUMNS": "150"}).stdout
    assert listed.splitlines()[1].split()[-1] == "passed"
    shown = run_cli("eval", "show", MODEL, "1", env=publisher_env).stdout
    assert "version 1: passed (accuracy 0.9" in shown
    verify = run_cli("audit", "verify", "--data-dir", str(server.data_dir), env=admin_env)
    assert verify.returncode == 0
    with server.client(server.admin_key) as c:
        actions = [e["action"] for e in c.get("/api/v1/audit/entries?limit=1000").json()["entries"]]
    for action in ("eval.set", "evalset.read", "change.request", "change.approve", "change.apply"):
        assert action in actions
