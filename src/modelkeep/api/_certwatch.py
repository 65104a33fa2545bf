"""The server certificate's expiry: a metric, and a warning in the log 30 days before it.

Each worker checks when it starts and then every hour, so a long-running server warns in time
and the gauge follows a certificate renewed on disk (``modelkeep tls renew``, cert-manager).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from modelkeep.audit.metrics import Metrics
from modelkeep.crypto import certificate_not_after
from modelkeep.errors import ConfigError

log = logging.getLogger(__name__)

WARN_BEFORE = timedelta(days=30)
CHECK_EVERY_S = 3600.0


def check_certificate(
    certfile: Path, metrics: Metrics, *, now: Callable[[], datetime] = lambda: datetime.now(UTC)
) -> datetime | None:
    """Set the expiry gauge from ``certfile``; warn if it expires within ``WARN_BEFORE``.

    Returns the expiry, or None (and a warning) if the file cannot be read.
    """
    try:
        not_after = certificate_not_after(certfile)
    except ConfigError:
        log.warning("cannot read the TLS server certificate to check when it expires")
        return None
    metrics.set_tls_certificate_expiry(not_after.timestamp())
    left = not_after - now()
    if left <= WARN_BEFORE:
        log.warning(
            "the TLS server certificate expires in %d days (%s UTC); "
            "renew it with `modelkeep tls renew` or through your certificate manager",
            max(left.days, 0),
            f"{not_after:%Y-%m-%d %H:%M}",
        )
    return not_after


async def watch_certificate(
    certfile: Path, metrics: Metrics, *, every_s: float = CHECK_EVERY_S
) -> None:
    """``check_certificate`` now and every ``every_s`` seconds, until cancelled."""
    while True:
        check_certificate(certfile, metrics)
        await asyncio.sleep(every_s)
