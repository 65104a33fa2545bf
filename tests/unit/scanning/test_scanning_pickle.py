"""The pickle analyser: imports, calls, builds, memo, streams, joblib and PyTorch layouts."""

from __future__ import annotations

import collections
import io
import pickle
from types import ModuleType

import numpy as np
import pytest

from modelkeep.scanning import Severity, Verdict, scan_bytes


def critical_messages(data: bytes) -> list[str]:
    return [f.message for f in scan_bytes(data).findings if f.severity is Severity.CRITICAL]


@pytest.mark.parametrize("protocol", range(6))
def test_allowlisted_data_is_unsafe_format_with_conversion_advice(protocol: int) -> None:
    value = {"a": np.arange(4.0), "o": collections.OrderedDict(x=1), "s": {1}, "c": 1j}
    report = scan_bytes(pickle.dumps(value, protocol=protocol))
    assert report.verdict == Verdict.UNSAFE_FORMAT
    assert report.format == "pickle"
    advice = [f.message for f in report.findings if f.severity is Severity.MEDIUM]
    assert any("skops" in m and "safetensors" in m and "ONNX" in m for m in advice)


def test_unlisted_import_that_is_never_called_is_malicious(asm: ModuleType) -> None:
    # A reference alone makes the loader import the module, running its top-level code.
    data = asm.P2 + asm.g("mypackage.models", "Thing") + asm.STOP
    messages = critical_messages(data)
    assert len(messages) == 1
    assert "mypackage.models.Thing" in messages[0]
    assert "not on the allowlist" in messages[0]


def test_known_target_is_named_as_such(asm: ModuleType) -> None:
    messages = critical_messages(asm.os_system_p0())
    assert any("os.system, a known code-execution target" in m for m in messages)
    assert any("REDUCE calls os.system('true',)" in m for m in messages)


def test_location_names_the_opcode_and_byte(asm: ModuleType) -> None:
    data = asm.P2 + asm.g("os", "system") + asm.STOP
    report = scan_bytes(data, "model.pkl")
    locations = [f.location for f in report.findings if f.severity is Severity.CRITICAL]
    assert locations == ["model.pkl @ opcode 1 (byte 2)"]


def test_memo_overwrite_resolves_to_the_last_stored_name(asm: ModuleType) -> None:
    memo = asm.P4 + asm.u("collections") + asm.binput(1) + asm.POP + asm.u("os") + asm.binput(1)
    memo += asm.POP + asm.u("system") + asm.binput(2) + asm.POP
    data = memo + asm.binget(1) + asm.binget(2) + asm.STACK_GLOBAL + asm.STOP
    assert any("imports os.system" in m for m in critical_messages(data))


def test_stack_global_from_computed_values_is_malicious(asm: ModuleType) -> None:
    # The module name is the result of a call, which no scanner can resolve to text.
    computed = asm.g("builtins", "str") + asm.EMPTY_TUPLE + asm.REDUCE
    data = asm.P4 + computed + asm.u("system") + asm.STACK_GLOBAL + asm.STOP
    assert any("cannot resolve to text" in m for m in critical_messages(data))


def test_python2_names_are_mapped_like_the_loader_maps_them(asm: ModuleType) -> None:
    data = asm.P2 + asm.g("__builtin__", "set") + asm.EMPTY_LIST + asm.TUPLE1 + asm.REDUCE
    report = scan_bytes(data + asm.STOP)
    assert report.verdict == Verdict.UNSAFE_FORMAT


def test_calling_the_result_of_a_call_is_malicious(asm: ModuleType) -> None:
    made = asm.ordered_dict()
    data = asm.P2 + made + asm.EMPTY_TUPLE + asm.REDUCE + asm.STOP
    assert any("a value computed earlier" in m for m in critical_messages(data))


def test_build_on_an_allowlisted_instance_is_harmless(asm: ModuleType) -> None:
    state = asm.EMPTY_DICT + asm.x("note") + asm.x("hello") + asm.SETITEM
    data = asm.P2 + asm.ordered_dict() + state + asm.BUILD + asm.STOP
    assert scan_bytes(data).verdict == Verdict.UNSAFE_FORMAT


def test_setitem_on_a_class_is_malicious(asm: ModuleType) -> None:
    data = asm.P2 + asm.g("collections", "OrderedDict") + asm.x("k") + asm.x("v") + asm.SETITEM
    assert any("calls a method of" in m for m in critical_messages(data + asm.STOP))


def test_reconstructor_is_judged_by_the_class_it_builds(asm: ModuleType) -> None:
    args = asm.g("argparse", "Namespace") + asm.g("builtins", "object") + b"N" + asm.TUPLE3
    data = asm.P2 + asm.g("copyreg", "_reconstructor") + args + asm.REDUCE + asm.STOP
    assert any("calls argparse.Namespace" in m for m in critical_messages(data))


def test_every_stream_is_analysed_not_only_the_first(asm: ModuleType) -> None:
    benign = pickle.dumps([1, 2, 3], protocol=2)
    report = scan_bytes(benign + benign + asm.os_system_p0(), "multi.pkl")
    assert report.verdict == Verdict.MALICIOUS
    assert any("multi.pkl > pickle #3" in f.location for f in report.findings)


def test_bytes_after_the_last_stream_are_an_error() -> None:
    report = scan_bytes(pickle.dumps({"a": 1}) + b"\x00\x01\x02")
    assert report.verdict == Verdict.ERROR


def test_broken_stream_keeps_what_came_before(asm: ModuleType) -> None:
    report = scan_bytes(asm.os_system_p0()[:-1] + b"\xff")
    severities = {f.severity for f in report.findings}
    assert {Severity.CRITICAL, Severity.HIGH} <= severities
    assert report.verdict == Verdict.MALICIOUS


def test_embedded_pickle_bytes_are_scanned(asm: ModuleType) -> None:
    inner = asm.P2 + asm.os_system_p0()
    data = asm.P2 + asm.cb(inner) + asm.STOP
    report = scan_bytes(data, "outer.pkl")
    assert report.verdict == Verdict.MALICIOUS
    assert any("embedded pickle" in f.location for f in report.findings)


def test_embedded_pickles_stop_at_max_depth(asm: ModuleType) -> None:
    data = asm.P2 + asm.g("collections", "OrderedDict") + asm.STOP
    for _ in range(6):
        data = asm.P2 + asm.cb(data) + asm.STOP
    messages = critical_messages(data)
    assert any("nested more than 4 levels" in m for m in messages)


def test_codecs_encode_is_allowed_only_for_bytes(asm: ModuleType) -> None:
    as_bytes = asm.g("_codecs", "encode") + asm.x("ab") + asm.x("latin1") + asm.TUPLE2
    assert scan_bytes(asm.P2 + as_bytes + asm.REDUCE + asm.STOP).verdict == Verdict.UNSAFE_FORMAT
    other = asm.g("_codecs", "encode") + asm.x("ab") + asm.x("hex") + asm.TUPLE2
    assert scan_bytes(asm.P2 + other + asm.REDUCE + asm.STOP).verdict == Verdict.MALICIOUS


def test_extension_registry_imports_are_malicious(asm: ModuleType) -> None:
    assert any(
        "extension registry" in m for m in critical_messages(asm.P2 + b"\x82\x07" + asm.STOP)
    )


def test_joblib_arrays_are_skipped_and_the_rest_analysed() -> None:
    import joblib

    buffer = io.BytesIO()
    joblib.dump({"w": np.arange(1000.0), "o": np.array([1, "x"], dtype=object)}, buffer)
    report = scan_bytes(buffer.getvalue())
    assert (report.format, report.verdict) == ("joblib", Verdict.UNSAFE_FORMAT)


def test_joblib_array_running_past_the_end_is_an_error() -> None:
    import joblib

    buffer = io.BytesIO()
    joblib.dump({"w": np.arange(1000.0)}, buffer)
    report = scan_bytes(buffer.getvalue()[:-100])
    assert report.verdict == Verdict.ERROR


def test_torch_zip_checks_storages_against_the_archive(asm: ModuleType) -> None:
    small = {"archive/data.pkl": asm.torch_state_dict(), "archive/data/0": b"\x00" * 8}
    report = scan_bytes(asm.zip_bytes(small))
    assert (report.format, report.verdict) == ("pytorch-zip", Verdict.ERROR)
    assert any("smaller than the tensor data" in f.message for f in report.findings)


def test_torch_backward_hooks_are_malicious_even_with_allowlisted_callables(
    asm: ModuleType,
) -> None:
    hooks = asm.ordered_dict() + asm.k(0) + asm.g("collections", "OrderedDict") + asm.SETITEM
    members = {
        "archive/data.pkl": asm.torch_state_dict(hooks=hooks),
        "archive/data/0": b"\x00" * 16,
    }
    report = scan_bytes(asm.zip_bytes(members))
    assert report.verdict == Verdict.MALICIOUS
    assert any("backward hooks" in f.message for f in report.findings)


def test_text_that_looks_like_a_word_list_is_not_a_pickle(asm: ModuleType) -> None:
    words = b"cat\ndog\nbird\nbear\n"
    report = scan_bytes(asm.zip_bytes({"vocab.txt": words}))
    assert report.verdict == Verdict.SAFE


def test_protocol_0_payload_inside_an_archive_is_found(asm: ModuleType) -> None:
    report = scan_bytes(asm.zip_bytes({"notes.txt": asm.os_system_p0()}))
    assert report.verdict == Verdict.MALICIOUS


def test_torch_zip_member_no_pickle_names_is_scanned_by_content(asm: ModuleType) -> None:
    members = {
        "archive/data.pkl": asm.torch_state_dict(),
        "archive/data/0": b"\x00" * 16,
        "archive/data/1": asm.os_system_p0(),  # not a storage any pickle names
    }
    report = scan_bytes(asm.zip_bytes(members))
    assert report.verdict == Verdict.MALICIOUS


def test_huge_integer_arguments_are_described_without_converting_them(asm: ModuleType) -> None:
    huge = b"\x8b" + (100_000).to_bytes(4, "little") + b"\x01" * 100_000  # LONG4
    data = asm.P2 + asm.g("os", "getpid") + huge + asm.TUPLE1 + asm.REDUCE + asm.STOP
    assert any("-bit integer>" in m for m in critical_messages(data))


# -- constructors of well-known ML libraries ----------------------------------------------------


def test_scikit_learn_pipeline_is_refused_by_format_not_called_malicious() -> None:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    features = np.arange(40.0).reshape(10, 4)
    model = make_pipeline(StandardScaler(), LogisticRegression()).fit(features, [0, 1] * 5)
    report = scan_bytes(pickle.dumps(model))
    assert report.verdict == Verdict.UNSAFE_FORMAT
    notes = [f.message for f in report.findings if f.severity is Severity.INFO]
    assert any("constructors of scikit-learn" in m for m in notes)


@pytest.mark.parametrize(
    ("module", "name"),
    [
        ("numpy.lib._npyio_impl", "NpzFile"),  # opens a file by name
        ("numpy", "memmap"),
        ("pandas.io.parsers.readers", "TextFileReader"),
        ("sklearn.datasets", "fetch_openml"),  # downloads
        ("scipy._lib._ccallback", "LowLevelCallable"),  # native function pointers
        ("torch.fx.graph_module", "reduce_graph_module"),  # runs the module's Python code
        ("xgboost", "DMatrix"),  # reads a data file
    ],
)
def test_dangerous_parts_of_ml_libraries_stay_malicious(
    asm: ModuleType, module: str, name: str
) -> None:
    data = asm.P2 + asm.g(module, name) + asm.x("/etc/passwd") + asm.TUPLE1 + asm.REDUCE
    assert scan_bytes(data + asm.STOP).verdict == Verdict.MALICIOUS


def test_ml_library_function_may_be_referenced_but_not_called(asm: ModuleType) -> None:
    referenced = asm.P2 + asm.EMPTY_DICT + asm.x("func") + asm.g("numpy", "log1p") + asm.SETITEM
    assert scan_bytes(referenced + asm.STOP).verdict == Verdict.UNSAFE_FORMAT
    called = asm.P2 + asm.g("numpy", "vectorize") + asm.g("numpy", "log1p") + asm.TUPLE1
    messages = critical_messages(called + asm.REDUCE + asm.STOP)
    assert any("is a function, not a class" in m for m in messages)


def test_ml_class_given_a_function_to_its_constructor_is_malicious(asm: ModuleType) -> None:
    # LinearOperator(matvec=...) calls matvec while it is made: a gadget for any function.
    target = asm.g("scipy.sparse.linalg._interface", "LinearOperator")
    data = asm.P2 + target + asm.g("numpy", "log1p") + asm.TUPLE1 + asm.REDUCE + asm.STOP
    assert any("is passed the function numpy.log1p" in m for m in critical_messages(data))


def test_booster_called_with_a_path_is_malicious_but_rebuilt_from_state_is_not(
    asm: ModuleType,
) -> None:
    booster = asm.g("xgboost.core", "Booster")
    called = asm.P2 + booster + asm.EMPTY_DICT + asm.x("/tmp/model") + asm.TUPLE2 + asm.REDUCE
    assert scan_bytes(called + asm.STOP).verdict == Verdict.MALICIOUS
    state = asm.EMPTY_DICT + asm.x("handle") + asm.cb(b"raw model") + asm.SETITEM
    rebuilt = asm.P2 + booster + asm.EMPTY_TUPLE + asm.NEWOBJ + state + asm.BUILD
    assert scan_bytes(rebuilt + asm.STOP).verdict == Verdict.UNSAFE_FORMAT


def test_reconstructor_arguments_are_checked(asm: ModuleType) -> None:
    # Cython's __pyx_unpickle_<Class> must be given a class of its own library.
    unpickle = asm.g("sklearn.tree._tree", "__pyx_unpickle_Tree")
    wrong = asm.g("os", "system") + asm.k(1) + asm.EMPTY_DICT + asm.TUPLE3
    assert scan_bytes(asm.P2 + unpickle + wrong + asm.REDUCE + asm.STOP).verdict == (
        Verdict.MALICIOUS
    )
    right = asm.g("sklearn.tree._tree", "Tree") + asm.k(1) + asm.EMPTY_DICT + asm.TUPLE3
    assert scan_bytes(asm.P2 + unpickle + right + asm.REDUCE + asm.STOP).verdict == (
        Verdict.UNSAFE_FORMAT
    )


@pytest.mark.parametrize("protocol", [0, 1])
def test_text_pickles_are_pickles_not_text(protocol: int) -> None:
    report = scan_bytes(pickle.dumps({"weights": [0.5, 1.5], "name": "m"}, protocol=protocol))
    assert (report.format, report.verdict) == ("pickle", Verdict.UNSAFE_FORMAT)
    large = pickle.dumps([float(i) for i in range(20_000)], protocol=protocol)
    assert len(large) > 64 * 1024  # longer than what format detection looks at
    assert scan_bytes(large).format == "pickle"


def test_range_filled_into_a_container_is_bounded(asm: ModuleType) -> None:
    # set(range(2**40)): each call is allowlisted, together they allocate a terabyte.
    huge = b"\x8a\x06" + (2**40).to_bytes(6, "little")  # LONG1
    inner = asm.g("builtins", "range") + huge + asm.TUPLE1 + asm.REDUCE
    data = asm.P2 + asm.g("builtins", "set") + inner + asm.TUPLE1 + asm.REDUCE + asm.STOP
    assert any("allocation bomb" in m for m in critical_messages(data))
