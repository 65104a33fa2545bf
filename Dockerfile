# modelkeep server image. Build with `make image` (scripts/build-image.sh), which makes the
# wheels in build/wheels/ first and, offline, a local Debian base passed as BASE_IMAGE.
# docs/deploy.md says how to run it hardened.
# checkov:skip=CKV_DOCKER_7: the base is a build argument; make image passes a local tag
ARG BASE_IMAGE=python:3.11-slim-bookworm

# -- deps: a virtual environment from the host-built wheels, no network needed ------------
FROM ${BASE_IMAGE} AS deps
# --no-index: every wheel comes from the build context; pip's cache is not kept. Removed, as
# nothing at run time reads them:
# - pip and setuptools (nothing installs anything at run time);
# - the test suites and test data that libraries ship (scipy, numpy, onnx, ...; pycryptodome's
#   SelfTest holds private keys, securesystemslib's test_data ed25519 test vectors);
# - what only a compiler or a type checker reads: C and Cython sources and headers (numpy's
#   include/, sklearn's .pyx/.pxd) and type stubs (.pyi);
# - ONNX Runtime's C library libonnxruntime.so (34 MB), shipped for C programs: the Python
#   binding is linked on its own and never loads it (tests/deploy checks an ONNX inference);
# - botocore's API models of every AWS service but the ones modelkeep calls (S3, KMS, and
#   STS/SSO for the credential chain): 28 of its 33 MB.
COPY build/wheels/deps/ /wheels/deps/
RUN python3 -m venv /opt/modelkeep \
    && /opt/modelkeep/bin/pip install --quiet --no-index --no-cache-dir /wheels/deps/*.whl \
    && /opt/modelkeep/bin/pip uninstall --quiet --yes pip setuptools wheel \
    && find /opt/modelkeep/lib -depth -type d \
        \( -name tests -o -name test -o -name SelfTest -o -name test_data \) \
        -path '*/site-packages/*' -exec rm -rf {} + \
    && find /opt/modelkeep/lib/python3.11/site-packages -type f \
        \( -name '*.pyi' -o -name '*.pyx' -o -name '*.pxd' -o -name '*.pxi' -o -name '*.c' \
           -o -name '*.cpp' -o -name '*.h' -o -name '*.hpp' \) -delete \
    && rm /opt/modelkeep/lib/python3.11/site-packages/onnxruntime/capi/libonnxruntime.so.* \
    && find /opt/modelkeep/lib/python3.11/site-packages/botocore/data -mindepth 1 -maxdepth 1 \
        -type d ! -name s3 ! -name kms ! -name sts ! -name sso ! -name sso-oidc \
        -exec rm -rf {} +

# -- app: modelkeep's own wheel, in a stage of its own so that a code change reuses the layers
# above and below that hold the dependencies. ensurepip brings pip back from the base's bundled
# wheel, offline, for this stage only.
FROM deps AS app
COPY build/wheels/app/ /wheels/app/
RUN /opt/modelkeep/bin/python -m ensurepip --default-pip >/dev/null \
    && /opt/modelkeep/bin/pip install --quiet --no-index --no-cache-dir --no-deps /wheels/app/*.whl \
    && mkdir -p /app/site-packages /app/bin \
    && mv /opt/modelkeep/lib/python3.11/site-packages/modelkeep \
        /opt/modelkeep/lib/python3.11/site-packages/modelkeep-*.dist-info /app/site-packages/ \
    && mv /opt/modelkeep/bin/modelkeep /app/bin/

# -- runtime: the interpreter, the virtual environment and tini; nothing else --------------
FROM ${BASE_IMAGE}
# tini is PID 1: it forwards SIGTERM to modelkeep and reaps orphans. (Python as PID 1 would
# ignore SIGTERM until its handlers are installed, e.g. during a long migration, and reaps
# only its own children.) LightGBM needs the GNU OpenMP runtime, which its wheel does not
# carry. The offline Debian base already has both; other bases get them here.
# hadolint ignore=DL3008
RUN { command -v tini >/dev/null \
      && python3 -c "import ctypes.util, sys; sys.exit(not ctypes.util.find_library('gomp'))"; } \
    || { apt-get update && apt-get install -y --no-install-recommends tini libgomp1 \
         && rm -rf /var/lib/apt/lists/*; }

# A fixed non-root user and group (10001), so volume ownership and runAsUser can name it.
# Written directly: the minimal base has no useradd. /var/lib/modelkeep is the one place for
# a data volume; the root filesystem can be mounted read-only.
RUN echo "modelkeep:x:10001:10001:modelkeep:/nonexistent:/usr/sbin/nologin" >> /etc/passwd \
    && echo "modelkeep:x:10001:" >> /etc/group \
    && mkdir -p /var/lib/modelkeep \
    && chown 10001:10001 /var/lib/modelkeep \
    && chmod 0700 /var/lib/modelkeep

COPY --from=deps /opt/modelkeep /opt/modelkeep
COPY --from=app /app/site-packages/ /opt/modelkeep/lib/python3.11/site-packages/
COPY --from=app /app/bin/modelkeep /opt/modelkeep/bin/modelkeep

# Listen on every interface inside the container; the data directory is a subdirectory of the
# volume so that `modelkeep init` can create it atomically there. No .pyc is written at run
# time (the root filesystem is read-only; pip compiled them at build time).
ENV PATH=/opt/modelkeep/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    MODELKEEP_HOST=0.0.0.0 \
    MODELKEEP_PORT=8443 \
    MODELKEEP_DATA_DIR=/var/lib/modelkeep/data

USER 10001:10001
WORKDIR /var/lib/modelkeep
EXPOSE 8443

# Liveness only (the process answers); the certificate is not checked for this local probe. As a
# SageMaker container (MODELKEEP_SAGEMAKER, docs/protocols.md) it asks /ping where SageMaker
# does: SAGEMAKER_BIND_TO_PORT or 8080, over plain HTTP when that listener is plaintext.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["/opt/modelkeep/bin/python", "-c", "import os, ssl, urllib.request as r; on = lambda n: os.environ.get(n, '').lower() in ('1', 'true', 'yes', 'on'); sm = on('MODELKEEP_SAGEMAKER'); plain = sm and on('MODELKEEP_SAGEMAKER_UNSAFE_PLAINTEXT'); port = os.environ.get('SAGEMAKER_BIND_TO_PORT', '8080') if sm else os.environ.get('MODELKEEP_PORT', '8443'); c = ssl.create_default_context(); c.check_hostname = False; c.verify_mode = ssl.CERT_NONE; r.urlopen(('http' if plain else 'https') + '://127.0.0.1:' + port + ('/ping' if sm else '/v2/health/live'), context=None if plain else c, timeout=4)"]

# Last, so that a new revision reuses every layer above.
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG SOURCE=unknown
LABEL org.opencontainers.image.title="modelkeep" \
      org.opencontainers.image.description="A secure model server: authenticated, encrypted, signed and audited inference." \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="Apache-2.0"

ENTRYPOINT ["/usr/bin/tini", "--", "/opt/modelkeep/bin/modelkeep"]
CMD ["serve"]
