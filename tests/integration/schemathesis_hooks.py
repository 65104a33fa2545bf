"""Schemathesis hooks for the OpenAPI conformance test (SCHEMATHESIS_HOOKS names this module).

The run is free to create, change and delete anything in its throwaway data directory, except
the one key it runs with: revoking that would turn every later request into a 401 and end the
run's coverage. A revocation of it is sent for a key id that does not exist instead (404).
"""

from __future__ import annotations

import os
from typing import Any

import schemathesis

_KEPT_KEY = os.environ.get("MODELKEEP_FUZZ_KEPT_KEY_ID", "")


@schemathesis.hook
def before_call(context: Any, case: Any, kwargs: dict[str, Any]) -> None:
    parameters = case.path_parameters or {}
    if _KEPT_KEY and parameters.get("key_id") == _KEPT_KEY and case.method.upper() == "DELETE":
        parameters["key_id"] = "mk_notakey0000"
