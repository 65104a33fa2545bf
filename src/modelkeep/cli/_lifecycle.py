"""``modelkeep eval``, ``changes`` and the lifecycle ``label`` commands (docs/lifecycle.md).

Evaluation sets and gates decide which versions a protected label may point at; protected
labels move only through change requests that other keys approve; every label keeps its
history and can be rolled back.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from modelkeep.cli import _output as out
from modelkeep.cli._client import JSONObject, client_from
from modelkeep.cli._errors import exit_codes_epilog
from modelkeep.cli._params import JsonOption, check_name
from modelkeep.errors import InvalidInput

__all__ = [
    "changes_app",
    "eval_app",
    "label_history",
    "label_protect",
    "label_rollback",
    "say_change",
]

EPILOG = exit_codes_epilog()

eval_app = typer.Typer(
    help="Evaluation sets and gates: what a version must score before a protected label "
    "may point at it.",
    no_args_is_help=True,
)
changes_app = typer.Typer(
    help="Change requests of protected labels: list, approve, reject.", no_args_is_help=True
)

ModelArgument = Annotated[str, typer.Argument(help="Model name.", callback=check_name)]
LabelArgument = Annotated[str, typer.Argument(help="Label name.", callback=check_name)]
ChangeArgument = Annotated[
    str, typer.Argument(metavar="ID", help="The change request's id (see changes ls).")
]


def _optional_name(value: str | None) -> str | None:
    return None if value is None else check_name(value)


# An evaluation set is read whole to send it; the server takes 64 MiB by default.
_MAX_DATA = 1 << 30


def say_change(change: JSONObject) -> None:
    """Tell a person a change request was opened (or what became of it)."""
    status = out.clean(change.get("status"))
    what = _what(change)
    out.say(f"change request {out.clean(change.get('id'))}: {what} [{status}]")
    if change.get("status") == "pending":
        approvals = change.get("approvals")
        have = len(approvals) if isinstance(approvals, list) else 0
        out.say(
            f"  needs {out.clean(change.get('approvals_needed'))} approval(s) from keys other "
            f"than the requester's and the pusher's; has {have}; expires "
            f"{out.time_text(change.get('expires_at'))}"
        )
        out.say(f"  approve with: modelkeep changes approve {out.clean(change.get('id'))}")


def _what(change: JSONObject) -> str:
    model, label = out.clean(change.get("model")), out.clean(change.get("label"))
    if change.get("kind") == "protect":
        return f"{model}: protect {label} with {out.clean(change.get('new_approvals'))} approval(s)"
    previous = change.get("previous")
    was = "" if previous is None else f" (from {out.clean(previous)})"
    kind = "roll back" if change.get("kind") == "rollback" else "move"
    return f"{model}: {kind} {label} -> version {out.clean(change.get('version'))}{was}"


# -- eval -------------------------------------------------------------------------------------


@eval_app.command("set", epilog=EPILOG)
def eval_set(
    ctx: typer.Context,
    model: ModelArgument,
    data: Annotated[
        Path | None,
        typer.Option(
            "--data",
            metavar="FILE.npz",
            help="The evaluation set: an .npz with arrays 'inputs' and 'expected'. "
            "Without it the stored set stays and only the gates change.",
            show_default=False,
        ),
    ] = None,
    gate: Annotated[
        list[str] | None,
        typer.Option(
            "--gate",
            metavar="GATE",
            help="A gate, e.g. 'accuracy>=0.95', 'rmse<=0.3', 'f1>=production-0.01' (no worse "
            "than the version under production by more than 0.01); repeat for more. Metrics: "
            "accuracy, f1, auc, rmse, mae.",
            show_default=False,
        ),
    ] = None,
    json_output: JsonOption = False,
) -> None:
    """Give MODEL an evaluation set and gates (admin); versions are evaluated on it.

    The set is sealed on the server and never shown again. Every new version is evaluated in
    the background; a protected label only points at versions that pass every gate.

    Example: modelkeep eval set iris --data iris-eval.npz --gate 'accuracy>=0.95'
    """
    content = None
    if data is not None:
        try:
            if data.stat().st_size > _MAX_DATA:
                raise InvalidInput(f"{data} is too large to be an evaluation set")
            content = data.read_bytes()
        except OSError as exc:
            raise InvalidInput(f"cannot read {data}: {exc.strerror or 'error'}") from exc
    elif not gate:
        raise typer.BadParameter("give --data, --gate or both", param_hint="'--data'")
    with client_from(ctx.obj) as client:
        answer = client.set_evalset(model, content, gate if gate else None)
    if json_output:
        out.print_json(answer)
        return
    out.say(
        f"{model}: evaluation set sha256 {out.clean(str(answer.get('sha256'))[:12])}, "
        f"{out.clean(answer.get('rows'))} rows ({out.clean(answer.get('task'))})"
    )
    gates = answer.get("gates")
    out.say("gates: " + (", ".join(out.clean(g) for g in gates) if gates else "none"))


@eval_app.command("show", epilog=EPILOG)
def eval_show(
    ctx: typer.Context,
    model: ModelArgument,
    version: Annotated[
        int | None, typer.Argument(help="One version (default: every version).", min=1)
    ] = None,
    json_output: JsonOption = False,
) -> None:
    """Show MODEL's evaluation set and gates, and each version's metrics and verdict.

    Example: modelkeep eval show iris 3
    """
    with client_from(ctx.obj) as client:
        view = client.show_evaluation(model, version)
    if json_output:
        out.print_json(view)
        return
    evalset = view.get("evalset")
    if not isinstance(evalset, dict):
        out.say(f"{model} has no evaluation set: give it one with `modelkeep eval set`")
    else:
        out.say(
            f"evaluation set sha256 {out.clean(str(evalset.get('sha256'))[:12])}, "
            f"{out.clean(evalset.get('rows'))} rows ({out.clean(evalset.get('task'))})"
        )
        gates = evalset.get("gates")
        out.say("gates: " + (", ".join(out.clean(g) for g in gates) if gates else "none"))
    for item in view.get("versions") or []:
        if not isinstance(item, dict):
            continue
        out.say(f"version {out.clean(item.get('version'))}: {out.evaluation_text(item)}")
        if item.get("error"):
            out.say(f"  error: {out.clean(item.get('error'))}")
        for result in item.get("gates") or []:
            if isinstance(result, dict) and result.get("passed") is not True:
                out.say(f"  {out.clean(result.get('gate'))}: {out.clean(result.get('reason'))}")


@eval_app.command("run", epilog=EPILOG)
def eval_run(
    ctx: typer.Context,
    model: ModelArgument,
    version: Annotated[int, typer.Argument(help="Version number.", min=1)],
    json_output: JsonOption = False,
) -> None:
    """Evaluate VERSION of MODEL (again) on the current set, in the background.

    Example: modelkeep eval run iris 3
    """
    with client_from(ctx.obj) as client:
        answer = client.run_evaluation(model, version)
    if json_output:
        out.print_json(answer)
        return
    out.say(f"{model} version {version}: evaluation queued; see `modelkeep eval show {model}`")


# -- label protect / rollback / history --------------------------------------------------------


def label_protect(
    ctx: typer.Context,
    model: ModelArgument,
    label: LabelArgument,
    approvals: Annotated[
        int,
        typer.Option(
            "--approvals",
            min=0,
            max=5,
            help="Approvals (from keys other than the requester's and the pusher's) a move "
            "needs; 0 removes the protection, which itself needs approval.",
        ),
    ] = 1,
    json_output: JsonOption = False,
) -> None:
    """Protect LABEL of MODEL: it then moves only through approved change requests (admin).

    Example: modelkeep label protect iris production --approvals 1
    """
    with client_from(ctx.obj) as client:
        answer = client.protect_label(model, label, approvals)
    if json_output:
        out.print_json(answer)
    elif "approvals_needed" in answer:
        say_change(answer)
    else:
        out.say(f"{model}: label {label} needs {out.clean(answer.get('approvals'))} approval(s)")


def label_rollback(
    ctx: typer.Context,
    model: ModelArgument,
    label: LabelArgument,
    emergency: Annotated[
        bool,
        typer.Option(
            "--emergency",
            help="Admins: move a protected label back at once, without approval. Audited and "
            "alerted as an emergency.",
        ),
    ] = False,
    json_output: JsonOption = False,
) -> None:
    """Move LABEL of MODEL back to the version it pointed at before.

    A protected label needs one approval (a change request is opened), unless an admin
    declares --emergency.

    Example: modelkeep label rollback iris production
    """
    with client_from(ctx.obj) as client:
        answer = client.rollback_label(model, label, emergency=emergency)
    if json_output:
        out.print_json(answer)
    elif "approvals_needed" in answer:
        say_change(answer)
    else:
        out.say(f"{model}: label {label} -> version {out.clean(answer.get('version'))}")


def label_history(
    ctx: typer.Context,
    model: ModelArgument,
    label: Annotated[
        str | None, typer.Argument(help="One label (default: all).", callback=_optional_name)
    ] = None,
    json_output: JsonOption = False,
) -> None:
    """Show every move of MODEL's labels (or of LABEL), oldest first.

    Example: modelkeep label history iris production
    """
    with client_from(ctx.obj) as client:
        moves = client.label_history(model, label)
    if json_output:
        out.print_json(moves)
        return
    if not moves:
        out.say("no label moves recorded")
        return
    table = out.table("TIME", "LABEL", "VERSION", "FROM", "HOW", "BY", "CHANGE")
    for move in moves:
        table.add_row(
            out.cell(out.time_text(move.get("time"))),
            out.cell(move.get("label")),
            out.cell("deleted" if move.get("version") is None else move.get("version")),
            out.cell(move.get("previous")),
            out.cell(move.get("kind")),
            out.cell(move.get("actor")),
            out.cell(move.get("change_id")),
        )
    out.stdout_console().print(table)


# -- changes ----------------------------------------------------------------------------------


@changes_app.command("ls", epilog=EPILOG)
def changes_ls(
    ctx: typer.Context,
    status: Annotated[
        str | None,
        typer.Option(
            "--status",
            metavar="STATUS",
            help="Only pending, applied, rejected, expired or failed requests.",
            show_default=False,
        ),
    ] = None,
    json_output: JsonOption = False,
) -> None:
    """List change requests, newest first.

    Example: modelkeep changes ls --status pending
    """
    with client_from(ctx.obj) as client:
        changes = client.list_changes(status)
    if json_output:
        out.print_json(changes)
        return
    if not changes:
        out.say("no change requests")
        return
    table = out.table("ID", "STATUS", "CHANGE~", "APPROVALS", "REQUESTER", "EXPIRES")
    for change in changes:
        approvals = change.get("approvals")
        have = len(approvals) if isinstance(approvals, list) else 0
        table.add_row(
            out.cell(change.get("id")),
            out.cell(change.get("status")),
            out.cell(_what(change)),
            out.cell(f"{have}/{out.clean(change.get('approvals_needed'))}"),
            out.cell(change.get("requester")),
            out.cell(out.time_text(change.get("expires_at"))),
        )
    out.stdout_console().print(table)


@changes_app.command("show", epilog=EPILOG)
def changes_show(
    ctx: typer.Context,
    change_id: ChangeArgument,
    json_output: JsonOption = False,
) -> None:
    """Show one change request.

    Example: modelkeep changes show 0f3c...
    """
    with client_from(ctx.obj) as client:
        change = client.get_change(change_id)
    if json_output:
        out.print_json(change)
        return
    say_change(change)
    if change.get("reason"):
        out.say(f"  reason: {out.clean(change.get('reason'))}")


@changes_app.command("approve", epilog=EPILOG)
def changes_approve(
    ctx: typer.Context,
    change_id: ChangeArgument,
    json_output: JsonOption = False,
) -> None:
    """Approve a change request (approver or admin; never your own, never for a version you
    pushed). With enough approvals it takes effect at once.

    Example: modelkeep changes approve 0f3c...
    """
    with client_from(ctx.obj) as client:
        change = client.approve_change(change_id)
    if json_output:
        out.print_json(change)
    else:
        say_change(change)


@changes_app.command("reject", epilog=EPILOG)
def changes_reject(
    ctx: typer.Context,
    change_id: ChangeArgument,
    reason: Annotated[
        str, typer.Option("--reason", metavar="TEXT", help="Why (kept and audited).")
    ],
    json_output: JsonOption = False,
) -> None:
    """Reject a change request (approver or admin), or withdraw your own.

    Example: modelkeep changes reject 0f3c... --reason 'f1 dropped on the holdout'
    """
    with client_from(ctx.obj) as client:
        change = client.reject_change(change_id, reason)
    if json_output:
        out.print_json(change)
    else:
        say_change(change)
