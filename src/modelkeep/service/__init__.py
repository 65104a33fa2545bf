"""modelkeep's core: the ``Service`` every adapter (HTTP, CLI) calls, and its data plane.

``Service`` (``facade.py``) is composed of a small core (``core.py``: snapshot, audit records,
authentication, lookups, model loading) and its parts: ``service.dataplane`` (``dataplane.py``),
the protocol-neutral inference path every protocol adapter under ``api/`` calls, management,
guard administration, audit reading, captures and the key service. Nothing here imports HTTP.
"""

from modelkeep.service.core import alerter_from
from modelkeep.service.dataplane import (
    PLATFORMS,
    Budget,
    DataPlane,
    Decoded,
    InferCall,
    InferResult,
    Observed,
)
from modelkeep.service.facade import Service
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
