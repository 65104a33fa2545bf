"""The SageMaker container contract: ``GET /ping`` and ``POST /invocations`` (docs/protocols.md)."""
