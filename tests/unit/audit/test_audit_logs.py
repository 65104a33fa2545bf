"""configure_json_logging: every Python logging line becomes one JSON object on the stream."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from modelkeep.audit.logs import configure_json_logging


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    out = io.StringIO()
    configure_json_logging(out)
    try:
        yield out
    finally:
        root.handlers, _ = saved[0], root.setLevel(saved[1])


def _lines(out: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_a_log_record_is_one_json_line(stream: io.StringIO) -> None:
    logging.getLogger("modelkeep.example").info("removed %d blob files", 3)
    [line] = _lines(stream)
    assert (line["event"], line["level"], line["logger"]) == (
        "removed 3 blob files",
        "info",
        "modelkeep.example",
    )
    assert str(line["timestamp"]).endswith("Z")


def test_uvicorn_lines_are_json_too(stream: io.StringIO) -> None:
    uvicorn_logger = logging.getLogger("uvicorn.error")
    uvicorn_logger.addHandler(logging.StreamHandler(io.StringIO()))  # as uvicorn's config does
    configure_json_logging(stream)
    uvicorn_logger.info("Started server process [%d]", 7)
    assert [line["event"] for line in _lines(stream)] == ["Started server process [7]"]


def test_an_exception_is_rendered_inside_the_line(stream: io.StringIO) -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("modelkeep.example").exception("refresh failed")
    [line] = _lines(stream)
    assert line["event"] == "refresh failed"
    assert "ValueError: boom" in str(line["exception"])


def test_uvicorns_own_access_lines_stay_off(stream: io.StringIO) -> None:
    """Requests are logged once, by modelkeep's access log, not again by uvicorn."""
    logging.getLogger("uvicorn.access").info('127.0.0.1:5000 - "GET / HTTP/1.1" 200')
    assert stream.getvalue() == ""
