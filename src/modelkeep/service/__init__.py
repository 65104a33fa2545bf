"""modelkeep's core: the ``Service`` every adapter (HTTP, CLI) calls, and its data plane.

``Service`` (``core.py``) orders authentication, authorization, validation, runtime and storage;
``service.dataplane`` (``dataplane.py``) is the protocol-neutral inference path every protocol
adapter under ``api/`` calls. Nothing here imports HTTP.
"""

from modelkeep.service.core import Service, alerter_from
from modelkeep.service.dataplane import (
    PLATFORMS,
    Budget,
    DataPlane,
    Decoded,
    InferCall,
    InferResult,
    Observed,
)
from modelkeep.service.management import CreatedKey

__all__ = [
    "PLATFORMS",
    "Budget",
    "CreatedKey",
    "DataPlane",
    "Decoded",
    "InferCall",
    "InferResult",
    "Observed",
    "Service",
    "alerter_from",
]
