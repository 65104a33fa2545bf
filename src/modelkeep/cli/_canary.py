"""``modelkeep canary`` (status, promote, abort) and the canary and shadow forms of
``label set`` (docs/lifecycle.md, "Canary and shadow")."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from modelkeep.cli import _output as out
from modelkeep.cli._client import JSONObject, client_from
from modelkeep.cli._errors import exit_codes_epilog
from modelkeep.cli._lifecycle import say_change
from modelkeep.cli._params import JsonOption, check_name

__all__ = ["canary_app", "say_canary", "start"]

EPILOG = exit_codes_epilog()

canary_app = typer.Typer(
    help="Canary and shadow traffic on labels: status, promote, abort "
    "(start one with `label set ... --canary PCT` or `--shadow VERSION`).",
    no_args_is_help=True,
)

ModelArgument = Annotated[str, typer.Argument(help="Model name.", callback=check_name)]
LabelOption = Annotated[
    str,
    typer.Option("--label", metavar="LABEL", help="The label.", callback=check_name),
]


def start(
    ctx: typer.Context,
    model: str,
    label: str,
    version: int | None,
    *,
    canary: float | None,
    shadow: int | None,
    sample: float,
    thresholds: dict[str, Any],
    json_output: bool,
) -> None:
    """``label set`` with ``--canary`` or ``--shadow``."""
    if (canary is None) == (shadow is None):
        raise typer.BadParameter("give one of --canary PCT (with VERSION) or --shadow VERSION")
    with client_from(ctx.obj) as client:
        if canary is not None:
            if version is None:
                raise typer.BadParameter("--canary needs the canary's VERSION")
            body = {"version": version, "share": canary, **thresholds}
            answer = client.start_canary(model, label, body)
        else:
            assert shadow is not None
            answer = client.start_shadow(model, label, shadow, sample)
    if json_output:
        out.print_json(answer)
    elif "approvals_needed" in answer:
        say_change(answer)
    else:
        say_canary(answer)


def say_canary(canary: JSONObject) -> None:
    mode = out.clean(canary.get("mode"))
    what = "of callers" if mode == "canary" else "of requests mirrored"
    out.say(
        f"{out.clean(canary.get('model'))}: {mode} on {out.clean(canary.get('label'))} -> "
        f"version {out.clean(canary.get('version'))}, {out.clean(canary.get('share'))}% {what}"
        f" [{out.clean(canary.get('status'))}]"
    )


@canary_app.command("status", epilog=EPILOG)
def canary_status(
    ctx: typer.Context,
    model: ModelArgument,
    label: Annotated[
        str | None,
        typer.Option("--label", metavar="LABEL", help="Only this label.", show_default=False),
    ] = None,
    json_output: JsonOption = False,
) -> None:
    """Show MODEL's canaries and shadows: per version, requests, errors, latency percentiles
    and agreement with the primary (this server replica's numbers, over each one's window).

    Example: modelkeep canary status iris
    """
    if label is not None:
        check_name(label)
    with client_from(ctx.obj) as client:
        found = client.canary_status(model, label)
    if json_output:
        out.print_json(found)
        return
    if not found:
        out.say("no canaries or shadows")
        return
    for canary in found:
        say_canary(canary)
        if canary.get("reason"):
            out.say(f"  ended: {out.clean(canary.get('reason'))}")
        versions = canary.get("versions")
        if not isinstance(versions, list) or not versions:
            continue
        table = out.table(
            "VERSION",
            "ROLE",
            "REQUESTS",
            "ERRORS",
            "ERROR RATE",
            "P50 MS",
            "P95 MS",
            "P99 MS",
            "AGREEMENT",
        )
        for arm in versions:
            if not isinstance(arm, dict):
                continue
            table.add_row(
                out.cell(arm.get("version")),
                out.cell(arm.get("role")),
                out.cell(arm.get("requests")),
                out.cell(arm.get("errors")),
                out.cell(arm.get("error_rate")),
                out.cell(arm.get("p50_ms")),
                out.cell(arm.get("p95_ms")),
                out.cell(arm.get("p99_ms")),
                out.cell(arm.get("agreement")),
            )
        out.stdout_console().print(table)


@canary_app.command("promote", epilog=EPILOG)
def canary_promote(
    ctx: typer.Context,
    model: ModelArgument,
    label: LabelOption = "production",
    json_output: JsonOption = False,
) -> None:
    """Point LABEL at its canary's version, ending the canary. A protected label opens a
    change request instead, approved like any move (see `modelkeep changes`).

    Example: modelkeep canary promote iris --label production
    """
    with client_from(ctx.obj) as client:
        answer = client.promote_canary(model, label)
    if json_output:
        out.print_json(answer)
    elif "approvals_needed" in answer:
        say_change(answer)
    else:
        out.say(
            f"{out.clean(answer.get('model', model))}: label {out.clean(label)} -> version "
            f"{out.clean(answer.get('version'))} (canary promoted)"
        )


@canary_app.command("abort", epilog=EPILOG)
def canary_abort(
    ctx: typer.Context,
    model: ModelArgument,
    label: LabelOption = "production",
    shadow: Annotated[
        bool, typer.Option("--shadow", help="End the label's shadow instead.")
    ] = False,
    json_output: JsonOption = False,
) -> None:
    """End LABEL's canary (every caller is served the label's version again) or, with
    --shadow, its shadow. Allowed on protected labels too.

    Example: modelkeep canary abort iris --label production
    """
    mode = "shadow" if shadow else "canary"
    with client_from(ctx.obj) as client:
        client.abort_canary(model, label, mode)
    if json_output:
        out.print_json({"model": model, "label": label, "mode": mode, "status": "aborted"})
    else:
        out.say(f"{model}: {mode} on {label} aborted")
