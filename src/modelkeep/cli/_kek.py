"""``modelkeep kek``: see and rotate the key-encryption key that wraps every version's data key.

Rotation never re-encrypts a blob: the key service makes a new KEK (Transit ``rotate``), then
pass after pass each version's data key is re-wrapped under it. Every pass is audited and
idempotent, so an interrupted rotation is finished with ``kek rotate --rewrap-only``.
"""

from __future__ import annotations

from typing import Annotated

import typer

from modelkeep.cli import _output as out
from modelkeep.cli._client import DEFAULT_URL, JSONObject, client_from
from modelkeep.cli._errors import exit_codes_epilog
from modelkeep.cli._params import CacertOption, JsonOption, TokenOption, UrlOption
from modelkeep.errors import KeyServiceError

__all__ = ["kek_app"]

EPILOG = exit_codes_epilog()

kek_app = typer.Typer(help="See and rotate the key-encryption key (admin).", no_args_is_help=True)


@kek_app.command("status", epilog=EPILOG)
def kek_status(
    ctx: typer.Context,
    url: UrlOption = DEFAULT_URL,
    token: TokenOption = None,
    cacert: CacertOption = None,
    json_output: JsonOption = False,
) -> None:
    """Show the key service, its current key id and how many versions each KEK wraps.

    Example: modelkeep kek status
    """
    with client_from(ctx.obj, url, token, cacert) as client:
        status = client.kek_status()
    if json_output:
        out.print_json(status)
        return
    out.say(f"key service {out.clean(status.get('key_service'))}")
    out.say(f"current key {out.clean(status.get('key_id'))}")
    counts = status.get("versions_by_key")
    for key_id, count in sorted(counts.items()) if isinstance(counts, dict) else []:
        out.say(f"  {out.clean(key_id)}: {out.clean(count)} version(s)")
    out.say(f"versions to re-wrap: {out.clean(status.get('versions_to_rewrap'))}")
    captures = status.get("captures_by_key")
    for key_id, count in sorted(captures.items()) if isinstance(captures, dict) else []:
        out.say(f"  {out.clean(key_id)}: {out.clean(count)} captured payload(s)")
    out.say(f"captured payloads to re-wrap: {out.clean(status.get('captures_to_rewrap'))}")


@kek_app.command("rotate", epilog=EPILOG)
def kek_rotate(
    ctx: typer.Context,
    rewrap_only: Annotated[
        bool,
        typer.Option(
            "--rewrap-only",
            help="Make no new KEK: re-wrap what is still under an older one (resume an "
            "interrupted rotation, or move to the key an AWS KMS alias now names).",
        ),
    ] = False,
    batch: Annotated[
        int, typer.Option(min=1, max=500, metavar="N", help="Rows per audited pass.")
    ] = 100,
    url: UrlOption = DEFAULT_URL,
    token: TokenOption = None,
    cacert: CacertOption = None,
    json_output: JsonOption = False,
) -> None:
    """Make a new key-encryption key and re-wrap every version's and every captured payload's
    data key under it.

    Blobs and sealed payloads are not touched. Safe to interrupt: run it again with
    --rewrap-only to finish.

    Example: modelkeep kek rotate
    """
    rewrapped = captures = 0
    refused: list[JSONObject] = []
    with client_from(ctx.obj, url, token, cacert) as client:
        key_id = client.kek_rotate(new_key=not rewrap_only).get("key_id")
        if not json_output:
            out.say(f"current key {out.clean(key_id)}")
        after: object = 0
        capture_after: object = ""
        while after is not None or capture_after is not None:
            done = client.kek_rewrap(limit=batch, after=after, capture_after=capture_after)
            moved = done.get("rewrapped")
            rewrapped += len(moved) if isinstance(moved, list) else 0
            moved = done.get("rewrapped_captures")
            captures += len(moved) if isinstance(moved, list) else 0
            more = done.get("refused")
            refused += [r for r in more if isinstance(r, dict)] if isinstance(more, list) else []
            if not json_output:
                out.say(
                    f"re-wrapped {rewrapped} version(s), {out.clean(done.get('remaining'))} left;"
                    f" {captures} captured payload(s),"
                    f" {out.clean(done.get('remaining_captures'))} left"
                )
            after, capture_after = done.get("after"), done.get("capture_after")
            if not (after is None or isinstance(after, int)) or not (
                capture_after is None or isinstance(capture_after, str)
            ):
                raise KeyServiceError("the server answered a re-wrap pass without its cursors")
        remaining = done.get("remaining")
        remaining_captures = done.get("remaining_captures")
    for item in refused:
        capture = f" capture {out.clean(item['capture'])}" if "capture" in item else ""
        out.warn(
            f"model {out.clean(item.get('model'))} version {out.clean(item.get('version'))}"
            f"{capture}: {out.clean(item.get('reason'))}"
        )
    if remaining:
        raise KeyServiceError(
            f"{remaining} version(s) are still wrapped by an older key-encryption key; "
            "they will not be served until that key is back (see above)"
        )
    if remaining_captures:
        raise KeyServiceError(
            f"{remaining_captures} captured payload(s) are still wrapped by an older"
            " key-encryption key; they cannot be read until that key is back (see above)"
        )
    if json_output:
        out.print_json(
            {
                "key_id": key_id,
                "rewrapped": rewrapped,
                "rewrapped_captures": captures,
                "remaining": 0,
                "remaining_captures": 0,
            }
        )
        return
    out.say(f"every version and captured payload is wrapped by {out.clean(key_id)}")
