"""TensorFlow Serving's REST API (``/v1/models/...``) over the data plane: docs/protocols.md."""

from ._openapi import protocol_openapi_paths
from ._routes import tfserving_matcher

__all__ = ["protocol_openapi_paths", "tfserving_matcher"]
