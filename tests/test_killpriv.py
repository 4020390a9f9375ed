"""Set-ID bits and file capabilities go as kernel overlayfs lets them go: on writes,
truncations, open(O_TRUNC) and chowns, by root (who keeps set-ID bits on a write or a
truncation: CAP_FSETID) and by a user, of lower and upper files. Twice: with the daemon
clearing them (INIT answered with FUSE_HANDLE_KILLPRIV_V2, unionfs/fuseinit.py) and
with the kernel clearing them (-o killpriv=0). And what the flag is for: the kernel asks
for security.capability once per file, not before every write."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import oracle as o
import pytest
from support import (
    debug_mount,
    kernel_overlay,
    kernel_overlay_skip_reason,
    mounted,
    needs_fuse,
)

pytestmark = [
    needs_fuse,
    pytest.mark.skipif(
        kernel_overlay_skip_reason() is not None, reason=kernel_overlay_skip_reason() or ""
    ),
]

USER = 1000
# struct vfs_cap_data, VFS_CAP_REVISION_2 with the effective bit: cap_net_raw (13)
CAP = struct.pack("<IIIII", 0x02000001, 1 << 13, 0, 0, 0)
CAPS = "security.capability"
# name: mode, owner (uid = gid), a file capability
KINDS = {
    "suid": (0o4777, 0, False),
    "sgid": (0o2777, 0, False),
    "sgid-nx": (0o2767, 0, False),  # set-group-ID without group execute: see SGID_NX
    "both": (0o6777, 0, False),
    "cap": (0o777, 0, True),
    "own-suid": (0o4755, USER, False),  # the user's own
    "own-sgid": (0o2775, USER, False),
}
# The kernel clearing them (killpriv=0) keeps set-group-ID without group execute on a
# write or truncation by a user outside the group, which overlayfs clears: the FUSE
# kernel works the new mode out again from its own rule (fs/fuse/dir.c, fuse_setattr).
SGID_NX = ("write", "append", "truncate", "ftruncate", "chown-none")
OPS = ("write", "append", "truncate", "ftruncate", "otrunc", "chown-none", "chown-same")
# Runs in the mount's root as root or as the user: OP on every file named WHO-OP-*.
SCRIPT = r"""
import json, os, sys
who, out = sys.argv[1], {}
for name in sorted(os.listdir(".")):
    parts = name.split("-", 2)
    if parts[0] not in (who, "up" + who):
        continue
    op = parts[1].replace("_", "-")
    try:
        if op == "write":
            fd = os.open(name, os.O_WRONLY)
            os.pwrite(fd, b"w", 1)
            os.close(fd)
        elif op == "append":
            fd = os.open(name, os.O_WRONLY | os.O_APPEND)
            os.write(fd, b"a")
            os.close(fd)
        elif op == "truncate":
            os.truncate(name, 1)
        elif op == "ftruncate":
            fd = os.open(name, os.O_WRONLY)
            os.ftruncate(fd, 2)
            os.close(fd)
        elif op == "otrunc":
            os.close(os.open(name, os.O_WRONLY | os.O_TRUNC))
        elif op == "chown-none":
            os.chown(name, -1, -1)
        elif op == "chown-same":
            st = os.stat(name)
            os.chown(name, st.st_uid, st.st_gid)
        out[name] = "ok"
    except OSError as e:
        out[name] = e.strerror
print(json.dumps(out, sort_keys=True))
"""


def _name(where: str, who: str, op: str, kind: str) -> str:
    # `-` splits the name: the op's own dashes become underscores
    return f"{'up' if where == 'upper' else ''}{who}-{op.replace('-', '_')}-{kind}"


def _make(path: Path, kind: str) -> None:
    mode, owner, cap = KINDS[kind]
    if "-chown_" in path.name:
        # Not writable by others: a user's chown(-1, -1) of root's set-ID file is EPERM
        # on overlayfs, and with HANDLE_KILLPRIV_V2 pyunion can only tell that from a
        # write's by the caller's right to write (README: Where pyunion differs).
        mode &= ~0o002
    path.write_bytes(b"contents\n")
    os.chown(path, owner, owner)
    os.chmod(path, mode)  # after chown, which clears set-ID bits
    if cap:
        os.setxattr(path, CAPS, CAP)


def _cases(killpriv: str) -> Iterator[tuple[str, str, str]]:
    for who in ("root", "user"):
        for op in OPS:
            for kind in KINDS:
                if not (killpriv == "0" and who == "user" and op in SGID_NX and kind == "sgid-nx"):
                    yield who, op, kind


def _populate(lower: Path, killpriv: str) -> None:
    for who, op, kind in _cases(killpriv):
        _make(lower / _name("lower", who, op, kind), kind)


def _upper_files(mnt: Path, killpriv: str) -> None:
    """The same files made through the mount: upper-only ones."""
    for who, op, kind in _cases(killpriv):
        _make(mnt / _name("upper", who, op, kind), kind)


def _run(mnt: Path, who: str, script: Path) -> dict[str, str]:
    cmd = [sys.executable, str(script), who]
    if who == "user":
        cmd = ["setpriv", f"--reuid={USER}", f"--regid={USER}", "--clear-groups", *cmd]
    r = subprocess.run(cmd, cwd=mnt, capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0, r.stderr
    result: dict[str, str] = json.loads(r.stdout)
    return result


@pytest.fixture
def tree() -> Iterator[Path]:
    # Not tmp_path: its parents are private to root, and the user works in it too.
    t = Path(tempfile.mkdtemp(prefix="pyunion-killpriv-"))
    os.chmod(t, 0o755)
    try:
        yield t
    finally:
        o.rmtree(t)


@pytest.mark.parametrize("killpriv", ["1", "0"], ids=["daemon-clears", "kernel-clears"])
def test_set_id_bits_and_capabilities_go_as_on_the_kernel(tree: Path, killpriv: str) -> None:
    lower = tree / "lower"
    lower.mkdir()
    _populate(lower, killpriv)
    script = tree / "ops.py"
    script.write_text(SCRIPT)
    results: dict[str, list[dict[str, str]]] = {}
    views: dict[str, o.Snapshot] = {}
    for impl in ("kernel", "pyunion"):
        mnt, upper, work = tree / f"{impl}-mnt", tree / f"{impl}-upper", tree / f"{impl}-work"
        upper.mkdir()
        work.mkdir()
        os.chmod(upper, 0o755)
        if impl == "kernel":
            mount = kernel_overlay([lower], mnt, upper, work)
        else:
            mount = mounted([lower], mnt, upper, work, extra=("-o", f"killpriv={killpriv}"))
        with mount:
            os.chmod(mnt, 0o777)  # the user truncates by name, opens, chowns her own
            _upper_files(mnt, killpriv)
            results[impl] = [_run(mnt, who, script) for who in ("root", "user")]
            views[impl] = o.snapshot(mnt)
    for who, want, got in zip(("root", "user"), results["kernel"], results["pyunion"], strict=True):
        diff = {n: (want.get(n), got.get(n)) for n in want.keys() | got.keys()}
        diff = {n: d for n, d in diff.items() if d[0] != d[1]}
        assert not diff, f"as {who}, name: (kernel's result, pyunion's): {diff}"
    o.assert_same(views["kernel"], views["pyunion"], f"kernel vs pyunion, killpriv={killpriv}")
    # The test tests something: both kinds of outcome are in it.
    modes = {n: e.mode for n, e in views["kernel"].entries.items()}
    assert modes["root-write-suid"] == 0o4777 and modes["user-write-suid"] == 0o777
    assert CAPS not in dict(views["kernel"].entries["root-write-cap"].xattrs)


@pytest.mark.parametrize("killpriv", ["1", "0"], ids=["daemon-clears", "kernel-clears"])
def test_a_user_who_changes_a_setuid_program_does_not_run_it_as_its_owner(
    tree: Path, killpriv: str
) -> None:
    """exec takes the set-ID bits from the kernel's inode, not from a stat: the mode the
    kernel keeps must be the one the daemon left after the write."""
    lower = tree / "lower"
    lower.mkdir()
    shutil.copy2("/usr/bin/id", lower / "id-suid")
    os.chmod(lower / "id-suid", 0o4777)
    she = ["setpriv", f"--reuid={USER}", f"--regid={USER}", "--clear-groups"]
    upper, work, mnt = tree / "upper", tree / "work", tree / "mnt"
    upper.mkdir()
    work.mkdir()
    with mounted([lower], mnt, upper, work, extra=("-o", f"killpriv={killpriv},suid")):
        prog = mnt / "id-suid"
        before = subprocess.run([*she, prog, "-u"], capture_output=True, text=True, timeout=30)
        assert before.stdout.strip() == "0", before  # setuid root, as it came
        subprocess.run([*she, "sh", "-c", f"printf x >> {prog}"], check=True, timeout=30)
        after = subprocess.run([*she, prog, "-u"], capture_output=True, text=True, timeout=30)
        assert after.stdout.strip() == str(USER), after
        assert os.stat(prog).st_mode & 0o7777 == 0o777


@pytest.mark.parametrize("killpriv", ["1", "0"], ids=["daemon-clears", "kernel-clears"])
def test_the_kernel_asks_for_security_capability_once_per_file(tree: Path, killpriv: str) -> None:
    lower, upper, work, mnt = tree / "lower", tree / "upper", tree / "work", tree / "mnt"
    for d in (lower, upper, work, mnt):
        d.mkdir()
    log = tree / "daemon.log"
    writes = 20
    with debug_mount([lower], mnt, log, upper, work, extra=("-o", f"killpriv={killpriv}")):
        for n in ("a", "b"):
            fd = os.open(mnt / n, os.O_CREAT | os.O_WRONLY, 0o644)
            try:
                for i in range(writes):
                    os.pwrite(fd, b"x" * 100, i * 100)
            finally:
                os.close(fd)
    text = log.read_text()
    asked = text.count("b'security.capability')")
    if killpriv == "1":
        assert "INIT: answered with HANDLE_KILLPRIV_V2" in text, text[:3000]
        assert asked == 2, asked
    else:
        assert "HANDLE_KILLPRIV_V2" not in text
        assert asked == 2 * writes, asked
