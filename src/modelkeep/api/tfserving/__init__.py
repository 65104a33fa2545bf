"""TensorFlow Serving's REST API (``/v1/models/...``) over the data plane: docs/protocols.md."""

from ._routes import tfserving_matcher

__all__ = ["tfserving_matcher"]
