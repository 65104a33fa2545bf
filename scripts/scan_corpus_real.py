"""The benign half of the scanner's corpus: files written by the real libraries, every format.

``make_scan_corpus.build`` calls :func:`build_real`. Every file here is what a user of
scikit-learn, joblib, NumPy, pandas, SciPy, PyTorch, safetensors, ONNX, skops, Keras, GGUF,
XGBoost or LightGBM gets from the library's own save function, so none of them may be called
malicious: pickle-based ones are ``unsafe-format`` (refused by format, with conversion advice),
the rest ``safe``. Nothing is loaded back.
"""

from __future__ import annotations

import collections
import datetime
import decimal
import functools
import io
import os
import pickle
import tarfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np

U, S = "unsafe-format", "safe"


class Corpus(Protocol):
    def add(self, name: str, verdict: str, data: bytes) -> None: ...


@functools.cache
def _estimators() -> dict[str, Any]:
    import lightgbm
    import pandas as pd
    import scipy.sparse as sp
    import xgboost
    from sklearn.cluster import KMeans
    from sklearn.compose import ColumnTransformer
    from sklearn.datasets import load_iris
    from sklearn.decomposition import PCA
    from sklearn.ensemble import (
        GradientBoostingClassifier,
        HistGradientBoostingClassifier,
        RandomForestClassifier,
    )
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import FunctionTransformer, StandardScaler
    from sklearn.svm import SVC

    features, labels = load_iris(return_X_y=True)
    random_state = np.random.RandomState(0)
    return {
        "pipeline": make_pipeline(StandardScaler(), LogisticRegression(max_iter=300)).fit(
            features, labels
        ),
        "random-forest": RandomForestClassifier(n_estimators=3, random_state=random_state).fit(
            features, labels
        ),
        "gradient-boosting": GradientBoostingClassifier(n_estimators=3).fit(features, labels),
        "hist-gradient-boosting": HistGradientBoostingClassifier(max_iter=3).fit(features, labels),
        "kd-tree-neighbors": KNeighborsClassifier(algorithm="kd_tree").fit(features, labels),
        "svc": SVC().fit(features, labels),
        "kmeans": KMeans(n_clusters=3, n_init=1, random_state=0).fit(features),
        "pca": PCA(2).fit(features),
        "tfidf": TfidfVectorizer().fit(["alpha beta gamma", "beta gamma delta"]),
        "log1p-transformer": FunctionTransformer(np.log1p).fit(features),
        "column-transformer": ColumnTransformer([("s", StandardScaler(), [0, 1])]).fit(features),
        "pandas-frame": pd.DataFrame({"a": [1, 2], "when": pd.date_range("2024-01-01", periods=2)}),
        "scipy-csr": sp.csr_matrix(np.eye(3)),
        "numpy-generator": np.random.default_rng(0),
        "masked-array": np.ma.masked_array([1, 2, 3], mask=[0, 1, 0]),
        "xgboost-classifier": xgboost.XGBClassifier(n_estimators=2, max_depth=2).fit(
            features, labels
        ),
        "lightgbm-classifier": lightgbm.LGBMClassifier(n_estimators=2, verbose=-1).fit(
            features, labels
        ),
    }


def _containers() -> dict[str, object]:
    return {
        "list": [1, 2.5, "three", None, True],
        "tuple": (1, (2, 3)),
        "set": {1, 2},
        "frozenset": frozenset({"a"}),
        "bytes": b"\x00\x01",
        "bytearray": bytearray(b"xy"),
        "complex": 1 + 2j,
        "ordered": collections.OrderedDict(a=1),
        "default": collections.defaultdict(list, {"k": [1]}),
        "counter": collections.Counter("abca"),
        "deque": collections.deque([1, 2]),
        "when": datetime.datetime(2024, 1, 2, 3, 4, 5, tzinfo=datetime.UTC),
        "delta": datetime.timedelta(days=3),
        "price": decimal.Decimal("1.50"),
        "range": range(10),
        "matrix": np.matrix([[1.0, 2.0]]),
        "records": np.rec.array([(1, 2.0)], dtype=[("a", "i4"), ("b", "f8")]),
        "chars": np.char.array(["a", "bc"]),
    }


def pickles(c: Corpus) -> None:
    """scikit-learn estimators and friends with pickle, every protocol; plain containers."""
    estimators = _estimators()
    for protocol in range(6):
        c.add(
            f"pickle/real-pipeline-p{protocol}.pkl",
            U,
            pickle.dumps(estimators["pipeline"], protocol),
        )
        c.add(f"pickle/real-containers-p{protocol}.pkl", U, pickle.dumps(_containers(), protocol))
    for index, (name, value) in enumerate(sorted(estimators.items())):
        protocol = index % 6
        c.add(f"pickle/real-{name}-p{protocol}.pkl", U, pickle.dumps(value, protocol))


def joblib_files(c: Corpus) -> None:
    """joblib with each of its compressors, and its default compression."""
    import joblib

    estimators = _estimators()
    for method in (None, "zlib", "gzip", "bz2", "lzma", "xz"):
        buffer = io.BytesIO()
        joblib.dump(estimators["random-forest"], buffer, compress=(method, 3) if method else 0)
        c.add(f"joblib/real-random-forest-{method or 'plain'}.joblib", U, buffer.getvalue())
    buffer = io.BytesIO()
    joblib.dump(estimators["column-transformer"], buffer, compress=3)
    c.add("joblib/real-column-transformer-compress3.joblib", U, buffer.getvalue())


def torch_files(c: Corpus, tmp: Path) -> None:
    """torch.save: a state dict, a whole module, the legacy (non-zip) format."""
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    path = tmp / "torch.pt"
    for name, value, kwargs in (
        ("state-dict", model.state_dict(), {}),
        ("whole-module", model, {}),
        ("tensors-int-bool", {"i": torch.arange(5), "b": torch.ones(3, dtype=torch.bool)}, {}),
        ("legacy-state-dict", model.state_dict(), {"_use_new_zipfile_serialization": False}),
    ):
        torch.save(value, path, **kwargs)
        c.add(f"torch/real-{name}.pt", U, path.read_bytes())


def numpy_files(c: Corpus) -> None:
    arrays: dict[str, np.ndarray] = {
        "float32": np.arange(12, dtype=np.float32).reshape(3, 4),
        "int64": np.arange(5, dtype=np.int64),
        "bool": np.array([True, False]),
        "complex": np.array([1 + 1j], dtype=np.complex64),
        "fortran": np.asfortranarray(np.ones((2, 3))),
        "structured": np.array([(1, 2.0)], dtype=[("a", "i4"), ("b", "f8")]),
        "zeros-large": np.zeros(1 << 18, dtype=np.float32),
    }
    for name, array in arrays.items():
        buffer = io.BytesIO()
        np.save(buffer, array)
        c.add(f"numpy/real-{name}.npy", S, buffer.getvalue())
    for name, save in (("savez", np.savez), ("savez-compressed", np.savez_compressed)):
        buffer = io.BytesIO()
        save(buffer, weights=arrays["float32"], bias=arrays["int64"])
        c.add(f"numpy/real-{name}.npz", S, buffer.getvalue())


def safetensors_files(c: Corpus) -> None:
    from safetensors.numpy import save

    c.add(
        "safetensors/real-dtypes.safetensors",
        S,
        save(
            {
                "f32": np.ones((2, 2), dtype=np.float32),
                "f16": np.ones(3, dtype=np.float16),
                "i64": np.arange(4),
                "u8": np.zeros(8, dtype=np.uint8),
            }
        ),
    )
    c.add(
        "safetensors/real-metadata.safetensors",
        S,
        save({"w": np.zeros((16, 16), dtype=np.float32)}, metadata={"format": "pt"}),
    )


def onnx_files(c: Corpus) -> bytes:
    from skl2onnx import to_onnx

    estimators = _estimators()
    features = np.zeros((1, 4), dtype=np.float32)
    first = b""
    for name in ("pipeline", "random-forest"):
        model = to_onnx(estimators[name], features, target_opset=17)
        data = model.SerializeToString()
        first = first or data
        c.add(f"onnx/real-skl2onnx-{name}.onnx", S, data)
    return first


def skops_files(c: Corpus) -> None:
    import skops.io as sio

    estimators = _estimators()
    for name in ("pipeline", "random-forest", "kd-tree-neighbors"):
        c.add(f"skops/real-{name}.skops", S, sio.dumps(estimators[name]))


def keras_files(c: Corpus, tmp: Path) -> None:
    os.environ.setdefault("KERAS_BACKEND", "torch")
    import keras

    model = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(8, activation="relu"), keras.layers.Dense(3)]
    )
    for suffix in ("keras", "h5"):
        path = tmp / f"model.{suffix}"
        model.save(path)
        c.add(f"keras/real-sequential.{suffix}", S, path.read_bytes())
    model.save_weights(tmp / "model.weights.h5")
    c.add("keras/real-weights.weights.h5", S, (tmp / "model.weights.h5").read_bytes())


def gguf_files(c: Corpus, tmp: Path) -> None:
    import gguf

    path = tmp / "real.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_context_length(128)
    writer.add_float32("llama.rope.freq_base", 10000.0)
    writer.add_array("tokenizer.ggml.tokens", ["<s>", "</s>", "a", "b"])
    writer.add_tensor("tok_embd.weight", np.ones((4, 32), dtype=np.float32))
    writer.add_tensor("output.weight", np.ones((4, 32), dtype=np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    c.add("gguf/real-llama-f32-f16.gguf", S, path.read_bytes())


def tree_files(c: Corpus) -> None:
    import lightgbm
    import xgboost
    from sklearn.datasets import load_diabetes, load_iris

    features, labels = load_iris(return_X_y=True)
    regression = load_diabetes(return_X_y=True)
    classifier = xgboost.XGBClassifier(n_estimators=2, max_depth=2).fit(features, labels)
    regressor = xgboost.XGBRegressor(n_estimators=2, max_depth=2).fit(*regression)
    for name, model in (("classifier", classifier), ("regressor", regressor)):
        booster = model.get_booster()
        c.add(f"xgboost/real-{name}.json", S, bytes(booster.save_raw("json")))
        c.add(f"xgboost/real-{name}.ubj", S, bytes(booster.save_raw("ubj")))
    for name, estimator, data in (
        ("classifier", lightgbm.LGBMClassifier, (features, labels)),
        ("regressor", lightgbm.LGBMRegressor, regression),
    ):
        fitted = estimator(n_estimators=2, verbose=-1).fit(*data)
        c.add(f"lightgbm/real-{name}.txt", S, fitted.booster_.model_to_string().encode())


def archives(c: Corpus, members: dict[str, bytes], pickled: bytes) -> None:
    """Archives of the files above, in every container the scanner opens."""
    import py7zr

    def tar(mode: str) -> bytes:
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode=mode) as archive:  # type: ignore[call-overload]
            for name, data in members.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
        return buffer.getvalue()

    for suffix, mode in (
        ("tar", "w"),
        ("tar.gz", "w:gz"),
        ("tar.bz2", "w:bz2"),
        ("tar.xz", "w:xz"),
    ):
        c.add(f"archive/real-models.{suffix}", S, tar(mode))
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    c.add("archive/real-models.zip", S, buffer.getvalue())
    buffer = io.BytesIO()
    with py7zr.SevenZipFile(buffer, "w") as seven:
        for name, data in members.items():
            seven.writestr(data, name)
    c.add("archive/real-models.7z", S, buffer.getvalue())
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("model.joblib", pickled)
    c.add("archive/real-joblib-in.zip", U, buffer.getvalue())


def build_real(c: Corpus, tmp: Path) -> None:
    """Add every real-library file to ``c``; ``tmp`` is a scratch directory."""
    from safetensors.numpy import save

    steps: list[Callable[[], object]] = [
        lambda: pickles(c),
        lambda: joblib_files(c),
        lambda: torch_files(c, tmp),
        lambda: numpy_files(c),
        lambda: safetensors_files(c),
        lambda: skops_files(c),
        lambda: keras_files(c, tmp),
        lambda: gguf_files(c, tmp),
        lambda: tree_files(c),
    ]
    for step in steps:
        step()
    onnx_data = onnx_files(c)
    import joblib

    buffer = io.BytesIO()
    joblib.dump(_estimators()["pipeline"], buffer, compress=("gzip", 3))
    members = {
        "model.onnx": onnx_data,
        "weights/model.safetensors": save({"w": np.ones(4, dtype=np.float32)}),
        "README.md": b"# A model\n",
    }
    archives(c, members, buffer.getvalue())
