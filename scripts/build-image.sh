#!/usr/bin/env bash
# Build the modelkeep container image offline (`make image`, and the tests/deploy fixture).
#
# 1. A Debian base image made by mmdebstrap from the Debian archive (no image registry is
#    needed), cached as a tarball and as the local image $BASE_TAG.
# 2. Wheels of modelkeep and its runtime dependencies, built on the host with pip (the build
#    step inside the image installs them with --no-index: it needs no network).
# 3. `podman build` of ./Dockerfile with BASE_IMAGE=$BASE_TAG; prints the image id and size.
#
# Environment: IMAGE (default localhost/modelkeep:dev), PYTHON (default /usr/bin/python3),
# MODELKEEP_IMAGE_CACHE (where the base tarball is kept, default ~/.cache/modelkeep-image).
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE="${IMAGE:-localhost/modelkeep:dev}"
# Debian's own Python 3.11 builds the wheels: the image runs that same interpreter, so pip
# picks wheels and evaluates markers (python_full_version) exactly as for the image.
PYTHON="${PYTHON:-/usr/bin/python3}"
CACHE="${MODELKEEP_IMAGE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/modelkeep-image}"
export CONTAINERS_CONF="${CONTAINERS_CONF:-$PWD/deploy/podman/containers.conf}"

# The base: Python 3.11 (bookworm's, the host's too, so host-built wheels fit), venv support,
# CA certificates for outgoing TLS (PostgreSQL, S3, the key service), tini as PID 1, the GNU
# OpenMP runtime that LightGBM's and XGBoost's wheels link against without carrying it, and the
# C++ runtime that manylinux wheels (ONNX Runtime, gRPC, ...) expect of the system. The tag and
# the cached tarball are named by the package list, the variant and what is left out (keep
# BASE_EXCLUDES in step with the path-exclude options below), so changing one makes a new base.
BASE_PACKAGES="python3,python3-venv,ca-certificates,tini,libgomp1,libstdc++6"
BASE_VARIANT="essential"
BASE_EXCLUDES="doc,man,locale,gconv"
base_id="$(echo "$BASE_VARIANT:$BASE_PACKAGES:$BASE_EXCLUDES" | sha256sum | cut -c1-12)"
BASE_TAG="localhost/modelkeep-base:bookworm-$base_id"
if ! podman image exists "$BASE_TAG"; then
    mkdir -p "$CACHE"
    tarball="$CACHE/base-bookworm-$base_id.tar"
    if [ ! -s "$tarball" ]; then
        echo "build-image: making the Debian base with mmdebstrap (about a minute)"
        # essential: the Essential:yes packages (dpkg, coreutils, bash...) and the ones above,
        # with their dependencies. Not apt: the image needs no package manager (apt fetches
        # from outside the chroot while it is built), nor the other "required" packages of
        # minbase (passwd, mount, e2fsprogs, tzdata, and gnutls and gpgv for apt): 20 MB.
        # Left out as well: recommended packages, manuals, translations and documentation
        # except copyright files, glibc's iconv modules (gconv, 9 MB: for iconv(3) between
        # legacy character sets, which nothing in the image calls; Python has its own codecs
        # and UTF-8 is built into glibc), apt's lists and caches, and usrmerge with the perl it
        # needs (the merged-usr hook lays out /usr without it).
        mmdebstrap --quiet --variant="$BASE_VARIANT" --include="$BASE_PACKAGES" \
            --aptopt='APT::Install-Recommends "false"' \
            --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
            --dpkgopt='path-exclude=/usr/share/man/*' \
            --dpkgopt='path-exclude=/usr/share/locale/*' \
            --dpkgopt='path-exclude=/usr/share/doc/*' \
            --dpkgopt='path-include=/usr/share/doc/*/copyright' \
            --dpkgopt='path-exclude=/usr/lib/*/gconv/*' \
            --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*' \
            bookworm "${tarball%.tar}.partial.tar"
        mv "${tarball%.tar}.partial.tar" "$tarball"
    fi
    podman import --quiet --change 'CMD ["/bin/bash"]' "$tarball" "$BASE_TAG" >/dev/null
fi

# Shared libraries in the wheels lose their symbol tables (strip --strip-unneeded keeps what
# the dynamic linker needs). Not the libraries auditwheel vendored into `*.libs/` (OpenBLAS,
# HDF5, libpq...): patchelf rewrote them, and strip then breaks their layout ("ELF load command
# address/offset not page-aligned"). `wheel unpack`/`wheel pack` (the wheel
# package, a dev dependency) rewrite RECORD with the new hashes; the wheel keeps its name.
WHEEL_TOOL="${WHEEL_TOOL:-$PWD/.venv/bin/wheel}"
strip_wheels() {
    local whl tmp
    for whl in "$1"/*.whl; do
        "$PYTHON" -c 'import sys, zipfile; names = zipfile.ZipFile(sys.argv[1]).namelist(); sys.exit(not any(n.endswith(".so") or ".so." in n for n in names))' "$whl" || continue
        tmp="$(mktemp -d)"
        "$WHEEL_TOOL" unpack --dest "$tmp" "$whl" >/dev/null
        find "$tmp" -type f \( -name '*.so' -o -name '*.so.*' \) ! -path '*.libs/*' \
            -exec strip --strip-unneeded {} +
        rm "$whl"
        "$WHEEL_TOOL" pack --dest-dir "$1" "$tmp"/* >/dev/null
        rm -rf "$tmp"
    done
}

# Runtime wheels only (no [dev] extra), pinned by constraints.txt. deps/ is made again only
# when constraints.txt or pyproject.toml changed (the stamp records their digest), so the image
# layer that installs it stays cached; app/ holds modelkeep's own wheel, made every time.
wheels="build/wheels"
stamp="$(cat constraints.txt pyproject.toml | sha256sum | cut -d' ' -f1)"
rm -rf "$wheels/app"
mkdir -p "$wheels/app"
# A fixed timestamp makes the same code give the same wheel, so podman's layer cache holds.
SOURCE_DATE_EPOCH="$(git log -1 --format=%ct 2>/dev/null || echo 315532800)" \
    "$PYTHON" -m pip wheel --quiet --no-deps -w "$wheels/app" .
if [ "$(cat "$wheels/deps.stamp" 2>/dev/null)" != "$stamp" ]; then
    rm -rf "$wheels/deps" "$wheels/deps.stamp"
    mkdir -p "$wheels/deps"
    "$PYTHON" -m pip wheel --quiet -c constraints.txt -w "$wheels/deps" "$wheels"/app/modelkeep-*.whl
    rm -f "$wheels"/deps/modelkeep-*.whl
    strip_wheels "$wheels/deps"
    echo "$stamp" > "$wheels/deps.stamp"
fi

version="$("$PYTHON" -c 'import tomllib; print(tomllib.load(open("pyproject.toml","rb"))["project"]["version"])')"
revision="$(git rev-parse HEAD 2>/dev/null || echo unknown)"
source="$(git remote get-url origin 2>/dev/null || echo unknown)"
podman build --quiet --format docker \
    --build-arg BASE_IMAGE="$BASE_TAG" \
    --build-arg VERSION="$version" \
    --build-arg REVISION="$revision" \
    --build-arg SOURCE="$source" \
    --tag "$IMAGE" . >/dev/null
podman image inspect "$IMAGE" --format 'image {{.Id}} size {{.Size}} bytes'
