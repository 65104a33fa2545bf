# modelkeep: every target creates the virtual environment it needs.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
# Command-line tools whose pins clash with the project's, each in its own venv (scripts/tools/).
CHECKOV       := .venv-tools/checkov
CHECKOV_STAMP := $(CHECKOV)/.installed-stamp

.PHONY: venv tools system-deps image test-deploy demo test test-unit lint bench bench-scan bench-extraction bench-overload bench-storage bench-privacy cluster-demo clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

## checkov (tests/deploy runs it as a command) pins an old cyclonedx-python-lib: its own venv.
$(CHECKOV_STAMP): scripts/tools/checkov.txt scripts/tools/checkov-constraints.txt
	rm -rf $(CHECKOV)
	$(PYTHON) -m venv $(CHECKOV)
	$(CHECKOV)/bin/python -m pip install -q --upgrade pip
	$(CHECKOV)/bin/python -m pip install -q -c scripts/tools/checkov-constraints.txt -r scripts/tools/checkov.txt
	touch $@

tools: $(CHECKOV_STAMP)

## Debian packages the tests need (scripts/debian-packages.txt); installs only what is missing.
system-deps:
	bash scripts/system-deps.sh

## The container image, built offline (Debian base by mmdebstrap, host-built wheels, podman);
## prints its id and size. IMAGE=... names it (default localhost/modelkeep:dev).
image: $(STAMP) system-deps
	bash scripts/build-image.sh

## The image and chart tests alone: hadolint, helm, kubernetes-validate, checkov, podman.
test-deploy: $(STAMP) $(CHECKOV_STAMP) system-deps
	$(BIN)/python -m pytest tests/deploy

## Run a server on a fresh demo data dir with a signed sample model; prints a working request.
demo: $(STAMP)
	$(BIN)/python scripts/demo.py

## Three replicas behind HAProxy on PostgreSQL, Redis, S3 (SeaweedFS) and OpenBao; a signed push.
cluster-demo: $(STAMP) system-deps
	$(BIN)/python scripts/cluster.py

## The whole test suite: unit and integration (needs PostgreSQL at 127.0.0.1:5432), in
## TEST_WORKERS processes (pytest-xdist), each test file in one of them; then, alone, the
## tests that assert timing or memory under load (marked `serial`).
TEST_WORKERS ?= 2
test: $(STAMP) $(CHECKOV_STAMP) system-deps
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile -m "not serial"
	$(BIN)/python -m pytest -m serial

test-unit: $(STAMP)
	$(BIN)/python -m pytest tests/unit

lint: $(STAMP)
	$(BIN)/ruff check src tests bench scripts
	$(BIN)/ruff format --check src tests bench scripts
	$(BIN)/mypy

## Throughput and latency of the full path against a bare ONNX Runtime endpoint.
bench: $(STAMP)
	$(BIN)/python bench/bench_infer.py

## How long scanning a 1 GiB safetensors file and a 1 GiB ONNX model takes.
bench-scan: $(STAMP)
	$(BIN)/python bench/bench_scan.py

## An extraction attack against a model with and without each hardening policy.
bench-extraction: $(STAMP)
	$(BIN)/python bench/bench_extraction.py

## Twice the sustainable rate, open loop: the p99 of admitted requests and the share shed.
bench-overload: $(STAMP)
	$(BIN)/python bench/bench_overload.py

## Loading a sealed 1 GiB model from SeaweedFS (S3) against a raw read of it; push peak RSS.
bench-storage: $(STAMP)
	$(BIN)/python bench/bench_storage.py

## A shadow-model membership attack (LiRA) through a real server, per output policy and defaults.
bench-privacy: $(STAMP)
	$(BIN)/python bench/bench_privacy.py

clean:
	rm -rf $(VENV) .venv-tools .demo .pytest_cache .mypy_cache .ruff_cache
