"""SIGTERM drains `modelkeep serve` on the host too, with several worker processes: readiness
fails at once while requests are still served, then the server stops and exits 0."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx
import pytest
from harness import init_server

pytestmark = pytest.mark.integration


def test_sigterm_with_two_workers_reports_not_ready_then_exits_0(tmp_path: Path) -> None:
    server = init_server(tmp_path, workers=2)
    server.extra_env = {"MODELKEEP_SHUTDOWN_DELAY_S": "2", "MODELKEEP_SHUTDOWN_GRACE_S": "5"}
    server.start()
    assert server.proc is not None
    try:
        os.kill(server.proc.pid, signal.SIGTERM)  # the supervisor, as tini or kubelet would
        signalled = time.monotonic()
        draining_but_serving = False
        # The supervisor passes SIGTERM on to its workers between health checks of them, which
        # can take seconds on a loaded machine: look until a worker reports not ready.
        while not draining_but_serving and time.monotonic() - signalled < 15:
            # New connections, spread over both workers by the kernel.
            r = httpx.get(f"{server.url}/v2/health/ready", verify=server.tls(), timeout=5)
            live = httpx.get(f"{server.url}/v2/health/live", verify=server.tls(), timeout=5)
            draining_but_serving = (r.status_code, live.status_code) == (503, 200)
            time.sleep(0.05)
        assert draining_but_serving
        assert server.proc.wait(timeout=30) == 0
    finally:
        server.stop()
    lines = server.log().splitlines()
    assert any('"Finished server process' in line for line in lines)
