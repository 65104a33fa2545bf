"""Two processes appending to one database at once keep one gapless, valid chain."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter

from modelkeep.audit import AuditLog, verify_chain
from modelkeep.store.metadata import MetadataStore

PER_PROCESS = 100

# Each child signals it is ready, waits for "go" on stdin (so both append at the same time),
# appends one entry per transaction, and reports when its appends started and ended.
WORKER = """
import sys
import time
from modelkeep.audit import AuditEvent, AuditLog
from modelkeep.store.metadata import MetadataStore

url, actor, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
store = MetadataStore(url)
log = AuditLog(store.engine)
print("ready", flush=True)
sys.stdin.readline()
started = time.monotonic()
for n in range(count):
    log.append(AuditEvent(actor, "infer", "model:iris", "success", {"n": n}))
finished = time.monotonic()
store.close()
print("done", started, finished, flush=True)
"""


def test_two_processes_appending_at_once_keep_a_single_valid_chain(database_url: str) -> None:
    store = MetadataStore(database_url)
    store.migrate()
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, database_url, f"key:worker{i}", str(PER_PROCESS)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    try:
        for worker in workers:
            assert worker.stdout is not None
            assert worker.stdout.readline().strip() == "ready"
        for worker in workers:
            assert worker.stdin is not None
            worker.stdin.write("go\n")
            worker.stdin.flush()
        outputs = [worker.communicate(timeout=120)[0] for worker in workers]
        entries = list(AuditLog(store.engine).entries())
        result = verify_chain(store.engine, None)
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
        store.close()

    assert [worker.returncode for worker in workers] == [0, 0]
    reports = [out.split() for out in outputs]
    assert [report[0] for report in reports] == ["done", "done"]
    assert [entry.seq for entry in entries] == list(range(1, 2 * PER_PROCESS + 1))
    assert Counter(entry.actor for entry in entries) == {
        "key:worker0": PER_PROCESS,
        "key:worker1": PER_PROCESS,
    }
    # Each process's entries keep their own order within the one chain.
    for actor in ("key:worker0", "key:worker1"):
        assert [e.details["n"] for e in entries if e.actor == actor] == list(range(PER_PROCESS))
    assert (result.ok, result.entries) == (True, 2 * PER_PROCESS)
    # The appends really overlapped in time (SQLite may still let one writer win every lock).
    started, finished = zip(*((float(r[1]), float(r[2])) for r in reports), strict=True)
    assert max(started) < min(finished)
