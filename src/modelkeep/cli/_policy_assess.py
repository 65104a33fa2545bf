"""``modelkeep policy assess``: how much each output policy leaks about a model's training rows.

The server does the work (``POST /api/v1/models/MODEL/policy/assess``, docs/hardening.md); this
command packs the two .npz files into one request and prints the report. Registered on
``policy_app`` by ``_policy``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from modelkeep.cli import _output as out
from modelkeep.cli._client import PUSH_READ_TIMEOUT_S, client_from
from modelkeep.cli._models import ModelArgument
from modelkeep.cli._params import JsonOption
from modelkeep.cli._policy_input import read_assessment

__all__ = ["policy_assess"]


def policy_assess(
    ctx: typer.Context,
    model: ModelArgument,
    members: Annotated[
        Path,
        typer.Option(
            "--members",
            metavar="FILE",
            help="Rows the model was trained on: an .npz with X (rows) and y (class indices).",
            show_default=False,
        ),
    ],
    non_members: Annotated[
        Path,
        typer.Option(
            "--non-members",
            metavar="FILE",
            help="Rows it was not trained on, same form (e.g. a held-out test set).",
            show_default=False,
        ),
    ],
    version: Annotated[
        str | None,
        typer.Option(metavar="V", help="Version to assess (default: the served one)."),
    ] = None,
    target_auc: Annotated[
        float,
        typer.Option(metavar="AUC", min=0.5, max=1.0, help="Highest attack AUC to accept."),
    ] = 0.60,
    apply: Annotated[
        bool, typer.Option("--apply", help="Set the recommended output policy (audited).")
    ] = False,
    json_output: JsonOption = False,
) -> None:
    """Measure how much each output policy leaks about MODEL's training rows.

    The server runs two membership attacks that need no shadow models against the version,
    under each candidate output policy, and recommends the least restrictive one whose attack
    AUC is at most the target. The rows are used in memory and not kept; the report is kept
    with the version and audited.

    Example: modelkeep policy assess digits --members train.npz --non-members test.npz --apply
    """
    data = read_assessment(members, non_members)
    with client_from(ctx.obj, read_timeout=PUSH_READ_TIMEOUT_S) as client:
        report = client.assess_policy(
            model, data, version=version, target_auc=target_auc, apply=apply
        )
    if json_output:
        out.print_json(report)
        return
    out.say(
        f"membership leakage of {out.clean(report.get('model', model))} version"
        f" {out.clean(report.get('version'))} ({out.clean(report.get('members'))} members,"
        f" {out.clean(report.get('non_members'))} non-members)"
    )
    out.say(f"  {'policy':<16} {'attack AUC':>10} {'TPR@1%FPR':>10} {'top-1 kept':>10}  attack")
    policies = report.get("policies")
    for row in policies if isinstance(policies, list) else []:
        if isinstance(row, dict):
            out.say(
                f"  {out.clean(row.get('policy')):<16} {_number(row.get('auc')):>10}"
                f" {_percent(row.get('tpr_at_1pct_fpr')):>10}"
                f" {_percent(row.get('top1_agreement')):>10}  {out.clean(row.get('attack'))}"
            )
    met = "under" if report.get("target_met") else "none under; the least leaking is"
    out.say(
        f"recommended ({met} AUC {out.clean(report.get('target_auc'))}):"
        f" {out.clean(report.get('recommended'))}"
    )
    if report.get("applied"):
        out.say(
            f"applied: the output policy of {model} is now {out.clean(report.get('recommended'))}"
        )
    else:
        out.say(
            f"apply it with: modelkeep policy set {model} --output"
            f" {out.clean(report.get('recommended'))}"
        )


def _number(value: object) -> str:
    return f"{value:.3f}" if isinstance(value, int | float) else "?"


def _percent(value: object) -> str:
    return f"{100 * value:.1f}%" if isinstance(value, int | float) else "?"
