#!/usr/bin/env bash
# Install everything pyunion and its tests need on a Debian 12 machine (as root):
# system packages, then a virtualenv in .venv with the package and its test deps.
# Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

PKGS=(fuse3 libfuse3-dev pkg-config gcc python3-dev python3-venv attr busybox-static
      fuse-overlayfs unionfs-fuse fio buildah skopeo umoci zstd procps util-linux psmisc
      debootstrap docker-registry apache2-utils openssl libseccomp2 podman runc uidmap acl
      catatonit rsync sqlite3)
# libseccomp2: pyunion run's seccomp filter (through pyseccomp). catatonit: the
# container's pid 1 (podman's --init), a static binary of under 1 MiB. podman and runc: the
# reference the confinement tests compare with (Debian's crun refuses hybrid cgroups).
# uidmap: newuidmap/newgidmap, which map an ordinary user's subordinate IDs into the user
# namespace of rootless pyunion (as for rootless podman and buildah).
# acl: setfacl/getfacl, with which the tests check the IDs inside POSIX ACLs (uidmapping=).
# rsync and sqlite3: programs the differential tests run on the mount and on kernel
# overlayfs (rsync -aHAX into lower trees; sqlite's WAL maps a shared file and locks).
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

# Rootless operation (pyunion as an ordinary user, in a user namespace): make this machine
# what a stock Debian 12 is where the feature counts on it.
# - /dev/fuse: Debian's udev gives it mode 0666 at every boot (50-udev-default.rules:
#   KERNEL=="fuse", MODE="0666"). This machine runs no udev, so it keeps the kernel's 0600
#   and only root could mount FUSE. chmod it here: devtmpfs forgets the mode at the next
#   boot, when this script runs again (scripts/test.sh and demo.sh call it first).
# - Unprivileged user namespaces: on in Debian 12's kernel; turned on for this boot if not.
# - A test user with a subordinate ID range in /etc/subuid and /etc/subgid, as useradd gives
#   every regular user on Debian 12 (the tests also make throw-away users of their own).
ROOTLESS_USER=pyunion-user
rootless=()
if [ -c /dev/fuse ] && [ "$(stat -c %a /dev/fuse)" != 666 ]; then
    chmod 0666 /dev/fuse
    rootless+=("/dev/fuse 0666 (Debian's mode, until reboot)")
fi
if [ "$(cat /proc/sys/kernel/unprivileged_userns_clone 2>/dev/null || echo 1)" = 0 ]; then
    sysctl -qw kernel.unprivileged_userns_clone=1
    rootless+=("kernel.unprivileged_userns_clone=1")
fi
if [ "$(cat /proc/sys/user/max_user_namespaces)" = 0 ]; then
    sysctl -qw user.max_user_namespaces=15000
    rootless+=("user.max_user_namespaces=15000")
fi
if ! id -u "$ROOTLESS_USER" >/dev/null 2>&1; then
    useradd --create-home --shell /bin/bash "$ROOTLESS_USER"
    rootless+=("user $ROOTLESS_USER")
fi
for f in /etc/subuid /etc/subgid; do
    if ! grep -q "^$ROOTLESS_USER:" "$f" 2>/dev/null; then
        # The next free 65536 IDs at or above 100000 (what useradd would have picked).
        start=$(awk -F: 'BEGIN { n = 100000 } $2 + $3 > n { n = $2 + $3 } END { print n }' \
                "$f" 2>/dev/null || echo 100000)
        opt=--add-subuids; [ "$f" = /etc/subgid ] && opt=--add-subgids
        usermod "$opt" "$start-$((start + 65535))" "$ROOTLESS_USER"
        rootless+=("$f range $start-$((start + 65535))")
    fi
done
if [ ${#rootless[@]} -gt 0 ]; then
    printf -v joined '%s; ' "${rootless[@]}"
    echo "setup: rootless like a stock Debian 12: ${joined%; }" >&2
fi

# Debian's own interpreter, not whichever python3 comes first in PATH: it is the one the
# packages above install (python3-venv, python3-dev), it carries Debian's security fixes, and
# it is built with profile-guided and link-time optimisation, libpython linked into the
# executable (a default pyenv build has neither, and ran pyunion's Python ~1.7x slower).
# PYTHON= chooses another one.
PY=${PYTHON:-/usr/bin/python3}
PY_HOME=$(dirname "$("$PY" -c 'import os, sys; print(os.path.realpath(sys.executable))')")
if [ -x .venv/bin/python ] && ! grep -qxF "home = $PY_HOME" .venv/pyvenv.cfg 2>/dev/null; then
    echo "setup: .venv was made by another interpreter; making it again with $PY" >&2
    rm -rf .venv
fi
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
# The editable install is a path in a .pth file (compat mode): setuptools' default puts an
# import finder in every interpreter's start-up (~15 ms of each `pyunion` command; an
# installed wheel has none either).
if ! .venv/bin/python -c 'import pyfuse3, trio, pytest, pytest_trio, hypothesis, zstandard, httpx, tqdm, pyseccomp, msgspec, dockerfile, unionfs' 2>/dev/null \
   || [ pyproject.toml -nt .venv/.installed ] \
   || compgen -G '.venv/lib/python3*/site-packages/__editable___pyunion_*_finder.py' >/dev/null; then
    .venv/bin/pip install -q --upgrade pip >/dev/null 2>&1 || true
    # -qq: setuptools' notes on editable installs
    .venv/bin/pip install -qq -e '.[test]' --config-settings editable_mode=compat
    touch .venv/.installed
fi
# Bytecode for pyunion itself, as an installed package has it: where the environment says
# PYTHONDONTWRITEBYTECODE, every command would compile its modules again (~10 ms of each
# start) and each daemon would hold ~2 MiB more.
.venv/bin/python -m compileall -q -o 0 -o 2 unionfs >/dev/null
# And the docstring-free bytecode (`-OO`'s) of what a daemon imports, which its loads instead
# (unionfs/bytecode.py: ~0.65 MiB less per daemon); the standard library's stays as it is.
SITE=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
.venv/bin/python -m compileall -q -o 2 \
    "$SITE"/{trio,attr,attrs,sortedcontainers,outcome,sniffio,idna,pyfuse3} >/dev/null
