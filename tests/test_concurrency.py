"""Concurrency: parallel workers doing random namespace operations on one mount.

Workers (forked processes) create, write, unlink, mkdir, rmdir, rename (plain,
RENAME_NOREPLACE, RENAME_EXCHANGE), link, symlink, chmod, list and stat names
in a small shared namespace over lower layers with merged directories,
whiteouts, opaque directories and hard links, while another process walks the
tree and makes the kernel forget inodes (drop_caches). The only errors allowed
are the ones POSIX allows for a race (ENOENT, EEXIST, ENOTEMPTY, ...): an EIO,
ENOTCONN or a hang (timeout) fails the test.

Afterwards the daemon is alive, readdir and stat agree on inode numbers, the
upper obeys the kernel's rules (no whiteout inside an opaque directory, no
whiteout without something below it, no leftovers in the work dir), and kernel
overlayfs over the same layers and a fresh pyunion mount both show exactly the
merged view the workers left.

A second test has two processes copy up the same lower files at the same
instant (small ones, copied on the event loop, and ones over 1 MiB, copied in
a worker thread): the copy-up happens once, so both writers' data survive.

Sizes: PYUNION_CONC_OPS operations per worker (default 3000, 30000 with
PYUNION_SOAK=1); PYUNION_CONC_SEED fixes the seed (printed).
"""

from __future__ import annotations

import errno
import multiprocessing
import os
import random
import stat
import time
from pathlib import Path

import pytest
from support import (
    alive,
    daemon_of,
    join_children,
    kernel_overlay,
    mounted,
    needs_fuse,
    soak,
    start_children,
    tree_view,
)

from unionfs.syscalls import RENAME_EXCHANGE, RENAME_NOREPLACE, renameat2

OPS = int(os.environ.get("PYUNION_CONC_OPS", soak(3000, 30000)))
SEED = int(os.environ.get("PYUNION_CONC_SEED", int(time.time()) % 100000))
WORKERS = 4

pytestmark = [needs_fuse, pytest.mark.timeout(300)]

# Races between workers make these legitimate outcomes of any operation.
RACY = {
    errno.ENOENT,
    errno.EEXIST,
    errno.ENOTEMPTY,
    errno.ENOTDIR,
    errno.EISDIR,
    errno.EINVAL,
    errno.EPERM,
    errno.EMLINK,
    errno.ELOOP,
}  # ELOOP: our own symlinks

TOPS = [b"d0", b"d1", b"d2", b"d3"]
NAMES = [b"f0", b"f1", b"f2", b"h", b"s0", b"s1", b"n0", b"n1", b"n2"]


def build_lowers(lows: list[Path]) -> None:
    top, bottom = lows
    rng = random.Random(7)
    for d in TOPS:
        dd = bottom / d.decode()
        dd.mkdir()
        for n in (b"f0", b"f1", b"f2"):
            (dd / n.decode()).write_bytes(rng.randbytes(rng.choice([10, 3000, 70000])))
        for s in (b"s0", b"s1"):
            (dd / s.decode()).mkdir()
            for n in (b"f0", b"f1"):
                (dd / s.decode() / n.decode()).write_bytes(rng.randbytes(100))
    # Hard links across directories in the bottom layer.
    os.link(bottom / "d0" / "f0", bottom / "d1" / "h")
    os.link(bottom / "d0" / "f0", bottom / "d2" / "h")
    # The top layer: merged dirs, a whiteout, an opaque dir, a file over a dir.
    for d in (b"d0", b"d1", b"d2"):
        (top / d.decode()).mkdir()
    (top / "d0" / "f1").write_bytes(b"top")
    os.mknod(top / "d0" / "f2", stat.S_IFCHR, os.makedev(0, 0))
    (top / "d1" / "s0").mkdir()
    os.setxattr(top / "d1" / "s0", b"trusted.overlay.opaque", b"y")
    (top / "d1" / "s0" / "n0").write_bytes(b"opaque child")
    (top / "d2" / "s1").write_bytes(b"file over dir")
    os.mknod(top / "d2" / "f0", stat.S_IFCHR, os.makedev(0, 0))


def rand_path(rng: random.Random) -> bytes:
    p = rng.choice(TOPS) + b"/" + rng.choice(NAMES)
    if rng.random() < 0.35:
        p += b"/" + rng.choice(NAMES)
    return p


def worker(mnt: str, seed: int, ops: int, stats_path: str) -> None:
    rng = random.Random(seed)
    os.chdir(mnt)
    counts: dict[str, int] = {}
    errors: dict[str, int] = {}

    def op_create() -> None:
        flags = os.O_CREAT | os.O_WRONLY | rng.choice([0, os.O_EXCL, os.O_TRUNC])
        fd = os.open(rand_path(rng), flags, 0o644)
        try:
            os.write(fd, rng.randbytes(rng.randint(0, 5000)))
        finally:
            os.close(fd)

    def op_append() -> None:  # copy-up of whatever is there
        fd = os.open(rand_path(rng), os.O_WRONLY | os.O_APPEND)
        try:
            os.write(fd, b"+%d" % seed)
        finally:
            os.close(fd)

    def op_read() -> None:
        with open(rand_path(rng), "rb") as f:
            f.read()

    def op_unlink() -> None:
        os.unlink(rand_path(rng))

    def op_mkdir() -> None:
        os.mkdir(rand_path(rng), 0o755)

    def op_rmdir() -> None:
        os.rmdir(rand_path(rng))

    def op_rename() -> None:
        a, b = rand_path(rng), rand_path(rng)
        flags = rng.choice([0, 0, 0, RENAME_NOREPLACE, RENAME_EXCHANGE])
        renameat2(-100, a, -100, b, flags)  # AT_FDCWD

    def op_link() -> None:
        os.link(rand_path(rng), rand_path(rng))

    def op_symlink() -> None:
        # An absolute target whose directory does not exist: a create or chmod through it
        # follows it to the host's root (the mount is not chroot'ed) and must fail there.
        target = rng.choice([b"f0", b"../d1/f1", b"/nonexistent-pyunion-test/target"])
        os.symlink(target, rand_path(rng))

    def op_chmod() -> None:
        os.chmod(rand_path(rng), rng.choice([0o600, 0o644, 0o755]), follow_symlinks=True)

    def op_list() -> None:
        p = rng.choice(TOPS)
        if rng.random() < 0.5:
            p += b"/" + rng.choice(NAMES)
        for e in os.scandir(p):
            e.stat(follow_symlinks=False)

    def op_stat() -> None:
        os.lstat(rand_path(rng))

    table = [
        (op_create, 10),
        (op_append, 8),
        (op_read, 8),
        (op_unlink, 8),
        (op_mkdir, 6),
        (op_rmdir, 6),
        (op_rename, 12),
        (op_link, 4),
        (op_symlink, 2),
        (op_chmod, 3),
        (op_list, 6),
        (op_stat, 6),
    ]
    funcs = [f for f, _ in table]
    weights = [w for _, w in table]
    for i in range(ops):
        f = rng.choices(funcs, weights)[0]
        try:
            f()
            counts[f.__name__] = counts.get(f.__name__, 0) + 1
        except OSError as e:
            if e.errno not in RACY:
                raise AssertionError(f"worker {seed} op {i} {f.__name__}: {e!r}") from e
            key = f"{f.__name__}:{errno.errorcode[e.errno]}"
            errors[key] = errors.get(key, 0) + 1
    with open(stats_path, "w") as out:
        out.write(f"{sum(counts.values())} ok {sum(errors.values())} refused\n")


def forgetter(mnt: str, stop_path: str) -> None:
    """Walk the tree and make the kernel forget inodes, again and again."""
    while not os.path.exists(stop_path):
        for root, _dirs, files in os.walk(mnt):
            for n in files:
                try:
                    os.lstat(os.path.join(root, n))
                except OSError as e:  # the workers change the tree under the walk
                    if e.errno not in RACY:
                        raise
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("2\n")
        time.sleep(0.05)


def check_inode_numbers(mnt: Path) -> None:
    """readdir's d_ino is stat's st_ino; names of one object share it, and nothing else does."""
    seen: dict[int, tuple[bytes, int]] = {}
    for root, _dirs, _files in os.walk(os.fsencode(str(mnt))):
        for e in os.scandir(root):
            st = e.stat(follow_symlinks=False)
            assert e.inode() == st.st_ino, f"d_ino {e.inode()} != st_ino {st.st_ino} for {e.path!r}"
            if stat.S_ISDIR(st.st_mode):
                assert st.st_ino not in seen, f"directory {e.path!r} shares an inode"
                seen[st.st_ino] = (e.path, st.st_mode)
            else:
                prev = seen.get(st.st_ino)
                if prev is not None:
                    assert prev[1] == st.st_mode, (
                        f"{e.path!r} and {prev[0]!r}: one inode, two modes"
                    )
                seen[st.st_ino] = (e.path, st.st_mode)


def link_groups(root: Path) -> set[frozenset[bytes]]:
    """Which names are one object (by st_ino), as sets of paths with more than one name."""
    by_ino: dict[int, set[bytes]] = {}
    base = os.fsencode(str(root))
    for r, _dirs, files in os.walk(base):
        for n in files:
            p = os.path.join(r, n)
            st = os.lstat(p)
            by_ino.setdefault(st.st_ino, set()).add(p[len(base) :])
    return {frozenset(s) for s in by_ino.values() if len(s) > 1}


def check_upper_rules(upper: Path, lower_view: set[bytes]) -> None:
    base = os.fsencode(str(upper))
    for r, dirs, files in os.walk(base):
        rel = r[len(base) + 1 :]
        try:
            opaque = os.getxattr(r, b"trusted.overlay.opaque") == b"y"
        except OSError:
            opaque = False
        for n in files + dirs:
            p = os.path.join(r, n)
            assert not n.startswith(b"#pyunion"), f"leftover temporary {p!r} in the upper"
            st = os.lstat(p)
            if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
                assert not opaque, f"whiteout {p!r} inside an opaque directory"
                relp = rel + b"/" + n if rel else n
                assert relp in lower_view, f"whiteout {p!r} hides nothing below"


def test_random_namespace_ops(layers: tuple, tmp_path: Path) -> None:
    lows, upper, work, mnt = layers
    print(f"PYUNION_CONC_SEED={SEED} PYUNION_CONC_OPS={OPS}")
    build_lowers(lows)
    with kernel_overlay(lows, tmp_path / "k0") as k:
        lower_view = set(tree_view(k, content=False))
    stop = tmp_path / "stop"
    with mounted(lows, mnt, upper, work):
        pid = daemon_of(mnt)
        jobs = [
            (worker, (str(mnt), SEED + i, OPS, str(tmp_path / f"stats{i}"))) for i in range(WORKERS)
        ]
        fpid = start_children([(forgetter, (str(mnt), str(stop)))])
        try:
            codes = join_children(start_children(jobs), timeout=200, mnt=mnt)
        finally:
            stop.touch()
            fcode = join_children(fpid, timeout=60, mnt=mnt)
        assert alive(pid), "the daemon died"
        assert codes == [0] * WORKERS, f"workers failed (seed {SEED}): {codes}"
        assert fcode == [0], "the walker failed"
        for i in range(WORKERS):
            print((tmp_path / f"stats{i}").read_text().strip())
        check_inode_numbers(mnt)
        view = tree_view(mnt)
        groups = link_groups(mnt)
    assert os.listdir(work / "work") == [], "the work dir holds leftovers"
    check_upper_rules(upper, lower_view)
    with kernel_overlay(lows, tmp_path / "kmnt", upper=upper, work=tmp_path / "kwork") as k:
        kview = tree_view(k)
        kgroups = link_groups(k)
    diff = {
        p: (view.get(p), kview.get(p))
        for p in set(view) | set(kview)
        if view.get(p) != kview.get(p)
    }
    assert not diff, f"pyunion and kernel overlayfs differ (seed {SEED}): {diff}"
    assert groups == kgroups, f"hard links differ: pyunion {groups}, kernel {kgroups}"
    with mounted(lows, mnt, upper, work):
        again = tree_view(mnt)
    assert again == view, "a fresh mount shows something else"


def _opener(path: str, off: int, tag: bytes, barrier: object) -> None:
    barrier.wait(timeout=30)  # type: ignore[attr-defined]
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, tag, off)
        os.fsync(fd)
    finally:
        os.close(fd)


def test_same_lower_file_copied_up_by_two_at_once(layers: tuple, tmp_path: Path) -> None:
    lows, upper, work, mnt = layers
    rng = random.Random(SEED)
    files = {}
    (lows[1] / "sub").mkdir()
    rounds = soak(12, 100)
    for i in range(rounds):
        size = (3 << 20) + i if i % 3 == 0 else rng.randint(200, 50000)
        data = rng.randbytes(size)
        name = f"sub/f{i}"
        (lows[1] / name).write_bytes(data)
        files[name] = data
    ctx = multiprocessing.get_context("fork")
    with mounted(lows, mnt, upper, work):
        for name in files:
            barrier = ctx.Barrier(2)
            jobs = [
                (_opener, (str(mnt / name), 0, b"AAAA", barrier)),
                (_opener, (str(mnt / name), 100, b"BBBB", barrier)),
            ]
            codes = join_children(start_children(jobs), timeout=60, mnt=mnt)
            assert codes == [0, 0]
            want = bytearray(files[name])
            want[0:4] = b"AAAA"
            want[100:104] = b"BBBB"
            files[name] = bytes(want)
            got = (mnt / name).read_bytes()
            assert got == want, f"{name}: a write was lost (copied up twice?)"
        assert os.listdir(work / "work") == []
    for name, data in files.items():
        assert (upper / name).read_bytes() == data
    with kernel_overlay(lows, tmp_path / "kmnt", upper=upper, work=tmp_path / "kwork") as k:
        for name, data in files.items():
            assert (k / name).read_bytes() == data


def _copy_under_way(work: Path) -> bool:
    """Whether a file in the work dir has data yet; its temporaries come and go (renamed
    into place) while it is walked, and one gone mid-walk counts as not yet."""
    try:
        return any(p.stat().st_size for p in work.rglob("*") if p.is_file())
    except FileNotFoundError:
        return False


def test_a_directory_renamed_while_names_in_it_change(layers: tuple) -> None:
    """`mv d d2` copies d's lower files up first, a big one in a worker thread while other
    requests are served. A directory in d renamed meanwhile was then copied up under its
    old name, from the walk's listing taken before: its node was taken back to that name,
    whose whiteout was opened as a directory, and `mv` failed with ENOTDIR."""
    lows, upper, work, mnt = layers
    d = lows[1] / "d"
    d.mkdir()
    for i in range(40):
        (d / f"sub{i}").mkdir()
        (d / f"sub{i}" / "inside").write_text(str(i))
    with open(d / "big", "wb") as f:  # copied in a worker thread (fuseops.THREAD_COPY_MIN)
        for _ in range(128):
            f.write(b"\1" * (1 << 20))
    big = "big"
    for k in range(20):  # a name the walk meets before one of the directories
        order = os.listdir(d)
        later = order[order.index(big) + 1 :]
        if later:
            break
        os.rename(d / big, d / f"big{k}")
        big = f"big{k}"
    victim = later[0]
    with mounted(lows, mnt, upper, work):
        os.stat(mnt / "d" / victim)  # its node is in the table
        pid = os.fork()
        if pid == 0:
            try:
                os.rename(mnt / "d", mnt / "d2")
                os._exit(0)
            except OSError as e:
                os._exit(e.errno)
        try:
            deadline = time.monotonic() + 30
            while not _copy_under_way(work):
                assert time.monotonic() < deadline, "no copy-up under way"
                time.sleep(0.001)
            os.rename(mnt / "d" / victim, mnt / "d" / f"{victim}-moved")
        finally:
            _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, os.strerror(
            os.waitstatus_to_exitcode(status)
        )
        names = os.listdir(mnt / "d2")
        assert victim not in names and f"{victim}-moved" in names
        assert os.listdir(mnt / "d2" / f"{victim}-moved") == ["inside"]
        assert len(names) == 41
