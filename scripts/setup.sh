#!/usr/bin/env bash
# Install everything pyunion and its tests need on a Debian 12 machine (as root):
# system packages, then a virtualenv in .venv with the package and its test deps.
# Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

PKGS=(fuse3 libfuse3-dev pkg-config gcc python3-dev python3-venv attr busybox-static
      fuse-overlayfs unionfs-fuse fio buildah skopeo umoci zstd procps util-linux psmisc
      debootstrap docker-registry apache2-utils openssl libseccomp2 podman runc)
# libseccomp2: pyunion run's seccomp filter (through pyseccomp). podman and runc: the
# reference the confinement tests compare with (Debian's crun refuses hybrid cgroups).
missing=()
for p in "${PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
modprobe fuse 2>/dev/null || true
modprobe overlay 2>/dev/null || true

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
if ! .venv/bin/python -c 'import pyfuse3, trio, pytest, pytest_trio, hypothesis, zstandard, httpx, tqdm, pyseccomp, msgspec, dockerfile, unionfs' 2>/dev/null \
   || [ pyproject.toml -nt .venv/.installed ]; then
    .venv/bin/pip install -q --upgrade pip >/dev/null 2>&1 || true
    .venv/bin/pip install -qq -e '.[test]'  # -qq: setuptools' notes on editable installs
    touch .venv/.installed
fi
