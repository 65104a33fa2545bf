"""Helpers for tests, shipped with the package: tiny model builders, sample rows, a service
over a fresh data directory and an in-process HTTP client for the app.

The scikit-learn and skl2onnx imports stay inside the functions: they are test-only
dependencies and importing this module must not need them.
"""

from __future__ import annotations

import asyncio
import random
import socket
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

if TYPE_CHECKING:
    from starlette.types import ASGIApp

    from modelkeep.service import Service

__all__ = [
    "LentTransport",
    "SyncAppTransport",
    "app_client",
    "build_custom_domain_onnx",
    "build_external_data_onnx",
    "build_flaky_onnx",
    "build_iris_onnx",
    "build_slow_onnx",
    "free_port",
    "free_ports",
    "iris_rows",
    "open_service",
]

# Pinned so the bytes do not change when a newer skl2onnx or onnx picks a newer default opset.
_IRIS_OPSETS = {"": 17, "ai.onnx.ml": 3}


def free_ports(count: int) -> list[int]:
    """``count`` distinct loopback ports, free when chosen, for a server a test starts.

    They come from below the kernel's ephemeral range on purpose. A port from ``bind(0)`` is an
    ephemeral one, from the pool every outgoing connection on the machine also draws from, so
    between choosing it and the child server binding it any ``connect()`` may take it: SeaweedFS's
    own parts, dialling each other while they start, took one of its eight ports that way in CI.
    A port below the range is only ever taken by a listener that asks for it by number. Each
    candidate is held bound until all are chosen, so the ports are distinct.
    """
    low = _ephemeral_low()
    held: list[socket.socket] = []
    try:
        while len(held) < count:
            sock = socket.socket()
            try:
                sock.bind(("127.0.0.1", random.randrange(10_000, low)))
            except OSError:  # in use: draw again
                sock.close()
                continue
            held.append(sock)
        return [int(sock.getsockname()[1]) for sock in held]
    finally:
        for sock in held:
            sock.close()


def free_port() -> int:
    """One loopback port, free when chosen (see ``free_ports``)."""
    return free_ports(1)[0]


def _ephemeral_low() -> int:
    """The first port of the kernel's ephemeral range (Linux; 32768 where it cannot be read)."""
    try:
        text = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text()
        return max(int(text.split()[0]), 10_001)
    except (OSError, ValueError, IndexError):
        return 32768


def build_iris_onnx(*, seed: int = 0) -> bytes:
    """A logistic-regression classifier trained on iris, as ONNX bytes, identical per seed.

    Each seed trains on its own stratified 90% of the rows, so different seeds give different
    bytes (distinct versions) and models that all classify iris well. Input ``input`` FP32
    ``[-1, 4]``; outputs ``label`` INT64 ``[-1]`` and ``probabilities`` FP32 ``[-1, 3]``
    (converted without ZipMap, so every output is a tensor).
    """
    import numpy as np
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import (
        FloatTensorType,
        Int64TensorType,
    )
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression

    iris = load_iris()
    rng = np.random.default_rng(seed)
    rows = np.sort(
        np.concatenate(
            [rng.choice(np.flatnonzero(iris.target == k), 45, replace=False) for k in range(3)]
        )
    )
    classifier = LogisticRegression(max_iter=1000)
    classifier.fit(iris.data[rows], iris.target[rows])
    model: Any = convert_sklearn(
        classifier,
        name="iris",
        initial_types=[("input", FloatTensorType([None, 4]))],
        final_types=[
            ("label", Int64TensorType([None])),
            ("probabilities", FloatTensorType([None, 3])),
        ],
        options={id(classifier): {"zipmap": False}},
        target_opset=_IRIS_OPSETS,
    )
    # Drop what varies between runs and installs but says nothing about the model; skl2onnx
    # collects opset imports in a set, so their order follows the process's hash seed.
    imports = sorted((opset.domain, opset.version) for opset in model.opset_import)
    del model.opset_import[:]
    for domain, version in imports:
        model.opset_import.add(domain=domain, version=version)
    model.producer_version = ""
    model.doc_string = ""
    model.graph.doc_string = ""
    return bytes(model.SerializeToString(deterministic=True))


def iris_rows(n: int = 5) -> list[list[float]]:
    """``n`` real iris measurement rows, deterministic; from ``n = 4`` on all species appear.

    Rows are taken with a stride coprime with 150, so the first 150 are the whole dataset,
    each row once; larger ``n`` wraps around.
    """
    from sklearn.datasets import load_iris

    data = load_iris().data
    return [[float(value) for value in data[(i * 37) % len(data)]] for i in range(n)]


def build_custom_domain_onnx() -> bytes:
    """A tiny model whose only node is in the custom domain ``com.example`` (never runnable)."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Secret", ["x"], ["y"], domain="com.example")],
        "custom_domain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)],
    )
    return bytes(model.SerializeToString(deterministic=True))


def build_external_data_onnx() -> bytes:
    """A tiny ``y = x + w`` model whose initializer ``w`` claims to live in an external file."""
    from onnx import TensorProto, helper

    weight = helper.make_tensor("w", TensorProto.FLOAT, [1], [0.0])
    weight.ClearField("float_data")
    weight.data_location = TensorProto.EXTERNAL
    for key, value in (("location", "weights.bin"), ("offset", "0"), ("length", "4")):
        entry = weight.external_data.add()
        entry.key, entry.value = key, value
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["y"])],
        "external_data",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
        initializer=[weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return bytes(model.SerializeToString(deterministic=True))


def build_flaky_onnx() -> bytes:
    """An iris-shaped model that fails on part of its inputs, for canary tests.

    Same signature as ``build_iris_onnx`` (``input`` FP32 ``[-1, 4]``; ``label`` INT64 ``[-1]``,
    ``probabilities`` FP32 ``[-1, 3]``). It looks its answer up in a five-row table by the
    petal length (third feature) cast to an integer, so ONNX Runtime refuses the call when a
    row's petal length is 5 or more (an index out of range): about 28% of iris rows, always the
    same ones. Other rows get a one-hot answer: setosa below 2, versicolor from 2 to 5.
    """
    from onnx import TensorProto, helper

    table = helper.make_tensor(
        "table",
        TensorProto.FLOAT,
        [5, 3],
        [1, 0, 0, 1, 0, 0, 0, 1, 0, 0, 1, 0, 0, 1, 0],
    )
    start = helper.make_tensor("start", TensorProto.INT64, [1], [2])
    end = helper.make_tensor("end", TensorProto.INT64, [1], [3])
    axes = helper.make_tensor("axes", TensorProto.INT64, [1], [1])
    shape = helper.make_tensor("shape", TensorProto.INT64, [2], [-1, 3])
    nodes = [
        helper.make_node("Slice", ["input", "start", "end", "axes"], ["petal"]),
        helper.make_node("Cast", ["petal"], ["index"], to=TensorProto.INT64),
        helper.make_node("Gather", ["table", "index"], ["rows"], axis=0),
        helper.make_node("Reshape", ["rows", "shape"], ["probabilities"]),
        helper.make_node("ArgMax", ["probabilities"], ["label"], axis=1, keepdims=0),
    ]
    graph = helper.make_graph(
        nodes,
        "flaky",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [None, 4])],
        [
            helper.make_tensor_value_info("label", TensorProto.INT64, [None]),
            helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [None, 3]),
        ],
        initializer=[table, start, end, axes, shape],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return bytes(model.SerializeToString(deterministic=True))


def build_slow_onnx(width: int = 1024) -> bytes:
    """A model that takes milliseconds a call: ``input`` FP32 ``[N, 4]`` -> MatMul (4 x W) ->
    MatMul (W x W) -> MatMul (W x 3) -> ``scores`` FP32 ``[N, 3]``, weights fixed by a seed.

    For overload tests and benches: with a few hundred rows a request, the model, not HTTP, is
    what runs out.
    """
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weights = [
        numpy_helper.from_array(rng.standard_normal(shape, dtype=np.float32) / 32, name)
        for name, shape in (("w1", (4, width)), ("w2", (width, width)), ("w3", (width, 3)))
    ]
    nodes = [
        helper.make_node("MatMul", ["input", "w1"], ["h1"]),
        helper.make_node("MatMul", ["h1", "w2"], ["h2"]),
        helper.make_node("MatMul", ["h2", "w3"], ["scores"]),
    ]
    graph = helper.make_graph(
        nodes,
        "slow",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [None, 4])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, [None, 3])],
        weights,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return bytes(model.SerializeToString())


def build_big_onnx(nbytes: int, *, seed: int = 7) -> bytes:
    """A model of about ``nbytes``: ``y = input + sum(w)`` with ``w`` ``nbytes`` of random FP32.

    Same input and output shapes as the iris model (FP32 ``[N, 4]``); for tests of large pushes
    and loads (memory, crashes, retries). Random weights do not compress.
    """
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    weights = np.random.default_rng(seed).random(nbytes // 4, dtype=np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("ReduceSum", ["w"], ["s"], keepdims=0),
            helper.make_node("Add", ["input", "s"], ["y"]),
        ],
        "big",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [None, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4])],
        initializer=[numpy_helper.from_array(weights, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    return bytes(model.SerializeToString())


def build_dense_onnx(nbytes: int, *, layer_bytes: int = 64 << 20, seed: int = 7) -> bytes:
    """A chain of MatMuls over square FP32 weights of ``layer_bytes`` each, ``nbytes`` in all.

    Input ``x`` and output ``y`` are FP32 ``[N, side]``. Dense weights are what ONNX Runtime
    pre-packs at load, as it does for most large models; random weights do not compress.
    """
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    side = int((layer_bytes // 4) ** 0.5)
    count = max(1, nbytes // (side * side * 4))
    rng = np.random.default_rng(seed)
    weights = [
        numpy_helper.from_array(
            ((rng.random((side, side), dtype=np.float32) - 0.5) / side).astype(np.float32),
            f"w{index}",
        )
        for index in range(count)
    ]
    nodes = [
        helper.make_node(
            "MatMul", ["x" if index == 0 else f"h{index}", f"w{index}"], [f"h{index + 1}"]
        )
        for index in range(count)
    ]
    nodes.append(helper.make_node("Identity", [f"h{count}"], ["y"]))
    graph = helper.make_graph(
        nodes,
        "dense",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, side])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, side])],
        initializer=weights,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return bytes(model.SerializeToString())


def open_service(data_dir: Path, **settings: Any) -> tuple[Service, str]:
    """``modelkeep init`` in ``data_dir`` (which must not exist yet), then ``Service.open``
    with ``settings`` (``Settings`` fields, e.g. ``max_queue=4``): the service and the admin
    key. Unit tests use SQLite in ``data_dir``: no PostgreSQL needed. Stop the service after.
    """
    from modelkeep.bootstrap import init_data_dir
    from modelkeep.service import Service
    from modelkeep.settings import Settings

    init = init_data_dir(data_dir)
    return Service.open(Settings(data_dir=data_dir, **settings)), init.admin_key


def app_client(
    app: ASGIApp, key: str | None = None, *, client_host: str = "127.0.0.1"
) -> httpx.AsyncClient:
    """An httpx client that calls ``app`` in this process (no socket, no TLS), sending
    ``Authorization: Bearer key`` when a key is given. Use it as ``async with``.

    The app's lifespan does not run: build it with ``create_app(service,
    manage_lifecycle=False)`` and stop the service yourself.
    """
    transport = httpx.ASGITransport(app=app, client=(client_host, 50000))
    headers = {} if key is None else {"Authorization": f"Bearer {key}"}
    return httpx.AsyncClient(transport=transport, base_url="http://modelkeep.test", headers=headers)


class SyncAppTransport(httpx.BaseTransport):
    """A synchronous httpx transport into an ASGI app run on its own event loop thread, so
    that synchronous callers (the command line's client, plain tests) can call the app in this
    process: ``httpx.Client(transport=SyncAppTransport(app))``. ``close()`` stops the loop.
    The app's lifespan does not run, as with ``app_client``."""

    def __init__(self, app: ASGIApp) -> None:
        self._inner = httpx.ASGITransport(app=app)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        body = request.read()

        async def call() -> tuple[int, list[tuple[bytes, bytes]], bytes]:
            inner = httpx.Request(
                request.method, request.url, headers=request.headers, content=body
            )
            response = await self._inner.handle_async_request(inner)
            return response.status_code, response.headers.raw, await response.aread()

        status, headers, content = asyncio.run_coroutine_threadsafe(call(), self._loop).result(60)
        return httpx.Response(status, headers=headers, content=content, request=request)

    def close(self) -> None:
        if self._loop.is_closed():
            return
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()


class LentTransport(httpx.BaseTransport):
    """Lends ``inner`` to a client that closes its transport when it is done (the command
    line does after each run): requests go through, ``close`` leaves ``inner`` open."""

    def __init__(self, inner: httpx.BaseTransport) -> None:
        self._inner = inner

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        return self._inner.handle_request(request)


def build_big_skops(nbytes: int, *, seed: int = 7) -> bytes:
    """A skops file of about ``nbytes``: a brute-force k-nearest-neighbours regressor over
    ``nbytes`` of random FP64 training rows of 4 features (stored, as ``skops.io.dumps`` does).

    The worst case for a skops load: one array as large as the file, which skops reads out of
    the zip and then into the array. Random values do not compress.
    """
    import numpy as np
    import skops.io as sio
    from sklearn.neighbors import KNeighborsRegressor

    rng = np.random.default_rng(seed)
    rows = max(1, nbytes // 40)  # 32 bytes of features and 8 of target per row
    features = rng.random((rows, 4))
    model = KNeighborsRegressor(n_neighbors=1, algorithm="brute").fit(features, features[:, 0])
    return bytes(sio.dumps(model))


def build_big_xgboost(nbytes: int, *, fmt: str = "json", depth: int = 12, seed: int = 7) -> bytes:
    """An XGBoost regression model of about ``nbytes`` in its JSON (``fmt="json"``) or UBJSON
    (``fmt="ubj"``) format: one tree of ``depth`` grown on random rows, repeated.

    Training hundreds of deep trees would take minutes; the trees are copies of one trained
    tree, so the document is exactly what XGBoost writes for such a model.
    """
    import numpy as np
    import orjson
    import xgboost as xgb

    rng = np.random.default_rng(seed)
    rows = rng.random((1 << (depth + 3), 4))
    booster = xgb.train(
        {"max_depth": depth, "min_child_weight": 0, "nthread": 1, "lambda": 0},
        xgb.DMatrix(rows, label=rng.random(len(rows))),
        num_boost_round=1,
    )
    document = orjson.loads(bytes(booster.save_raw("json")))
    model = document["learner"]["gradient_booster"]["model"]
    (tree,) = model["trees"]
    tree_text = orjson.dumps(tree)
    # UBJSON stores the same trees in fewer bytes than JSON text: scale the count to match.
    scale = len(booster.save_raw("json")) / len(booster.save_raw("ubj")) if fmt == "ubj" else 1
    count = max(1, int(nbytes * scale) // len(tree_text))
    model["gbtree_model_param"]["num_trees"] = str(count)
    model["tree_info"] = [0] * count
    model["iteration_indptr"] = list(range(count + 1))
    model["trees"] = []
    head, tail = orjson.dumps(document).split(b'"trees":[]', 1)
    id_field = b'"id":%d' % tree["id"]
    trees = b",".join(tree_text.replace(id_field, b'"id":%d' % index) for index in range(count))
    text = head + b'"trees":[' + trees + b"]" + tail
    if fmt == "json":
        return text
    big = xgb.Booster()
    big.load_model(bytearray(text))
    return bytes(big.save_raw("ubj"))


# XGBoost's own work in a fresh interpreter: the file read into the bytearray load_model takes,
# the peak reset to the resident size (writing 5 to clear_refs), then the load and the write-back
# the tree check reads.
_XGBOOST_LOAD = """
import sys
from pathlib import Path

import xgboost


def kib(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise SystemExit("no " + field)


data = bytearray(Path(sys.argv[1]).read_bytes())
Path("/proc/self/clear_refs").write_text("5")
before = kib("VmRSS")
booster = xgboost.Booster()
booster.load_model(data)
del data
written = booster.save_raw("ubj")
print((kib("VmHWM") - before) * 1024)
"""


def xgboost_load_growth(path: Path) -> int:
    """Bytes by which XGBoost's own work on the model file at ``path`` raises a fresh process's
    peak resident memory: ``Booster().load_model`` (of the file read into a bytearray first),
    then ``save_raw("ubj")``, the booster written back as the server's tree check reads it.

    XGBoost parses the whole file into a document before it builds the booster (about 12 times
    a JSON model's size), and writes the booster back through another (about its size again);
    no API avoids either. The check must read what XGBoost loaded, not what another parser
    reads of the file, so that no difference between the two parsers can hide a malformed
    tree: a push of that model cannot cost less.
    """
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", _XGBOOST_LOAD, str(path)], capture_output=True, text=True, check=True
    )
    return int(done.stdout)


def build_big_lightgbm(nbytes: int, *, leaves: int = 1024, seed: int = 7) -> bytes:
    """A LightGBM regression model of about ``nbytes`` in its text format: one tree of
    ``leaves`` leaves grown on random rows, repeated (training hundreds would take minutes).
    """
    import lightgbm as lgb
    import numpy as np

    rng = np.random.default_rng(seed)
    rows = rng.random((leaves * 8, 4))
    params = {"num_leaves": leaves, "min_data_in_leaf": 1, "verbose": -1, "num_threads": 1}
    booster = lgb.train(params, lgb.Dataset(rows, label=rng.random(len(rows))), 1)
    text = booster.model_to_string().encode()
    start = text.index(b"Tree=0\n")
    end = text.index(b"end of trees")
    tree = text[start:end]
    count = max(1, nbytes // len(tree))
    trees = b"".join(b"Tree=%d\n" % i + tree[len(b"Tree=0\n") :] for i in range(count))
    sizes = b" ".join(b"%d" % (len(tree) + len(str(i)) - 1) for i in range(count))
    head = text[:start]
    head_start = head.index(b"tree_sizes=")
    head_end = head.index(b"\n", head_start)
    head = head[:head_start] + b"tree_sizes=" + sizes + head[head_end:]
    return head + trees + text[end:]
