"""The free ports the test servers start on: distinct, bindable, and out of the ephemeral pool."""

from __future__ import annotations

import socket

import pytest

import modelkeep.testing
from modelkeep.testing import _ephemeral_low, free_port, free_ports


def test_free_ports_are_distinct_and_below_the_ephemeral_range() -> None:
    ports = free_ports(64)
    assert len(set(ports)) == 64
    assert all(10_000 <= port < _ephemeral_low() for port in ports)


def test_a_free_port_can_be_listened_on() -> None:
    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
        sock.listen()


def test_a_port_in_use_is_drawn_again(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        spare = free_port()
        draws = iter([taken, taken, spare])
        monkeypatch.setattr(modelkeep.testing.random, "randrange", lambda *_: next(draws))
        assert free_ports(1) == [spare]
