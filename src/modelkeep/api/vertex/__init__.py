"""Vertex AI's custom-container contract (``AIP_*`` routes) over the data plane:
docs/protocols.md."""

from ._routes import vertex_matcher

__all__ = ["vertex_matcher"]
