"""policy show/set/calibrate/unblock/reset-budget against a fake guard policy API."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import ADMIN_ID, FakeServer, Invoke
from modelkeep.cli import app
from modelkeep.cli._policy_input import parse_rate

#: What the fake server keeps as an OOD reference; the API only ever shows {"fitted": true}.
STORED_REFERENCE = {"mean": [0.5, 0.5], "threshold": 3.0}
CALIBRATED_THRESHOLD = 0.8125
KEY = "qrstuvwx2345"

ISSUE_EXAMPLE = [
    "policy",
    "set",
    "digits",
    "--rate",
    "50/s",
    "--budget",
    "10000/day",
    "--output",
    "round=2",
    "--output-for",
    "admin=full",
    "--detect",
    "prada,ood",
    "--on-alarm",
    "block",
]


def _default_policy() -> dict[str, Any]:
    return {
        "limits": {},
        "output": "full",
        "output_for": {},
        "detect": [],
        "on_alarm": "log",
        "prada_threshold": None,
        "ood_reference": None,
    }


ASSESS_REPORT = {
    "model": "digits",
    "version": 3,
    "target_auc": 0.6,
    "members": 40,
    "non_members": 30,
    "policies": [
        {"policy": "full", "auc": 0.81, "tpr_at_1pct_fpr": 0.12, "attack": "calibrated",
         "top1_agreement": 1.0},
        {"policy": "round=1", "auc": 0.57, "tpr_at_1pct_fpr": 0.0, "attack": "threshold",
         "top1_agreement": 1.0},
    ],
    "recommended": "round=1",
    "target_met": True,
}  # fmt: skip


@dataclass
class PolicyServer(FakeServer):
    """The fake management API plus the guard policy routes, as api/policy.py answers them."""

    policies: dict[str, dict[str, Any]] = field(default_factory=dict)
    assessed: dict[str, Any] = field(default_factory=dict)
    assess_params: dict[str, str] = field(default_factory=dict)
    restrictions: dict[str, dict[str, tuple[str, str]]] = field(default_factory=dict)
    budget_resets: list[tuple[str, str]] = field(default_factory=list)

    def _routes(self) -> Any:
        m = r"/api/v1/models/([^/]+)"
        return (
            ("GET", rf"{m}/policy", self._get_policy),
            ("PUT", rf"{m}/policy", self._put_policy),
            ("POST", rf"{m}/policy/calibrate", self._calibrate),
            ("POST", rf"{m}/policy/assess", self._assess),
            ("DELETE", rf"{m}/restrictions/([^/]+)", self._unblock),
            ("POST", rf"{m}/budgets/([^/]+)/reset", self._reset_budget),
            *super()._routes(),
        )

    def _shown(self, name: str) -> dict[str, Any]:
        body = {"model": name, **self.policies[name]}
        if body["ood_reference"] is not None:
            body["ood_reference"] = {"fitted": True}
        return body

    def _get_policy(
        self, request: httpx.Request, body: bytes, caller: str, name: str
    ) -> httpx.Response:
        if name not in self.policies:
            return httpx.Response(404, json={"error": f"no model {name}"})
        restricted = sorted(self.restrictions.get(name, {}).items())
        listed = [{"key": k, "kind": kind, "reason": why} for k, (kind, why) in restricted]
        return httpx.Response(200, json={**self._shown(name), "restrictions": listed})

    def _put_policy(
        self, request: httpx.Request, body: bytes, caller: str, name: str
    ) -> httpx.Response:
        data = json.loads(body)
        data.pop("model", None)
        data.pop("restrictions", None)
        if data.get("ood_reference") == {"fitted": True}:
            data["ood_reference"] = self.policies[name]["ood_reference"]
        self.policies[name] = {**_default_policy(), **data}
        return httpx.Response(200, json=self._shown(name))

    def _calibrate(
        self, request: httpx.Request, body: bytes, caller: str, name: str
    ) -> httpx.Response:
        self.policies[name]["prada_threshold"] = CALIBRATED_THRESHOLD
        self.policies[name]["ood_reference"] = STORED_REFERENCE
        return httpx.Response(200, json=self._shown(name))

    def _assess(
        self, request: httpx.Request, body: bytes, caller: str, name: str
    ) -> httpx.Response:
        with np.load(BytesIO(body), allow_pickle=False) as npz:
            self.assessed = {key: npz[key] for key in npz.files}
        self.assess_params = dict(request.url.params)
        return httpx.Response(200, json=ASSESS_REPORT)

    def _unblock(
        self, request: httpx.Request, body: bytes, caller: str, name: str, key_id: str
    ) -> httpx.Response:
        if key_id not in self.restrictions.get(name, {}):
            message = f"key is neither blocked nor throttled on model '{name}'"
            return httpx.Response(404, json={"error": message})
        del self.restrictions[name][key_id]
        return httpx.Response(204)

    def _reset_budget(
        self, request: httpx.Request, body: bytes, caller: str, name: str, key_id: str
    ) -> httpx.Response:
        self.budget_resets.append((name, key_id))
        return httpx.Response(204)


@pytest.fixture
def server() -> PolicyServer:
    policy_server = PolicyServer()
    policy_server.policies["digits"] = _default_policy()
    return policy_server


def _one_error_line(stderr: str) -> str:
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: ")
    return lines[0]


# -- units ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("typed", "sent"),
    [
        ("50/s", "50/second"),
        ("50/sec", "50/second"),
        ("1000/min", "1000/minute"),
        ("10/5s", "10/5second"),
        ("2/h", "2/hour"),
        ("2/hr", "2/hour"),
        ("100/d", "100/day"),
        ("50/second", "50/second"),
        ("50/seconds", "50/seconds"),
        ("10/5second", "10/5second"),
        ("1000/minute", "1000/minute"),
        ("2/hours", "2/hours"),
        ("100/day", "100/day"),
        ("10 per minute", "10 per minute"),
        (" 50/S ", "50/second"),
    ],
)
def test_rates_take_short_units_and_keep_full_words(typed: str, sent: str) -> None:
    assert sent == parse_rate(typed)


@pytest.mark.parametrize(
    ("typed", "sent"),
    [
        ("10000/day", "10000/day"),
        ("10000/d", "10000/day"),
        ("200000/month", "200000/month"),
        ("200000/months", "200000/months"),
    ],
)
def test_budgets_are_per_day_or_month(typed: str, sent: str) -> None:
    assert sent == parse_rate(typed, budget=True)


@pytest.mark.parametrize(
    ("typed", "budget", "expected"),
    [
        ("50/m", False, "'m' is ambiguous"),
        ("50/month", False, "a rate is counted per second, minute, hour, day"),
        ("fast", False, "'fast' is not a rate"),
        ("0/s", False, r"between 1 and 10\^12"),
        ("10/0s", False, "window of zero"),
        ("10000/h", True, "a budget is counted per day, month"),
        ("10000/2day", True, "per calendar day or month"),
    ],
)
def test_bad_rates_and_budgets_say_what_is_expected(
    typed: str, budget: bool, expected: str
) -> None:
    with pytest.raises(ValueError, match=expected):
        parse_rate(typed, budget=budget)


# -- policy set -------------------------------------------------------------------------------


def test_set_the_issue_example_gets_merges_and_puts_the_whole_policy(
    invoke: Invoke, server: PolicyServer
) -> None:
    result = invoke(*ISSUE_EXAMPLE)

    assert result.exit_code == 0, result.output
    get, put = server.requests
    assert (get.method, get.path) == ("GET", "/api/v1/models/digits/policy")
    assert (put.method, put.path) == ("PUT", "/api/v1/models/digits/policy")
    expected = {
        "limits": {"rate": "50/second", "budget": "10000/day"},
        "output": "round=2",
        "output_for": {"admin": "full"},
        "detect": ["ood", "prada"],
        "on_alarm": "block",
        "prada_threshold": None,
        "ood_reference": None,
    }
    assert expected == put.json()
    assert result.stdout.splitlines() == [
        "updated guard policy of digits",
        "  limits:           rate 50/second",
        "  budget:           10000/day (rows per key)",
        "  output:           round=2",
        "  output for:       admin=full",
        "  detect:           ood, prada",
        "  on alarm:         block",
        "  prada threshold:  default",
        "  ood reference:    not fitted",
    ]
    assert result.stderr.startswith("warning: the OOD monitor is on but has no reference")


def test_set_changes_only_what_was_given_and_keeps_the_fitted_reference(
    invoke: Invoke, server: PolicyServer
) -> None:
    server.policies["digits"] = {
        "limits": {"rate": "50/second", "concurrency": 4, "budget": "10000/day"},
        "output": "round=2",
        "output_for": {"admin": "full"},
        "detect": ["prada"],
        "on_alarm": "throttle",
        "prada_threshold": 0.81,
        "ood_reference": STORED_REFERENCE,
        "future_field": {"kept": True},
    }

    result = invoke("policy", "set", "digits", "--row-rate", "1000/min", "--json")

    assert result.exit_code == 0, result.output
    expected = {
        "limits": {
            "rate": "50/second",
            "concurrency": 4,
            "budget": "10000/day",
            "row_rate": "1000/minute",
        },
        "output": "round=2",
        "output_for": {"admin": "full"},
        "detect": ["prada"],
        "on_alarm": "throttle",
        "prada_threshold": 0.81,
        "ood_reference": {"fitted": True},
        "future_field": {"kept": True},
    }
    assert expected == server.requests[-1].json()
    assert server.policies["digits"]["ood_reference"] == STORED_REFERENCE
    assert {"model": "digits", **expected} == json.loads(result.stdout)


def test_set_none_removes_one_limit_and_default_removes_one_role_override(
    invoke: Invoke, server: PolicyServer
) -> None:
    server.policies["digits"]["limits"] = {"rate": "5/second", "budget": "100/day", "max_rows": 9}
    server.policies["digits"]["output_for"] = {"admin": "full", "consumer": "label_only"}

    result = invoke(
        "policy", "set", "digits", "--budget", "none", "--max-rows", "none",
        "--output-for", "consumer=default", "--output-for", "auditor=top_k=3",
    )  # fmt: skip

    assert result.exit_code == 0, result.output
    sent = server.requests[-1].json()
    assert sent["limits"] == {"rate": "5/second"}
    assert sent["output_for"] == {"admin": "full", "auditor": "top_k=3"}


def test_set_clear_limits_drops_every_limit_then_applies_the_given_ones(
    invoke: Invoke, server: PolicyServer
) -> None:
    server.policies["digits"]["limits"] = {"rate": "5/second", "budget": "100/day"}

    result = invoke("policy", "set", "digits", "--clear-limits", "--concurrency", "2")

    assert result.exit_code == 0, result.output
    assert server.requests[-1].json()["limits"] == {"concurrency": 2}


def test_set_detect_none_threshold_and_alarm_are_sent_as_given(
    invoke: Invoke, server: PolicyServer
) -> None:
    server.policies["digits"]["detect"] = ["ood", "prada"]

    result = invoke(
        "policy", "set", "digits", "--detect", "none", "--prada-threshold", "0.7",
        "--on-alarm", "alert",
    )  # fmt: skip

    assert result.exit_code == 0, result.output
    sent = server.requests[-1].json()
    assert (sent["detect"], sent["prada_threshold"], sent["on_alarm"]) == ([], 0.7, "alert")
    assert "warning: on_alarm is alert but no detector is on" in result.stderr


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (["--rate", "50/m"], "'m' is ambiguous"),
        (["--budget", "10000/h"], "a budget is counted per day, month"),
        (["--concurrency", "0"], "not a whole number of at least 1"),
        (["--output", "top_k"], "an output policy is one of"),
        (["--output-for", "consumer"], "write ROLE=POLICY"),
        (["--output-for", "admin=full", "--output-for", "admin=round=1"], "given twice"),
        (["--detect", "prada,magic"], "give some of prada, ood, nearcopy"),
        (["--on-alarm", "explode"], "give one of: log, alert, throttle, block"),
        (["--prada-threshold", "1"], "between 0 and 1"),
        ([], "nothing to change"),
    ],
)
def test_set_refuses_bad_values_before_any_request(
    invoke: Invoke, server: PolicyServer, options: list[str], expected: str
) -> None:
    result = invoke("policy", "set", "digits", *options)

    assert result.exit_code == 2
    assert expected in " ".join(result.stderr.split())
    assert server.requests == []


def test_set_refused_by_the_server_prints_its_message_and_exits_1(
    invoke: Invoke, server: PolicyServer
) -> None:
    server.policies["digits"]["limits"] = {"rate": "50/second"}
    calls: list[str] = []

    def refuse_put(request: httpx.Request) -> httpx.Response:
        calls.append(request.method)
        if request.method == "PUT":
            return httpx.Response(400, json={"error": "output_for maps roles to output policies"})
        return server.handle_request(request)

    result = invoke(
        "policy", "set", "digits", "--output-for", "approver=full",
        transport=httpx.MockTransport(refuse_put),
    )  # fmt: skip

    assert result.exit_code == 1
    assert _one_error_line(result.stderr) == "error: output_for maps roles to output policies"
    assert calls == ["GET", "PUT"]
    assert result.stdout == ""


def test_set_of_a_missing_model_exits_5_without_a_put(invoke: Invoke, server: PolicyServer) -> None:
    result = invoke("policy", "set", "nosuch", "--rate", "1/s")

    assert result.exit_code == 5
    assert _one_error_line(result.stderr) == "error: no model nosuch"
    assert [request.method for request in server.requests] == ["GET"]


# -- policy show ------------------------------------------------------------------------------


def test_show_prints_every_field_and_the_restricted_keys(
    invoke: Invoke, server: PolicyServer
) -> None:
    server.policies["digits"] = {
        "limits": {"concurrency": 4, "rate": "50/second", "max_rows": 100, "budget": "9/month"},
        "output": "round=2",
        "output_for": {"consumer": "label_only", "admin": "full"},
        "detect": ["ood", "prada"],
        "on_alarm": "block",
        "prada_threshold": 0.809,
        "ood_reference": STORED_REFERENCE,
    }
    server.restrictions["digits"] = {KEY: ("block", "prada alarm")}

    result = invoke("policy", "show", "digits")

    assert result.exit_code == 0, result.output
    assert [
        "guard policy of digits",
        "  limits:           rate 50/second, concurrency 4, max_rows 100",
        "  budget:           9/month (rows per key)",
        "  output:           round=2",
        "  output for:       admin=full, consumer=label_only",
        "  detect:           ood, prada",
        "  on alarm:         block",
        "  prada threshold:  0.809",
        "  ood reference:    fitted",
        "  restricted keys:  1 (lift with `modelkeep policy unblock digits KEY_ID`)",
        "",
        "KEY           KIND   REASON",
        f"{KEY}  block  prada alarm",
    ] == [line.rstrip() for line in result.stdout.splitlines()]
    assert result.stderr == ""
    assert [(r.method, r.path) for r in server.requests] == [
        ("GET", "/api/v1/models/digits/policy")
    ]


def test_show_json_is_the_api_answer(invoke: Invoke, server: PolicyServer) -> None:
    server.restrictions["digits"] = {KEY: ("throttle", "ood alarm")}

    result = invoke("policy", "show", "digits", "--json")

    assert result.exit_code == 0, result.output
    expected = {
        "model": "digits",
        **_default_policy(),
        "restrictions": [{"key": KEY, "kind": "throttle", "reason": "ood alarm"}],
    }
    assert expected == json.loads(result.stdout)


def test_show_of_a_default_policy_says_none_and_default(
    invoke: Invoke, server: PolicyServer
) -> None:
    result = invoke("policy", "show", "digits")

    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [
        "guard policy of digits",
        "  limits:           none",
        "  budget:           none",
        "  output:           full",
        "  output for:       no role overrides",
        "  detect:           none",
        "  on alarm:         log",
        "  prada threshold:  default",
        "  ood reference:    not fitted",
        "  restricted keys:  none",
    ]


# -- policy calibrate -------------------------------------------------------------------------

ROWS = [[0.5, 1.0, 2.0], [1.5, -2.0, 3.25], [0.0, 4.0, 1e-3]]


def test_calibrate_npy_posts_its_rows_and_prints_the_new_threshold(
    invoke: Invoke, server: PolicyServer, tmp_path: Path
) -> None:
    benign = tmp_path / "benign.npy"
    np.save(benign, np.array(ROWS, dtype=np.float64))

    result = invoke("policy", "calibrate", "digits", "--benign", str(benign))

    assert result.exit_code == 0, result.output
    (post,) = server.requests
    assert (post.method, post.path) == ("POST", "/api/v1/models/digits/policy/calibrate")
    assert post.json() == {"rows": ROWS}
    assert result.stdout.splitlines()[0] == "calibrated digits on 3 rows"
    assert "  prada threshold:  0.8125" in result.stdout.splitlines()
    assert "  ood reference:    fitted" in result.stdout.splitlines()


def test_calibrate_npy_of_integers_sends_floats(
    invoke: Invoke, server: PolicyServer, tmp_path: Path
) -> None:
    benign = tmp_path / "benign.npy"
    np.save(benign, np.array([[1, 2], [3, 4]], dtype=np.int16))

    result = invoke("policy", "calibrate", "digits", "--benign", str(benign), "--json")

    assert result.exit_code == 0, result.output
    assert server.requests[-1].body == b'{"rows":[[1.0,2.0],[3.0,4.0]]}'
    assert json.loads(result.stdout)["prada_threshold"] == CALIBRATED_THRESHOLD


UNPICKLED: list[str] = []


def _record_unpickling(tag: str) -> str:
    UNPICKLED.append(tag)
    return tag


class _Tripwire:
    """Records its own unpickling: proof of whether a loader ran pickle on it."""

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (_record_unpickling, ("unpickled",))


def test_calibrate_refuses_an_npy_of_objects_without_unpickling_it(
    invoke: Invoke, server: PolicyServer, tmp_path: Path
) -> None:
    benign = tmp_path / "benign.npy"
    objects = np.empty((1, 2), dtype=object)
    objects[0, 0], objects[0, 1] = _Tripwire(), 1.0
    np.save(benign, objects, allow_pickle=True)
    UNPICKLED.clear()

    result = invoke("policy", "calibrate", "digits", "--benign", str(benign))

    assert result.exit_code == 1
    assert "holds Python objects (a pickle) and is refused" in _one_error_line(result.stderr)
    assert UNPICKLED == []
    assert server.requests == []
    # The file really is a trap: loading it with pickle allowed trips the wire.
    np.load(benign, allow_pickle=True)
    assert UNPICKLED == ["unpickled"]


@pytest.mark.parametrize(
    "text",
    [
        "0.5,1.0,2.0\n1.5,-2.0,3.25\n0.0,4.0,0.001\n",
        "a,b,c\n0.5,1.0,2.0\n1.5,-2.0,3.25\n\n0.0, 4.0 ,1e-3\n",
        "\ufeffx1,x2,x3\r\n0.5,1.0,2.0\r\n1.5,-2.0,3.25\r\n0.0,4.0,0.001\r\n",
    ],
    ids=["no-header", "header", "bom-crlf-header"],
)
def test_calibrate_csv_with_or_without_a_header_sends_the_same_rows(
    invoke: Invoke, server: PolicyServer, tmp_path: Path, text: str
) -> None:
    benign = tmp_path / "benign.csv"
    benign.write_bytes(text.encode("utf-8"))

    result = invoke("policy", "calibrate", "digits", "--benign", str(benign))

    assert result.exit_code == 0, result.output
    assert server.requests[-1].json() == {"rows": ROWS}


def test_calibrate_json_list_of_rows(invoke: Invoke, server: PolicyServer, tmp_path: Path) -> None:
    benign = tmp_path / "benign.JSON"
    benign.write_text(json.dumps([[0.5, 1, 2.0], [1.5, -2, 3.25], [0, 4, 0.001]]))

    result = invoke("policy", "calibrate", "digits", "--benign", str(benign))

    assert result.exit_code == 0, result.output
    assert server.requests[-1].json() == {"rows": ROWS}


def _write(path: Path, content: bytes | str) -> None:
    if isinstance(content, str):
        path.write_text(content)
    else:
        path.write_bytes(content)


def _npy(array: np.ndarray[Any, Any]) -> bytes:
    buffer = BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("rows.txt", "1,2\n", "give benign rows as a .npy, .csv or .json file"),
        ("rows.csv", "", "holds no rows"),
        ("rows.csv", "a,b\n", "holds no rows"),
        ("rows.csv", "1,2\nx,3\n", "line 2: a value is not a number"),
        ("rows.csv", "1,2\n3\n", "row 2 has 1 values, the first row has 2"),
        ("rows.csv", "1,2\nnan,3\n", "row 2 holds a NaN or infinite value"),
        ("rows.csv", b"1,2\n\xff\xfe,3\n", "is not a UTF-8 text file"),
        ("rows.json", "{", "is not valid JSON"),
        ("rows.json", '{"rows": [[1]]}', "must hold a JSON list of rows"),
        ("rows.json", "[[1, true]]", "must hold a JSON list of rows"),
        ("rows.json", "[[1, 2], [1e999, 2]]", "row 2 holds a NaN or infinite value"),
        ("rows.json", "[[]]", "rows must hold at least one value"),
        ("rows.json", f"[[1{'0' * 400}]]", "holds a number too large for a float"),
        ("rows.npy", b"not an npy file at all", "is not a valid .npy file"),
        ("rows.npy", _npy(np.zeros(3)), "has 1 dimensions; give a 2-D array"),
        ("rows.npy", _npy(np.zeros((2, 2)))[:-8], "is not a valid .npy file"),
        ("rows.npy", _npy(np.array([["a", "b"]])), "holds non-numeric values (numpy dtype <U1)"),
        ("rows.npy", _npy(np.array([[1.0, np.inf]])), "row 1 holds a NaN or infinite value"),
        ("rows.npy", _npy(np.zeros((0, 3))), "holds no rows"),
    ],
)
def test_calibrate_bad_files_end_with_one_clear_error_line(
    invoke: Invoke,
    server: PolicyServer,
    tmp_path: Path,
    name: str,
    content: bytes | str,
    expected: str,
) -> None:
    benign = tmp_path / name
    _write(benign, content)

    result = invoke("policy", "calibrate", "digits", "--benign", str(benign))

    assert result.exit_code == 1
    assert expected in _one_error_line(result.stderr)
    assert server.requests == []
    assert result.stdout == ""


def test_calibrate_missing_file_and_directory_are_one_error_line(
    invoke: Invoke, server: PolicyServer, tmp_path: Path
) -> None:
    missing = invoke("policy", "calibrate", "digits", "--benign", str(tmp_path / "no.csv"))
    directory = tmp_path / "dir.npy"
    directory.mkdir()
    is_dir = invoke("policy", "calibrate", "digits", "--benign", str(directory))

    assert (missing.exit_code, is_dir.exit_code) == (1, 1)
    assert "error: no such file:" in _one_error_line(missing.stderr)
    assert "is a directory, not a file of rows" in _one_error_line(is_dir.stderr)
    assert server.requests == []


def test_calibrate_refuses_more_rows_than_the_server_takes(
    invoke: Invoke, server: PolicyServer, tmp_path: Path
) -> None:
    benign = tmp_path / "big.npy"
    np.save(benign, np.zeros((100_001, 1), dtype=np.float32))

    result = invoke("policy", "calibrate", "digits", "--benign", str(benign))

    assert result.exit_code == 1
    assert "more than 100000 rows" in _one_error_line(result.stderr)
    assert server.requests == []


# -- unblock, reset-budget --------------------------------------------------------------------


def test_unblock_deletes_the_restriction(invoke: Invoke, server: PolicyServer) -> None:
    server.restrictions["digits"] = {KEY: ("block", "prada alarm")}

    result = invoke("policy", "unblock", "digits", KEY)

    assert result.exit_code == 0, result.output
    (delete,) = server.requests
    assert ("DELETE", f"/api/v1/models/digits/restrictions/{KEY}") == (delete.method, delete.path)
    assert server.restrictions["digits"] == {}
    assert f"digits: key {KEY} is no longer blocked or throttled\n" == result.stdout


def test_unblock_of_a_key_that_is_not_restricted_exits_5(
    invoke: Invoke, server: PolicyServer
) -> None:
    result = invoke("policy", "unblock", "digits", KEY, "--json")

    assert result.exit_code == 5
    expected = "error: key is neither blocked nor throttled on model 'digits'"
    assert expected == _one_error_line(result.stderr)
    assert result.stdout == ""


def test_reset_budget_posts_the_reset(invoke: Invoke, server: PolicyServer) -> None:
    result = invoke("policy", "reset-budget", "digits", ADMIN_ID, "--json")

    assert result.exit_code == 0, result.output
    (post,) = server.requests
    assert ("POST", f"/api/v1/models/digits/budgets/{ADMIN_ID}/reset") == (post.method, post.path)
    assert post.body == b""
    assert server.budget_resets == [("digits", ADMIN_ID)]
    assert json.loads(result.stdout) == {"model": "digits", "key": ADMIN_ID}


@pytest.mark.parametrize("command", ["unblock", "reset-budget"])
def test_a_full_api_key_given_as_key_id_is_refused_and_not_echoed(
    invoke: Invoke, server: PolicyServer, command: str
) -> None:
    secret = "AhTZ-P4-t4QJSivBpYB6A8eu6pe2QEQ5Nk8VzxGO_wM"

    result = invoke("policy", command, "digits", f"mk_{KEY}_{secret}")

    assert result.exit_code == 2
    assert "give only its id" in " ".join(result.stderr.split())
    assert secret not in result.output
    assert server.requests == []


def test_policy_commands_need_a_token(invoke: Invoke, server: PolicyServer) -> None:
    result = invoke("policy", "show", "digits", token=None)

    assert result.exit_code == 3
    assert (
        _one_error_line(result.stderr) == "error: no API key: set MODELKEEP_TOKEN or pass --token"
    )


@pytest.mark.parametrize(
    "command", [["policy"], *(["policy", c] for c in ("show", "set", "calibrate", "unblock"))]
)
def test_policy_help_works(command: list[str]) -> None:
    result = CliRunner().invoke(app, [*command, "--help"], env={"COLUMNS": "120"})

    assert result.exit_code == 0, result.output
    assert f"Usage: modelkeep {' '.join(command)}" in result.stdout


# -- the defaults and policy assess -------------------------------------------------------------


def test_show_marks_the_defaults_and_says_why(invoke: Invoke, server: PolicyServer) -> None:
    server.policies["digits"] = {
        **_default_policy(),
        "limits": {"rate": "100/second", "budget": "100000/day"},
        "output": "confidence=1",
        "output_for": {"admin": "full"},
        "detect": ["nearcopy", "ood", "prada"],
        "on_alarm": "alert",
        "default": True,
    }
    result = invoke("policy", "show", "digits")
    assert result.exit_code == 0, result.output
    assert "  output:           confidence=1" in result.stdout.splitlines()
    assert "no policy is set for this model: these are modelkeep's defaults" in result.stdout
    assert "modelkeep policy set MODEL --output full" in result.stdout
    # The OOD monitor of the defaults waits for calibration, which the notes say already.
    assert result.stderr == ""


def test_assess_sends_both_files_as_one_npz_and_prints_the_report(
    invoke: Invoke, server: PolicyServer, tmp_path: Path
) -> None:
    rng = np.random.default_rng(0)
    members, non_members = tmp_path / "train.npz", tmp_path / "test.npz"
    np.savez(members, X=rng.normal(size=(40, 4)), y=rng.integers(0, 3, 40))
    np.savez(non_members, X=rng.normal(size=(30, 4)), y=rng.integers(0, 3, 30))
    result = invoke(
        "policy", "assess", "digits", "--members", str(members), "--non-members",
        str(non_members), "--target-auc", "0.6", "--version", "3",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert sorted(server.assessed) == ["members_X", "members_y", "non_members_X", "non_members_y"]
    assert server.assessed["members_X"].shape == (40, 4)
    assert server.assess_params == {"target_auc": "0.6", "apply": "false", "version": "3"}
    lines = result.stdout.splitlines()
    assert lines[0] == "membership leakage of digits version 3 (40 members, 30 non-members)"
    assert lines[2].split() == ["full", "0.810", "12.0%", "100.0%", "calibrated"]
    assert "recommended (under AUC 0.6): round=1" in lines
    assert "apply it with: modelkeep policy set digits --output round=1" in lines


def test_assess_refuses_a_file_that_is_not_an_npz_of_x_and_y(
    invoke: Invoke, server: PolicyServer, tmp_path: Path
) -> None:
    good, bad = tmp_path / "good.npz", tmp_path / "bad.npz"
    np.savez(good, X=np.zeros((3, 2)), y=np.zeros(3, dtype=int))
    np.savez(bad, rows=np.zeros((3, 2)))
    result = invoke("policy", "assess", "digits", "--members", str(good), "--non-members", str(bad))
    assert result.exit_code == 1
    assert _one_error_line(result.stderr) == "error: bad.npz: the .npz must hold exactly X and y"
    assert server.requests == []
