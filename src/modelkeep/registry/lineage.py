"""Lineage: what a publisher declares about how a version was made, checked before it is kept.

A push may carry a small JSON object (``modelkeep push --lineage FILE.json``; the API takes it
base64 in the ``Modelkeep-Lineage`` header): the training data (digest and/or URI), the code
revision, framework versions, the parent version and free-form tags, and metrics the publisher
measured. Nothing here is trusted for security: it is the publisher's word, recorded with the
version, shown in its bill of materials (``registry/bom.py``) as declared, and audited as a
digest. It is size-limited and shape-checked so that it cannot be used to store arbitrary data.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from modelkeep.errors import InvalidInput

__all__ = ["MAX_LINEAGE_BYTES", "Lineage", "parse_lineage", "parse_lineage_header"]

#: The most a lineage document may hold, as sent (JSON text).
MAX_LINEAGE_BYTES = 8 * 1024
_KEY = r"^[A-Za-z0-9][A-Za-z0-9._:/+-]{0,63}$"
_Text = Annotated[str, Field(min_length=1, max_length=256)]
_Key = Annotated[str, Field(pattern=_KEY)]


class TrainingData(BaseModel):
    """One data set the version was trained on: a content digest, a location, or both."""

    model_config = ConfigDict(extra="forbid", strict=True)
    name: _Text | None = None
    digest: Annotated[str, Field(pattern=r"^sha256:[0-9a-f]{64}$")] | None = None
    uri: (
        Annotated[str, Field(min_length=1, max_length=512, pattern=r"^[a-z][a-z0-9+.-]*://\S+$")]
        | None
    ) = None

    def model_post_init(self, _context: Any) -> None:
        if self.digest is None and self.uri is None:
            raise ValueError("a training data entry needs a digest ('sha256:<hex>') or a uri")


class Lineage(BaseModel):
    """The declared lineage of one version; every field is optional, unknown fields refused."""

    model_config = ConfigDict(extra="forbid", strict=True)
    training_data: list[TrainingData] = Field(default_factory=list, max_length=16)
    code_revision: _Text | None = None
    code_uri: Annotated[str, Field(max_length=512, pattern=r"^https?://\S+$")] | None = None
    frameworks: dict[_Key, _Text] = Field(default_factory=dict, max_length=32)
    parent_version: Annotated[int, Field(ge=1, le=2**31 - 1)] | None = None
    tags: dict[_Key, _Text] = Field(default_factory=dict, max_length=64)
    metrics: dict[_Key, float] = Field(default_factory=dict, max_length=32)

    @field_validator("metrics")
    @classmethod
    def _finite(cls, value: dict[str, float]) -> dict[str, float]:
        if not all(math.isfinite(v) for v in value.values()):
            raise ValueError("metrics must be finite numbers")
        return value

    def dumps(self) -> str:
        """Canonical JSON (what is stored), without empty fields."""
        return json.dumps(self.model_dump(exclude_none=True, exclude_defaults=True), sort_keys=True)


def parse_lineage(text: str | bytes) -> Lineage:
    """A validated Lineage from JSON text; InvalidInput naming the first problem otherwise."""
    raw = text.encode() if isinstance(text, str) else text
    if len(raw) > MAX_LINEAGE_BYTES:
        raise InvalidInput(f"the lineage is larger than {MAX_LINEAGE_BYTES // 1024} KiB")
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        raise InvalidInput("the lineage is not valid JSON") from None
    if not isinstance(data, dict):
        raise InvalidInput("the lineage must be a JSON object")
    try:
        return Lineage.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        message = str(first.get("msg", "invalid value"))[:200]
        raise InvalidInput(
            f"invalid lineage: {where}: {message}" if where else f"invalid lineage: {message}"
        ) from None


def parse_lineage_header(value: str) -> Lineage:
    """The ``Modelkeep-Lineage`` header: base64 of the lineage JSON."""
    if len(value) > (MAX_LINEAGE_BYTES * 4) // 3 + 4:
        raise InvalidInput(f"the lineage is larger than {MAX_LINEAGE_BYTES // 1024} KiB")
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidInput("the Modelkeep-Lineage header is not valid base64") from None
    return parse_lineage(raw)
