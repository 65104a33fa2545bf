"""Optional OpenTelemetry spans over the request path.

Off by default, and then ``span`` is a no-op context manager and no tracer exists.
``enable`` (called at start when settings.tracing is on) installs a tracer from the OpenTelemetry
API (which FastAPI already depends on); exporting the spans is the job of the SDK and exporter
the deployment installs and configures (e.g. opentelemetry-sdk with the standard OTEL_*
environment variables under opentelemetry-instrument).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

from modelkeep.errors import ConfigError

_tracer: Any = None
# nullcontext keeps no state between enter and exit, so one serves every caller and thread.
_NO_SPAN: AbstractContextManager[Any] = nullcontext()


def enable(service_name: str = "modelkeep") -> None:
    """Install a tracer; ConfigError if the OpenTelemetry API is not installed."""
    global _tracer
    try:
        from opentelemetry import trace
    except ImportError as exc:
        raise ConfigError(
            "tracing is on but the OpenTelemetry API is not installed (opentelemetry-api)"
        ) from exc
    _tracer = trace.get_tracer(service_name)


def disable() -> None:
    global _tracer
    _tracer = None


def enabled() -> bool:
    return _tracer is not None


def span(name: str, **attributes: str | int | float | bool) -> AbstractContextManager[Any]:
    """A span named ``name`` when tracing is on; otherwise a context manager doing nothing."""
    if _tracer is None:
        return _NO_SPAN
    return _span(name, attributes)


@contextmanager
def _span(name: str, attributes: dict[str, str | int | float | bool]) -> Iterator[Any]:
    with _tracer.start_as_current_span(name, attributes=attributes) as current:
        yield current
