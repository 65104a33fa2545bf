"""The server's own log lines (Python logging: modelkeep's modules, uvicorn) as JSON on stdout.

A container's logs are its stdout, read by a collector that wants one JSON object per line; the
access log (``audit.access``) already writes that way, and ``configure_json_logging`` makes every
other line match it: ``timestamp``, ``level``, ``logger``, ``event``, and ``exception`` for an
error with a traceback. Secret-looking keys are dropped by the access log's own processor.
"""

from __future__ import annotations

import logging
import sys
from typing import TextIO

import structlog

from modelkeep.audit.access import drop_secret_keys

__all__ = ["configure_json_logging"]

_HANDLER_NAME = "modelkeep-json"


def configure_json_logging(stream: TextIO | None = None, *, level: int = logging.INFO) -> None:
    """Send every Python logging record to ``stream`` (stdout) as one JSON line.

    Replaces the root logger's handlers; the loggers of uvicorn and modelkeep propagate to it.
    Idempotent: each server process (and each worker) calls it once at start.
    """
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[
            structlog.stdlib.add_log_level,
            structlog.stdlib.add_logger_name,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
        ],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            drop_secret_keys,
            structlog.processors.JSONRenderer(sort_keys=False),
        ],
    )
    handler = logging.StreamHandler(stream or sys.stdout)
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(level)
    # uvicorn's loggers keep their own handlers when it configured them earlier in the process.
    for name in ("uvicorn", "uvicorn.error"):
        logger = logging.getLogger(name)
        logger.handlers = []
        logger.propagate = True
    # modelkeep's access log (audit.access) has the request lines; uvicorn writes its own
    # only when this logger has somewhere to go.
    access = logging.getLogger("uvicorn.access")
    access.handlers = []
    access.propagate = False
