"""What is in the image: the app and its runtime, and none of what must not ship."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from tools import podman

# The first module to use the image builds it: from scratch that takes minutes.
pytestmark = [pytest.mark.integration, pytest.mark.timeout(1500)]

# A PEM private key block: the header followed by base64, not a mere mention of the header.
_PRIVATE_KEY = re.compile(rb"-----BEGIN [A-Z ]*PRIVATE KEY-----\r?\n[A-Za-z0-9+/=]{40,}")
_COMPILERS = {"gcc", "cc", "c++", "g++", "clang", "as", "ld", "cpp", "tcc", "rustc", "go"}


@pytest.fixture(scope="module")
def root(image: str) -> Iterator[Path]:
    """The image's filesystem, mounted read-only on the host (podman image mount, as root)."""
    path = Path(podman("image", "mount", image).stdout.strip())
    try:
        yield path
    finally:
        podman("image", "unmount", image, check=False)


@pytest.fixture(scope="module")
def files(root: Path) -> list[str]:
    return sorted("/" + str(p.relative_to(root)) for p in root.rglob("*") if not p.is_symlink())


def test_no_private_key(root: Path, files: list[str]) -> None:
    found = []
    for name in files:
        path = root / name.lstrip("/")
        small = path.is_file() and path.stat().st_size < 1_000_000 and not name.endswith(".so")
        if small and _PRIVATE_KEY.search(path.read_bytes()):
            found.append(name)
    assert found == []


def test_no_git_tests_or_test_data(files: list[str]) -> None:
    assert [f for f in files if ".git" in Path(f).parts] == []
    assert [
        f for f in files if re.search(r"/site-packages/.+/(tests?|SelfTest|test_data)/", f)
    ] == []
    # The project's own tree never reaches the image: only installed wheels do.
    assert [f for f in files if f.startswith(("/wheels", "/app", "/build", "/tests", "/src"))] == []


def test_no_compiler_and_no_installer(files: list[str]) -> None:
    binaries = {Path(f).name for f in files if "/bin/" in f}
    assert binaries & _COMPILERS == set()
    assert [b for b in binaries if b.startswith(("gcc", "pip", "x86_64-linux-gnu-"))] == []
    assert [
        f for f in files if "/site-packages/pip/" in f or "/site-packages/setuptools/" in f
    ] == []


def test_no_package_manager(files: list[str]) -> None:
    """The base is Debian's essential set: apt is not in it (dpkg is, being essential)."""
    binaries = {Path(f).name for f in files if f.startswith(("/usr/bin/", "/usr/sbin/"))}
    assert binaries & {"apt", "apt-get", "apt-cache", "apt-key", "gpgv", "useradd"} == set()
    assert [f for f in files if "/libapt-pkg" in f] == []


def test_no_sources_headers_stubs_or_unused_onnx_runtime_library(files: list[str]) -> None:
    """What only a compiler or a type checker reads is not shipped with the libraries, nor ONNX
    Runtime's C library, which its Python binding does not load."""
    site = [f for f in files if "/site-packages/" in f]
    libraries = [f for f in site if "/site-packages/modelkeep/" not in f]  # ours: as built
    build_only = (".pyi", ".pyx", ".pxd", ".pxi", ".c", ".cpp", ".h", ".hpp")
    assert [f for f in libraries if f.endswith(build_only)] == []
    assert [f for f in site if "/onnxruntime/capi/libonnxruntime.so" in f] == []
    # ... while the binding itself and the shared providers library are there.
    binding = [f for f in site if "/onnxruntime/capi/onnxruntime_pybind11_state" in f]
    assert len(binding) == 1


def test_no_package_caches(files: list[str]) -> None:
    assert [f for f in files if f.startswith(("/root/.cache", "/var/cache/apt/archives/"))] == [
        f for f in files if f == "/var/cache/apt/archives/partial"
    ]
    lists = [f for f in files if f.startswith("/var/lib/apt/lists/")]
    assert [f for f in lists if Path(f).name not in ("partial", "lock")] == []


def test_the_image_metadata(image: str) -> None:
    [info] = json.loads(podman("image", "inspect", image).stdout)
    config = info["Config"]
    assert config["User"] == "10001:10001"
    assert config["ExposedPorts"] == {"8443/tcp": {}}
    assert config["Entrypoint"][:2] == ["/usr/bin/tini", "--"]
    assert info["Healthcheck"]["Test"][0] == "CMD"
    labels = config["Labels"]
    for key in ("source", "version", "revision", "licenses"):
        assert labels[f"org.opencontainers.image.{key}"], key
    assert labels["org.opencontainers.image.licenses"] == "Apache-2.0"
    # Nothing secret in the environment the image brings.
    assert [e for e in config["Env"] if re.search(r"(?i)key|token|secret|password|url", e)] == []


def test_every_runtime_and_back_end_library_loads_in_the_image(image: str) -> None:
    """Each runtime the server can load a model with, and each back end's client, imports in the
    image: their shared libraries (stripped by scripts/build-image.sh) load, and the system
    libraries they need are there (LightGBM needs libgomp, which its wheel does not carry)."""
    modules = [
        "onnxruntime",
        "onnx",
        "xgboost",
        "lightgbm",
        "skops.io",
        "sklearn.ensemble",
        "scipy.spatial",
        "h5py",
        "safetensors",
        "cedarpy",
        "cryptography.hazmat.primitives.ciphers.aead",
        "psycopg",
        "uvloop",
        "Cryptodome.Cipher.AES",
    ]
    script = (
        f"import importlib; [importlib.import_module(m) for m in {modules!r}];"
        # ONNX Runtime runs a model without the C library the Dockerfile removes.
        "import numpy as np, onnxruntime as ort; from onnx import helper as h, TensorProto as T;"
        "v = lambda n: h.make_tensor_value_info(n, T.FLOAT, [2]);"
        "g = h.make_graph([h.make_node('Relu', ['x'], ['y'])], 'g', [v('x')], [v('y')]);"
        "m = h.make_model(g, opset_imports=[h.make_opsetid('', 17)]); m.ir_version = 8;"
        "s = ort.InferenceSession(m.SerializeToString(), providers=['CPUExecutionProvider']);"
        "assert s.run(None, {'x': np.array([-1, 2], dtype=np.float32)})[0].tolist() == [0, 2];"
        # Only the AWS API models modelkeep calls are kept (Dockerfile): S3 and KMS clients.
        "import boto3; [boto3.client(s, region_name='us-east-1') for s in ('s3', 'kms', 'sts')];"
        "print('loaded')"
    )
    run = podman(
        "run", "--rm", "--network=none", "--entrypoint", "/opt/modelkeep/bin/python", image,
        "-c", script,
    )  # fmt: skip
    assert run.stdout.strip().splitlines()[-1] == "loaded"


def test_every_modelkeep_module_imports_in_the_image(image: str) -> None:
    """Nothing modelkeep imports was among the files the Dockerfile removes (test suites,
    sources, stubs): each of its modules imports with the image's libraries."""
    script = (
        "import importlib, pkgutil, modelkeep;"
        "names = [m.name for m in pkgutil.walk_packages(modelkeep.__path__, 'modelkeep.')"
        " if '.migrations.' not in m.name];"  # env.py is alembic's script, run by alembic
        "[importlib.import_module(n) for n in names];"
        "print(len(names), 'imported')"
    )
    run = podman(
        "run", "--rm", "--network=none", "--entrypoint", "/opt/modelkeep/bin/python", image,
        "-c", script,
    )  # fmt: skip
    count, word = run.stdout.strip().splitlines()[-1].split()
    assert (word, int(count) > 100) == ("imported", True)
