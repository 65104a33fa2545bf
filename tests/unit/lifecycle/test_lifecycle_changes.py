"""Who may approve, and where a rollback goes."""

from __future__ import annotations

from modelkeep.lifecycle.changes import refusal_to_approve, rollback_target

CREATORS = {"admin": "init", "pub": "admin", "appr": "admin", "sock": "pub", "loop": "loop"}


def test_requester_and_pusher_may_not_approve() -> None:
    assert refusal_to_approve("pub", "pub", "x", CREATORS) is not None
    assert refusal_to_approve("pub", "x", "pub", CREATORS) is not None
    assert refusal_to_approve("appr", "pub", "pub", CREATORS) is None


def test_keys_created_by_or_creating_the_requester_do_not_count() -> None:
    # pub made `sock`: pub cannot approve its own request through it...
    assert refusal_to_approve("sock", "pub", "pub", CREATORS) is not None
    # ...and the admin who made pub's key cannot approve pub's request, nor its own.
    assert refusal_to_approve("admin", "pub", None, CREATORS) is not None
    assert refusal_to_approve("appr", "admin", None, CREATORS) is not None
    assert refusal_to_approve("loop", "pub", None, CREATORS) is None


def test_rollback_walks_back_through_history() -> None:
    moves = [("set", 1, None), ("set", 2, 1), ("set", 3, 2)]
    assert rollback_target(moves) == 2
    moves.append(("rollback", 2, 3))
    assert rollback_target(moves) == 1
    moves.append(("emergency", 1, 2))
    assert rollback_target(moves) is None
    assert rollback_target([("set", 4, None), ("delete", None, 4), ("set", 5, None)]) is None
    assert rollback_target([]) is None
