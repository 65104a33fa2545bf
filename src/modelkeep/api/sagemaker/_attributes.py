"""SageMaker's request headers: custom attributes (and the key they may carry), target model.

SageMaker's front end (``InvokeEndpoint``) forwards no ``Authorization`` header to the
container: what the caller controls is ``CustomAttributes``, forwarded verbatim as
``X-Amzn-SageMaker-Custom-Attributes`` (at most 1024 visible ASCII characters). So a modelkeep
key may travel there as the attribute ``modelkeep-key=mk_...``. The attributes are echoed on the
response, as SageMaker passes a container's ``X-Amzn-SageMaker-Custom-Attributes`` back to the
caller, but never the key: it is cut out of the echo.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from modelkeep.errors import InvalidInput

__all__ = [
    "CUSTOM_ATTRIBUTES",
    "KEY_ATTRIBUTE",
    "MAX_CUSTOM_ATTRIBUTES",
    "TARGET_MODEL",
    "CustomAttributes",
    "parse_custom_attributes",
    "target_model",
]

CUSTOM_ATTRIBUTES = "X-Amzn-SageMaker-Custom-Attributes"
TARGET_MODEL = "X-Amzn-SageMaker-Target-Model"
KEY_ATTRIBUTE = "modelkeep-key"
# SageMaker's own limit on CustomAttributes.
MAX_CUSTOM_ATTRIBUTES = 1024
# Target model names as SageMaker's multi-model endpoints give them (a path under the
# endpoint's S3 prefix, usually ending .tar.gz).
_MAX_TARGET = 1024
_VISIBLE = re.compile(r"[\x20-\x7e]*")
_ITEM = re.compile(r"\s*([^,;=\s]+)\s*=\s*([^,;]*?)\s*(?:[,;]|$)")


@dataclass(frozen=True, slots=True)
class CustomAttributes:
    """The attributes as received, split into the key they carried and what to echo."""

    key: str | None  # the modelkeep key, if the caller sent one as an attribute
    echo: str | None  # the attributes to send back (the key cut out); None = no header


def parse_custom_attributes(value: str | None) -> CustomAttributes:
    """Split the header; InvalidInput if it is over SageMaker's limit or not visible ASCII.

    The attributes are opaque to modelkeep (``key=value`` items separated by ``,`` or ``;``
    by convention) except for the ``modelkeep-key`` item, which is taken out.
    """
    if value is None:
        return CustomAttributes(key=None, echo=None)
    if len(value) > MAX_CUSTOM_ATTRIBUTES or _VISIBLE.fullmatch(value) is None:
        raise InvalidInput(
            f"{CUSTOM_ATTRIBUTES} must be at most {MAX_CUSTOM_ATTRIBUTES} visible ASCII characters"
        )
    key = None
    echo = value
    for match in _ITEM.finditer(value):
        if match.group(1).lower() != KEY_ATTRIBUTE:
            continue
        if key is not None:
            raise InvalidInput(f"{CUSTOM_ATTRIBUTES} carries '{KEY_ATTRIBUTE}' more than once")
        key = match.group(2)
        echo = (value[: match.start()] + value[match.end() :]).strip(" ,;")
    return CustomAttributes(key=key, echo=echo or None)


def target_model(value: str | None, default: str | None) -> str:
    """The model a request is for: the target-model header (``NAME`` or ``NAME.tar.gz``, as a
    multi-model endpoint names it), else ``default`` (``MODELKEEP_SAGEMAKER_MODEL``)."""
    if value is None:
        if default is None:
            raise InvalidInput(
                f"no model named: send {TARGET_MODEL} or set MODELKEEP_SAGEMAKER_MODEL"
            )
        return default
    name = value.strip().removesuffix(".tar.gz")
    if not name or len(value) > _MAX_TARGET:
        raise InvalidInput(f"{TARGET_MODEL} must name a model")
    return name
