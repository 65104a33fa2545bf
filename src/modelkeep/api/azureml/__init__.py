"""The Azure ML online endpoint contract: ``POST /score``, ``GET /``, ``/swagger.json``
(docs/protocols.md)."""
