"""``modelkeep policy show|set|calibrate|assess|unblock|reset-budget``: a model's guard policy.

The guard policy (``docs/limits.md``, ``docs/hardening.md``) holds a model's admission limits and
budget, the output hardening each role gets, the extraction detectors and what an alarm does.
The API replaces it whole (``PUT``), so ``set`` reads the policy in force, changes only what the
command line names and sends everything else back as it came, including fields this client does
not know and the OOD reference in the form the server showed it (``{"fitted": true}``), which the
server reads as "keep the stored one". Checking what people type, the merge and reading benign
row files live in ``_policy_input``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated

import typer

from modelkeep.cli import _output as out
from modelkeep.cli._client import (
    PUSH_READ_TIMEOUT_S,
    JSONObject,
    client_from,
)
from modelkeep.cli._errors import SEE_EXIT_CODES
from modelkeep.cli._models import ModelArgument
from modelkeep.cli._params import JsonOption
from modelkeep.cli._policy_assess import policy_assess
from modelkeep.cli._policy_input import (
    ALARM_ACTIONS,
    MAX_CALIBRATION_ROWS,
    NONE,
    OUTPUT_FORMS,
    PolicyChanges,
    merged_policy,
    parse_count,
    parse_detect,
    parse_output,
    parse_output_for,
    parse_rate,
    read_rows,
)

__all__ = ["policy_app"]

EPILOG = SEE_EXIT_CODES

# A full API key, pasted where its id belongs, would end up in URLs and server logs.
_API_KEY = re.compile(r"mk_[a-z2-7]{12}_.+", re.ASCII | re.DOTALL)
_LIMIT_OPTIONS = {
    "rate": "--rate",
    "row_rate": "--row-rate",
    "model_rate": "--model-rate",
    "concurrency": "--concurrency",
    "max_rows": "--max-rows",
    "budget": "--budget",
}

policy_app = typer.Typer(
    help="Show and change a model's guard policy: limits, budget, output hardening, detectors.",
    no_args_is_help=True,
)


# -- commands ---------------------------------------------------------------------------------


def _usage(option: str, exc: ValueError) -> typer.BadParameter:
    return typer.BadParameter(str(exc), param_hint=f"'{option}'")


def _check_key_id(value: str) -> str:
    if _API_KEY.fullmatch(value):
        raise typer.BadParameter(
            "this is a whole API key, secret included; give only its id, the 12 characters "
            "after mk_ (see `modelkeep keys ls`)"
        )
    return value


KeyIdArgument = Annotated[
    str,
    typer.Argument(metavar="KEY_ID", help="The key's id (see keys ls).", callback=_check_key_id),
]


# Why each default is what it is; docs/hardening.md ("The defaults") has the measurements.
DEFAULTS_WHY = (
    "no policy is set for this model: these are modelkeep's defaults (docs/hardening.md)",
    "consumers see the top-1 class only: any confidence shown let a likelihood-ratio",
    "  membership attack find more training rows (bench/bench_privacy.py); admins see all",
    "a rate and a daily row budget per key bound extraction and probing",
    "detectors raise alerts; the OOD monitor starts once `policy calibrate` fits it",
    "full outputs for everyone: modelkeep policy set MODEL --output full",
)


def pushed_note(model: str) -> str:
    """What ``push`` says about the guard policy the version is served under (no request: a
    publisher's key may not read the policy)."""
    return (
        f"served under {model}'s guard policy; with none set, modelkeep's defaults: consumers see"
        " the top-1 class only, each key has a rate and a daily row budget, detectors alert"
        f" (`modelkeep policy show {model}`)"
    )


def _say_policy(title: str, policy: JSONObject) -> None:
    out.say(title)
    for line in out.policy_lines(policy):
        out.say(f"  {line}")
    if policy.get("default") is True:
        for line in DEFAULTS_WHY:
            out.say(f"  # {line}")


def _warn_idle(model: str, policy: JSONObject) -> None:
    """Say on stderr when part of the policy cannot act, so nobody relies on it by mistake."""
    detect = policy.get("detect")
    detectors = detect if isinstance(detect, list) else []
    if (
        "ood" in detectors
        and not isinstance(policy.get("ood_reference"), Mapping)
        and policy.get("default") is not True
    ):
        out.warn(
            "warning: the OOD monitor is on but has no reference and flags nothing until "
            f"`modelkeep policy calibrate {model} --benign FILE`"
        )
    if not detectors and policy.get("on_alarm", "log") != "log":
        out.warn(
            f"warning: on_alarm is {out.clean(policy.get('on_alarm'))} but no detector is on; "
            "turn one on with --detect prada,ood"
        )


@policy_app.command("show", epilog=EPILOG)
def policy_show(
    ctx: typer.Context,
    model: ModelArgument,
    json_output: JsonOption = False,
) -> None:
    """Show the guard policy of MODEL and the keys its detectors blocked or throttled.

    Example: modelkeep policy show digits
    """
    with client_from(ctx.obj) as client:
        policy = client.get_policy(model)
    if json_output:
        out.print_json(policy)
        return
    _say_policy(f"guard policy of {model}", policy)
    restrictions = policy.get("restrictions")
    listed = (
        [r for r in restrictions if isinstance(r, dict)] if isinstance(restrictions, list) else []
    )
    if not listed:
        out.say(f"  {'restricted keys:':<17} none")
    else:
        out.say(
            f"  {'restricted keys:':<17} {len(listed)} "
            f"(lift with `modelkeep policy unblock {model} KEY_ID`)"
        )
        out.say()
        out.stdout_console().print(out.restrictions_table(listed))
    _warn_idle(model, policy)


@policy_app.command("set", epilog=EPILOG)
def policy_set(
    ctx: typer.Context,
    model: ModelArgument,
    rate: Annotated[
        str | None,
        typer.Option(
            metavar="RATE",
            help="Requests per key: 50/s, 1000/min, 10/5s, 2/h, 100/d (or 50/second...); none "
            "removes it.",
            show_default=False,
        ),
    ] = None,
    row_rate: Annotated[
        str | None,
        typer.Option(
            metavar="RATE",
            help="Rows per key (a batch of 100 rows counts 100), e.g. 5000/min; none removes it.",
            show_default=False,
        ),
    ] = None,
    model_rate: Annotated[
        str | None,
        typer.Option(
            metavar="RATE",
            help="Requests for the model, all keys together, e.g. 1000/min; none removes it.",
            show_default=False,
        ),
    ] = None,
    concurrency: Annotated[
        str | None,
        typer.Option(
            metavar="N",
            help="Requests of one key in flight at once; none removes it.",
            show_default=False,
        ),
    ] = None,
    max_rows: Annotated[
        str | None,
        typer.Option(metavar="N", help="Rows in one request; none removes it.", show_default=False),
    ] = None,
    budget: Annotated[
        str | None,
        typer.Option(
            metavar="BUDGET",
            help="Rows per key per UTC day or month: 10000/day, 10000/d, 200000/month; none "
            "removes it.",
            show_default=False,
        ),
    ] = None,
    output: Annotated[
        str | None,
        typer.Option(
            metavar="POLICY",
            help=f"Output hardening for every role: {OUTPUT_FORMS}.",
            show_default=False,
        ),
    ] = None,
    output_for: Annotated[
        list[str] | None,
        typer.Option(
            "--output-for",
            metavar="ROLE=POLICY",
            help="Output hardening for one role (admin, publisher, consumer, auditor); repeat "
            "for more. ROLE=default removes the override.",
            show_default=False,
        ),
    ] = None,
    detect: Annotated[
        str | None,
        typer.Option(
            metavar="DETECTORS",
            help="Extraction detectors: prada, ood, prada,ood or none.",
            show_default=False,
        ),
    ] = None,
    on_alarm: Annotated[
        str | None,
        typer.Option(
            metavar="ACTION",
            help="What an alarm does: log, alert, throttle or block.",
            show_default=False,
        ),
    ] = None,
    prada_threshold: Annotated[
        float | None,
        typer.Option(
            metavar="X",
            help="PRADA alarm threshold, between 0 and 1 (calibrate sets it from benign rows).",
            show_default=False,
        ),
    ] = None,
    clear_limits: Annotated[
        bool,
        typer.Option(
            "--clear-limits",
            help="Remove every limit and the budget first; limit options given with it apply.",
        ),
    ] = False,
    json_output: JsonOption = False,
) -> None:
    """Change the guard policy of MODEL: only what is given changes, the rest stays.

    Example: modelkeep policy set digits --rate 50/s --budget 10000/day --output round=2
    --output-for admin=full --detect prada,ood --on-alarm block
    """
    changes = _changes(
        {
            "rate": rate,
            "row_rate": row_rate,
            "model_rate": model_rate,
            "concurrency": concurrency,
            "max_rows": max_rows,
            "budget": budget,
        },
        clear_limits=clear_limits,
        output=output,
        output_for=output_for or [],
        detect=detect,
        on_alarm=on_alarm,
        prada_threshold=prada_threshold,
    )
    with client_from(ctx.obj) as client:
        current = client.get_policy(model)
        updated = client.put_policy(model, merged_policy(current, changes))
    if json_output:
        out.print_json(updated)
    else:
        _say_policy(f"updated guard policy of {out.clean(updated.get('model', model))}", updated)
    _warn_idle(model, updated)


def _changes(
    limits: dict[str, str | None],
    *,
    clear_limits: bool,
    output: str | None,
    output_for: list[str],
    detect: str | None,
    on_alarm: str | None,
    prada_threshold: float | None,
) -> PolicyChanges:
    """The command line's options as ``PolicyChanges``; a bad value is a usage error."""
    changes = PolicyChanges(clear_limits=clear_limits)
    for name, text in limits.items():
        if text is None:
            continue
        try:
            if text.strip() == NONE:
                changes.limits[name] = None
            elif name in ("concurrency", "max_rows"):
                changes.limits[name] = parse_count(text)
            else:
                changes.limits[name] = parse_rate(text, budget=name == "budget")
        except ValueError as exc:
            raise _usage(_LIMIT_OPTIONS[name], exc) from None
    try:
        changes.output = None if output is None else parse_output(output)
    except ValueError as exc:
        raise _usage("--output", exc) from None
    try:
        changes.output_for = parse_output_for(output_for)
    except ValueError as exc:
        raise _usage("--output-for", exc) from None
    try:
        changes.detect = None if detect is None else parse_detect(detect)
    except ValueError as exc:
        raise _usage("--detect", exc) from None
    if on_alarm is not None and on_alarm.strip() not in ALARM_ACTIONS:
        raise typer.BadParameter(
            f"give one of: {', '.join(ALARM_ACTIONS)}", param_hint="'--on-alarm'"
        )
    changes.on_alarm = None if on_alarm is None else on_alarm.strip()
    if prada_threshold is not None and not 0 < prada_threshold < 1:
        raise typer.BadParameter(
            "give a number between 0 and 1 (both excluded)", param_hint="'--prada-threshold'"
        )
    changes.prada_threshold = prada_threshold
    if changes.is_empty():
        raise typer.BadParameter(
            "nothing to change: give at least one option (see `modelkeep policy set --help`)"
        )
    return changes


@policy_app.command("calibrate", epilog=EPILOG)
def policy_calibrate(
    ctx: typer.Context,
    model: ModelArgument,
    benign: Annotated[
        Path,
        typer.Option(
            "--benign",
            metavar="FILE",
            help="Benign input rows: .npy (numeric, never unpickled), .csv (numbers, optional "
            f"header row) or .json (a list of rows); at most {MAX_CALIBRATION_ROWS} rows.",
            show_default=False,
        ),
    ],
    json_output: JsonOption = False,
) -> None:
    """Set the PRADA threshold and the OOD reference of MODEL from benign rows.

    The server runs the rows through the model's default version, so this may take a while.

    Example: modelkeep policy calibrate digits --benign benign.npy
    """
    rows = read_rows(benign)
    # The server runs every row through the model before it answers.
    with client_from(ctx.obj, read_timeout=PUSH_READ_TIMEOUT_S) as client:
        policy = client.calibrate_policy(model, rows)
    if json_output:
        out.print_json(policy)
        return
    _say_policy(f"calibrated {out.clean(policy.get('model', model))} on {len(rows)} rows", policy)
    _warn_idle(model, policy)


policy_app.command("assess", epilog=EPILOG)(policy_assess)


@policy_app.command("unblock", epilog=EPILOG)
def policy_unblock(
    ctx: typer.Context,
    model: ModelArgument,
    key_id: KeyIdArgument,
    json_output: JsonOption = False,
) -> None:
    """Lift a detector's block or throttle of KEY_ID on MODEL and forget its query history.

    Example: modelkeep policy unblock digits abcdefgh2345
    """
    with client_from(ctx.obj) as client:
        client.unblock_key(model, key_id)
    if json_output:
        out.print_json({"model": model, "key": key_id})
    else:
        out.say(f"{model}: key {out.clean(key_id)} is no longer blocked or throttled")


@policy_app.command("reset-budget", epilog=EPILOG)
def policy_reset_budget(
    ctx: typer.Context,
    model: ModelArgument,
    key_id: KeyIdArgument,
    json_output: JsonOption = False,
) -> None:
    """Give KEY_ID its whole daily and monthly budget on MODEL back.

    Example: modelkeep policy reset-budget digits abcdefgh2345
    """
    with client_from(ctx.obj) as client:
        client.reset_budget(model, key_id)
    if json_output:
        out.print_json({"model": model, "key": key_id})
    else:
        out.say(f"{model}: budget of key {out.clean(key_id)} reset")
