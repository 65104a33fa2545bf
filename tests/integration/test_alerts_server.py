"""Alerts from a real server to a real local webhook receiver, signed with HMAC-SHA256."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
from harness import init_server

pytestmark = pytest.mark.integration

SECRET = "a-webhook-secret-of-some-length"


def test_authentication_failures_raise_a_signed_alert(tmp_path: Path) -> None:
    received: list[tuple[dict[str, str], bytes]] = []

    class Receiver(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append((dict(self.headers), body))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    receiver = HTTPServer(("127.0.0.1", 0), Receiver)
    thread = threading.Thread(target=receiver.serve_forever, daemon=True)
    thread.start()
    srv = init_server(tmp_path)
    srv.extra_env.update(
        MODELKEEP_ALERT_WEBHOOKS=json.dumps([f"http://127.0.0.1:{receiver.server_port}/hook"]),
        MODELKEEP_ALERT_WEBHOOK_SECRET=SECRET,
        MODELKEEP_ALERT_AUTH_FAILURES_PER_MINUTE="5",
    )
    srv.start()
    try:
        with srv.client("mk_aaaaaaaaaaaa_" + "C" * 43) as bad:
            for _ in range(6):
                assert bad.get("/api/v1/whoami").status_code == 401
        deadline = time.monotonic() + 10
        while not received and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        srv.stop()
        receiver.shutdown()
        receiver.server_close()
    assert len(received) == 1
    headers, body = received[0]
    alert = json.loads(body)
    assert (alert["kind"], alert["count"], alert["threshold"]) == ("auth_failures", 5, 5)
    expected = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    assert headers["X-Modelkeep-Signature"] == expected
    assert SECRET not in srv.log()
