"""`make demo`: a modelkeep server on a fresh data dir, a sample model, and a working request.

Trains a small scikit-learn classifier on the iris data set, converts it to ONNX, initializes
`.demo/data`, starts `modelkeep serve`, makes a publisher key, creates the model trusting that
key, pushes the model signed, creates a consumer key, prints a curl command and a Python snippet
that work, and keeps serving until Ctrl-C.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import time
from pathlib import Path

import httpx

from modelkeep.testing import build_iris_onnx, iris_rows

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / ".demo"
PORT = int(os.environ.get("DEMO_PORT", "8443"))
URL = f"https://127.0.0.1:{PORT}"
MODELKEEP = str(Path(sys.executable).parent / "modelkeep")


def cli(*args: str, token: str | None = None, ca: Path | None = None) -> str:
    env = dict(os.environ)
    if token:
        env.update(MODELKEEP_URL=URL, MODELKEEP_TOKEN=token, MODELKEEP_CACERT=str(ca))
    proc = subprocess.run([MODELKEEP, *args], capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        sys.exit(f"demo: `modelkeep {' '.join(args)}` failed:\n{proc.stderr.strip()}")
    return proc.stdout


def wait_ready(ca: Path, server: subprocess.Popen[bytes]) -> None:
    for _ in range(300):
        if server.poll() is not None:
            sys.exit(f"demo: the server exited; is port {PORT} free? (set DEMO_PORT)")
        try:
            if (
                httpx.get(
                    f"{URL}/v2/health/ready",
                    verify=ssl.create_default_context(cafile=str(ca)),
                    timeout=1,
                ).status_code
                == 200
            ):
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    sys.exit("demo: the server did not become ready")


def main() -> None:
    if DEMO.exists():
        shutil.rmtree(DEMO)
    DEMO.mkdir()
    model_path = DEMO / "iris.onnx"
    print("1. Training a logistic regression on the iris data set and converting it to ONNX...")
    model_path.write_bytes(build_iris_onnx())

    print("2. modelkeep init (keys, TLS, database, first admin key)...")
    init = json.loads(cli("init", "--data-dir", str(DEMO / "data"), "--json"))
    admin, ca = init["admin_key"], Path(init["ca_cert"])

    print(f"3. modelkeep serve on {URL} (HTTPS, loopback only)...")
    server = subprocess.Popen(
        [MODELKEEP, "serve", "--data-dir", str(DEMO / "data"), "--port", str(PORT)]
    )
    try:
        wait_ready(ca, server)
        print("4. A publisher key, a model that trusts it, a signed push, a production label...")
        cli("keygen", "--out", str(DEMO / "publisher"))
        cli("models", "create", "iris", "--description", "iris classifier", token=admin, ca=ca)
        cli("publishers", "add", "iris", str(DEMO / "publisher.pub"), token=admin, ca=ca)
        pushed = json.loads(
            cli(
                "push",
                "iris",
                str(model_path),
                "--sign-key",
                str(DEMO / "publisher.key"),
                "--json",
                token=admin,
                ca=ca,
            )
        )
        cli("label", "set", "iris", "production", str(pushed["version"]), token=admin, ca=ca)
        print("5. modelkeep keys create --role consumer --model iris...")
        key = json.loads(
            cli(
                "keys",
                "create",
                "--role",
                "consumer",
                "--model",
                "iris",
                "--json",
                token=admin,
                ca=ca,
            )
        )["key"]
        row = iris_rows(1)[0]
        body = json.dumps(
            {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": row}]}
        )
        answer = httpx.post(
            f"{URL}/v2/models/iris/infer",
            content=body,
            headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
            verify=ssl.create_default_context(cafile=str(ca)),
        )
        answer.raise_for_status()
        print("\nmodelkeep is serving. Try it (the consumer key may only run `iris`):\n")
        print(
            f"curl --cacert {ca} -H 'Authorization: Bearer {key}' \\\n"
            f"  -H 'Content-Type: application/json' \\\n"
            f"  -d '{body}' \\\n  {URL}/v2/models/iris/infer\n"
        )
        print(f"It answers:\n{answer.text}\n")
        print("From Python:\n")
        print(
            "import httpx\n"
            f"r = httpx.post('{URL}/v2/models/iris/infer',\n"
            f"               headers={{'Authorization': 'Bearer {key}'}},\n"
            f"               json={body},\n"
            f"               verify='{ca}')\n"
            "print(r.json()['outputs'])\n"
        )
        print(
            f"The admin key is {admin}\n(export MODELKEEP_URL={URL} MODELKEEP_TOKEN=<key> "
            f"MODELKEEP_CACERT={ca} to use the CLI)\n"
        )
        print(
            f"Without a key the server refuses: curl --cacert {ca} {URL}/v2/models/iris  ->  401\n"
        )
        print("Serving until Ctrl-C.")
        server.wait()
    except KeyboardInterrupt:
        pass
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGINT)
            try:
                server.wait(timeout=15)
            except subprocess.TimeoutExpired:
                server.kill()


if __name__ == "__main__":
    main()
