#!/usr/bin/env bash
# The README's main command: build the sample busybox image (three layers, one
# deleting with a kernel whiteout, one in OCI format), run a process in it that
# writes, deletes and lists files, then show that a second run sees none of it.
# Needs root (mounts, namespaces, device-node whiteouts); installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
    echo "demo: run me as root (pyunion run uses mount and pid namespaces)" >&2
    exit 1
fi
bash scripts/setup.sh
PYUNION=(.venv/bin/python -m unionfs)

WORK=$(mktemp -d /tmp/pyunion-demo.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
# pyunion run keeps its throw-away upper in $TMPDIR: a private one shows it goes away.
export TMPDIR=$WORK/tmp
mkdir "$TMPDIR"

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "build the sample image: layers, top first"
mapfile -t LAYERS < <("${PYUNION[@]}" sample "$WORK")
printf '  %s\n' "${LAYERS[@]}"
echo "  1-kernel deletes /etc/doomed.txt with a char 0/0 whiteout:"
ls -l "${LAYERS[1]}/etc/doomed.txt" | sed 's/^/    /'
echo "  2-oci deletes /usr/share/junk.txt with an OCI marker and makes /srv opaque:"
(cd "${LAYERS[0]}" && ls -A usr/share srv) | sed 's/^/    /'

step "first run: write, delete and list files in the container"
set -x
"${PYUNION[@]}" run "${LAYERS[@]}" -- sh -c '
    echo "hello from $(hostname), pid $$"
    echo "written in the container" > /root/new.txt
    rm /etc/motd
    mkdir /srv/scratch
    ls /etc /root /srv /usr/share
    ps
'
{ set +x; } 2>/dev/null

step "second run: a fresh writable layer, none of those changes"
set -x
"${PYUNION[@]}" run "${LAYERS[@]}" -- sh -c '
    ls /etc /root /srv
    cat /etc/motd
    test ! -e /root/new.txt && echo "/root/new.txt: gone"
'
{ set +x; } 2>/dev/null

step "exit status and user from the image"
set -x
"${PYUNION[@]}" run -u alice "${LAYERS[@]}" -- sh -c 'id; cat ~/hello.txt; exit 7' || echo "exit status: $?"
{ set +x; } 2>/dev/null

step "nothing left behind"
echo "host mounts under $WORK: $(grep -c "$WORK" /proc/self/mountinfo || true)"
echo "left in \$TMPDIR: $(ls -A "$TMPDIR" | wc -l) entries"
