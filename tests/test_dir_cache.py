"""Directory listings kept by the kernel (FOPEN_CACHE_DIR, unionfs/fuseinit.py): a
listing read again is not asked of the daemon, and every change made through the
mount shows in the next listing, as on kernel overlayfs."""

from __future__ import annotations

import os
import random
import shutil
import stat
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pyfuse3
import pytest
from support import (
    debug_mount,
    dirents,
    getdents,
    join_children,
    kernel_overlay,
    kernel_overlay_skip_reason,
    mounted,
    needs_fuse,
    start_children,
)

Listing = dict[str, dict[str, str]]


def _kind(e: os.DirEntry[str]) -> str:
    """The entry's type as the listing says it (d_type), not as a stat would."""
    return "l" if e.is_symlink() else "d" if e.is_dir() else "f" if e.is_file() else "o"


def _listings(root: Path) -> Listing:
    """Every directory's listing (name -> type), read twice: the second read is the one
    the kernel may serve from its cache, and must agree with the first."""
    out: Listing = {}
    todo = [root]
    while todo:
        d = todo.pop()
        first = {e.name: _kind(e) for e in os.scandir(d)}
        again = {e.name: _kind(e) for e in os.scandir(d)}
        assert first == again, d
        out[str(d.relative_to(root))] = first
        todo += [d / n for n, k in first.items() if k == "d"]
    return out


def _fill(low: Path) -> None:
    """A lower layer with something for every step of `STEPS` to change."""
    for d in ("a", "b", "a/sub", "gone", "gone/deep", "opaque"):
        (low / d).mkdir()
    for f in ("a/f1", "a/f2", "a/sub/s", "b/g", "gone/x", "gone/deep/y", "opaque/old"):
        (low / f).write_text(f)
    os.symlink("f1", low / "a" / "ln")


def _rmtree(p: Path) -> None:
    """`rm -rf` as it goes: each name removed as soon as the listing hands it over."""
    with os.scandir(p) as it:
        for e in it:
            if e.is_dir(follow_symlinks=False):
                _rmtree(Path(e.path))
            else:
                os.unlink(e.path)
    os.rmdir(p)


Step = Callable[[Path], None]
STEPS: list[tuple[str, Step]] = [
    ("create in a lower dir", lambda m: (m / "a" / "new").write_text("n")),
    ("unlink a lower file", lambda m: os.unlink(m / "a" / "f2")),
    ("mkdir", lambda m: os.mkdir(m / "b" / "nd")),
    ("rename within a dir", lambda m: os.rename(m / "a" / "f1", m / "a" / "f1r")),
    ("rename to another dir", lambda m: os.rename(m / "b" / "g", m / "a" / "g")),
    ("rename a new dir away", lambda m: os.rename(m / "b" / "nd", m / "a" / "nd")),
    ("rename over a name", lambda m: os.rename(m / "a" / "new", m / "a" / "g")),
    ("rm -rf a lower tree", lambda m: _rmtree(m / "gone")),
    ("recreate it empty", lambda m: os.mkdir(m / "gone")),
    ("a hard link", lambda m: os.link(m / "a" / "g", m / "b" / "hard")),
    ("a symlink", lambda m: os.symlink("nowhere", m / "b" / "sl")),
    ("a fifo", lambda m: os.mkfifo(m / "b" / "fifo")),
    ("a file turned into a dir", lambda m: (os.unlink(m / "a" / "ln"), os.mkdir(m / "a" / "ln"))),
    ("rmdir", lambda m: os.rmdir(m / "a" / "nd")),
    ("opaque dir emptied", lambda m: os.unlink(m / "opaque" / "old")),
    ("a name in the emptied dir", lambda m: (m / "opaque" / "fresh").write_text("f")),
]


def _walk(m: Path) -> list[Listing]:
    """The listings before the first step and after each one."""
    seen = [_listings(m)]
    for _, step in STEPS:
        step(m)
        seen.append(_listings(m))
    return seen


@needs_fuse
def test_the_kernel_keeps_listings(layers: tuple, tmp_path: Path) -> None:
    lows, upper, work, mnt = layers
    for i in range(50):
        (lows[0] / f"f{i}").write_text("x")
    log = tmp_path / "daemon.log"
    with debug_mount(lows, mnt, log, upper, work):
        for _ in range(20):
            assert len(os.listdir(mnt)) == 50
        (mnt / "new").write_text("n")  # a change through the mount: listed again, once
        for _ in range(20):
            assert len(os.listdir(mnt)) == 51
        text = log.read_text()
    assert "INIT: the kernel keeps directory listings" in text, text[:2000]
    # Two READDIRs a listing (the entries, then the end): 80 without the kernel's copies.
    assert text.count("readdir(") == 4, text.count("readdir(")


@needs_fuse
def test_every_change_shows_in_the_next_listing(layers: tuple, tmp_path: Path) -> None:
    """Each directory listed twice before and after every step (so the kernel holds its
    listing when the step changes it), the same as on kernel overlayfs."""
    lows, upper, work, mnt = layers
    _fill(lows[0])
    with mounted(lows, mnt, upper, work):
        seen = _walk(mnt)
    for before, after, (what, _) in zip(seen[:-1], seen[1:], STEPS, strict=True):
        assert before != after, what
    reason = kernel_overlay_skip_reason()
    if reason is not None:
        pytest.fail(f"kernel overlayfs, the oracle, cannot be mounted: {reason}")
    k = tmp_path / "k"
    kl = k / "l"
    for d in (kl, k / "u", k / "m"):
        d.mkdir(parents=True)
    _fill(kl)
    with kernel_overlay([kl, lows[1]], k / "m", k / "u", k / "w") as km:
        expected = _walk(km)
    for got, want, what in zip(seen, expected, ["start", *(w for w, _ in STEPS)], strict=True):
        assert got == want, what


@needs_fuse
def test_names_removed_while_listed_are_each_seen_once(layers: tuple) -> None:
    """A program removing what it reads (`rm -rf`) in a kept listing: the listing is
    dropped at each removal and read on from the daemon, no name skipped or repeated."""
    lows, upper, work, mnt = layers
    (lows[0] / "d").mkdir()
    for i in range(600):
        (lows[0] / "d" / f"low{i}").write_text("x")
    with mounted(lows, mnt, upper, work):
        for i in range(300):
            (mnt / "d" / f"up{i}").write_text("y")
        assert len(os.listdir(mnt / "d")) == 900  # kept now
        names = []
        with os.scandir(mnt / "d") as it:
            for e in it:
                names.append(e.name)
                os.unlink(e.path)
        assert sorted(names) == sorted(
            [f"low{i}" for i in range(600)] + [f"up{i}" for i in range(300)]
        )
        assert os.listdir(mnt / "d") == []
        fd = os.open(mnt / "d", os.O_RDONLY | os.O_DIRECTORY)
        try:
            assert os.listdir(fd) == []
            (mnt / "d" / "late").write_text("z")
            assert os.listdir(fd) == ["late"]  # rewound on an open fd: the directory now
            assert stat.S_ISDIR(os.fstat(fd).st_mode)
        finally:
            os.close(fd)


# -- listings read in parts: the kernel's copy filled by one pass, read by another ----------
def _getdents(fd: int) -> list[str]:
    """A few names of a listing (one small batch), without `.` and `..` unless alone."""
    names = getdents(fd, 200)
    return [x for x in names if x not in (".", "..")] or names


def _rest(fd: int) -> list[str]:
    out: list[str] = []
    while batch := _getdents(fd):
        out += batch
    return [x for x in out if x not in (".", "..")]


@pytest.fixture
def big_dir(layers: tuple) -> Iterator[tuple[Path, list[str]]]:
    """A mount whose directory `d` holds 200 lower files: many READDIR replies."""
    lows, upper, work, mnt = layers
    (lows[0] / "d").mkdir()
    names = [f"f{i:03d}" for i in range(200)]
    for n in names:
        (lows[0] / "d" / n).write_text(n)
    with mounted(lows, mnt, upper, work):
        yield mnt / "d", names


def _once_each(seen: list[str], kept: set[str]) -> None:
    """Every name that was never changed during the pass is seen exactly once."""
    dups = sorted({n for n in seen if seen.count(n) > 1})
    assert dups == [] and sorted(kept - set(seen)) == [], (dups, sorted(kept - set(seen)))


@needs_fuse
def test_a_copy_up_leaves_a_partly_kept_listing_true(big_dir: tuple[Path, list[str]]) -> None:
    """A pass that stopped early left the start of the listing in the kernel's copy; a
    copy-up (which the kernel does not see) then must not make the next pass, which
    completes that copy, list a name twice and another not at all, for good."""
    d, names = big_dir
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        head = _getdents(fd)
    finally:
        os.close(fd)
    assert head
    with open(d / max(set(names) - set(head)), "a") as f:  # a name after the part read
        f.write("more")
    for _ in range(2):
        listed = os.listdir(d)
        assert len(listed) == len(names)
        _once_each(listed, set(names))


def _read_across_a_removal(d: Path, names: list[str]) -> None:
    """A pass read in parts: its first part, then the removal of a name it has read and a
    whole listing by another program, then the rest, each name that stayed once."""
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        seen = _getdents(fd)
        os.unlink(d / seen[1])
        assert len(os.listdir(d)) == len(names) - 1
        seen += _rest(fd)
    finally:
        os.close(fd)
    _once_each(seen, set(names) - {seen[1]})


@needs_fuse
def test_a_pass_read_in_parts_across_a_change(big_dir: tuple[Path, list[str]]) -> None:
    """A pass read in parts while another program removes a name it has read and lists
    the directory (which completes the kernel's copy from a newer listing): the rest of
    the pass neither skips nor repeats a name that stayed, as on kernel overlayfs."""
    _read_across_a_removal(*big_dir)


@needs_fuse
def test_a_pass_begun_from_the_kept_listing_goes_on_after_a_change(
    big_dir: tuple[Path, list[str]],
) -> None:
    """A pass that began from the kernel's copy, which a change then drops and another
    listing fills again: the daemon, asked to go on from an offset of that old copy,
    goes on after the same name."""
    d, names = big_dir
    assert len(os.listdir(d)) == len(names)  # kept
    _read_across_a_removal(d, names)


def _passes(d: Path, stable: set[str], until: float, seed: int) -> None:
    """Passes over `d` in parts of random sizes until `until`: each must see every name
    of `stable` exactly once, whatever else changes meanwhile."""
    r = random.Random(seed)
    while time.monotonic() < until:
        fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
        seen: list[str] = []
        try:
            while batch := getdents(fd, r.choice((64, 200, 600, 4096, 32768))):
                seen += batch
        finally:
            os.close(fd)
        _once_each([n for n in seen if n in stable], stable)


def _churn(d: Path, until: float, seed: int) -> None:
    """Names created and removed (changes the kernel sees), `tmp*` only."""
    r = random.Random(seed)
    while time.monotonic() < until:
        p = d / f"tmp{r.randrange(100)}"
        try:
            if r.random() < 0.5:
                p.write_text("t")
            else:
                p.unlink()
        except OSError:
            pass


def _copy_ups(d: Path, names: list[str], until: float, seed: int) -> None:
    """Lower files copied up (changes the kernel does not see: the merged order moves)."""
    r = random.Random(seed)
    while time.monotonic() < until:
        os.chmod(d / r.choice(names), r.choice((0o644, 0o600)))
        time.sleep(0.005)


@needs_fuse
def test_passes_in_parts_while_names_change_and_files_copy_up(layers: tuple) -> None:
    lows, upper, work, mnt = layers
    (lows[0] / "d").mkdir()
    (upper / "d").mkdir()
    names = [f"low{i}" for i in range(600)]
    for n in names:
        (lows[0] / "d" / n).write_text("x")
    for i in range(150):
        names.append(f"up{i}")
        (upper / "d" / f"up{i}").write_text("y")
    with mounted(lows, mnt, upper, work):
        d = mnt / "d"
        until = time.monotonic() + 4
        jobs = [(_passes, (d, set(names), until, i)) for i in range(2)]
        jobs += [(_churn, (d, until, 9)), (_copy_ups, (d, names[:600], until, 8))]
        codes = join_children(start_children(jobs), timeout=60, mnt=mnt)
        assert codes == [0, 0, 0, 0]


def _dots(d: Path) -> dict[str, int]:
    """d_ino of `.` and `..` in a whole listing of `d` (read to its end: kept then)."""
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    out: dict[str, int] = {}
    try:
        while batch := dirents(fd):
            out.update((n, ino) for n, ino in batch if n in (".", ".."))
    finally:
        os.close(fd)
    return out


@needs_fuse
def test_a_moved_directory_lists_its_new_parent(layers: tuple) -> None:
    """A directory's `..` names its parent: moved elsewhere, its kept listing must not
    go on naming the old one (the kernel drops a listing only for a change in it)."""
    lows, upper, work, mnt = layers
    with mounted(lows, mnt, upper, work):
        for d in ("p1/a", "p2"):
            (mnt / d).mkdir(parents=True)
        (mnt / "p1/a/f").write_text("f")
        for _ in range(2):  # kept
            assert _dots(mnt / "p1/a")[".."] == os.stat(mnt / "p1").st_ino
        os.rename(mnt / "p1/a", mnt / "p2/a")
        assert _dots(mnt / "p2/a") == {
            ".": os.stat(mnt / "p2/a").st_ino,
            "..": os.stat(mnt / "p2").st_ino,
        }


@needs_fuse
def test_a_pass_begun_before_a_change_does_not_complete_the_kept_listing_with_it(
    big_dir: tuple[Path, list[str]],
) -> None:
    """A pass that began before names were created reads on after another program
    started the kernel's copy again and stopped early: the rest of that pass completes
    the copy, which every later listing is served from, so it must hold the new names."""
    d, names = big_dir
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        _getdents(fd)  # from the daemon: the pass's listing is taken
        assert len(os.listdir(d)) == len(names)  # the kernel's copy completed
        new = [f"new{i}" for i in range(20)]
        for n in new:
            (d / n).write_text(n)
        other = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
        try:
            getdents(other, 2000)  # starts the copy again, from the listing with them
        finally:
            os.close(other)
        _rest(fd)
    finally:
        os.close(fd)
    for _ in range(2):
        listed = os.listdir(d)
        assert sorted(set(new) - set(listed)) == []
        _once_each(listed, set(names) | set(new))


# -- names crafted to take each other's places (handles.place: a CRC-32 of the name) -------
def _crc_table() -> list[int]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0xEDB88320 if c & 1 else c >> 1
        table.append(c)
    return table


_CRC = _crc_table()
_CRC_BY_TOP = {t >> 24: i for i, t in enumerate(_CRC)}


def _name_with_crc(prefix: bytes, crc: int) -> bytes:
    """`prefix` and four bytes whose CRC-32 is `crc`, none of them `/` or NUL: CRC-32 is
    linear, so the bytes are worked out backwards from the CRC wanted (anyone can)."""
    for last in range(256):
        head = prefix + bytes([last])
        want, idx = crc ^ 0xFFFFFFFF, []
        for _ in range(4):
            idx.append(_CRC_BY_TOP[want >> 24])
            want = ((want ^ _CRC[idx[-1]]) << 8) & 0xFFFFFFFF
        reg, tail = zlib.crc32(head) ^ 0xFFFFFFFF, bytearray()
        for i in reversed(idx):
            tail.append((reg ^ i) & 0xFF)
            reg = (reg >> 8) ^ _CRC[i]
        name = head + bytes(tail)
        if b"/" not in name and b"\0" not in name and last not in (0, ord("/")):
            assert zlib.crc32(name) == crc
            return name
    raise AssertionError("no such name")


def _read_to(fd: int, name: str) -> None:
    """Read the listing one entry a getdents until `name` (each a READDIR, whose entry
    after the one read the kernel keeps too)."""
    while (got := getdents(fd, 32)) and got[-1] != name:
        pass
    assert got, name


@needs_fuse
@pytest.mark.parametrize("change", ["remove", "create"])
def test_names_crafted_to_push_each_other_on_keep_the_kept_listing_true(
    layers: tuple, change: str
) -> None:
    """100 names at consecutive places, and one more at the first one's, which pushes
    every other one place on (or, removed, back). A pass read past the first 64 of
    them before the change, another begun after it, then the first pass read to its
    end: it completed the kernel's copy from its old listing, whose offsets name
    other names now (a name listed twice, or one missing from every `ls` though no
    one touched it, until the next change)."""
    lows, upper, work, mnt = layers
    run = [_name_with_crc(b"n%03d" % i, 1000 + i) for i in range(100)]
    extra = _name_with_crc(b"x00", 1000)  # n000's place; sorted after it
    for k in range(6):
        (lows[0] / f"d{k}").mkdir()
        for n in run + ([extra] if change == "remove" else []):
            (lows[0] / f"d{k}" / os.fsdecode(n)).write_text("")
    names = [os.fsdecode(n) for n in run]
    with mounted(lows, mnt, upper, work):
        for k in range(6):  # the other pass stops a few names either side of the first's
            d = mnt / f"d{k}"
            first = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
            try:
                _read_to(first, names[80])
                assert len(os.listdir(d)) == 100 + (change == "remove")  # kept
                if change == "remove":
                    os.unlink(d / os.fsdecode(extra))
                else:
                    (d / os.fsdecode(extra)).write_text("")
                other = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
                try:
                    _read_to(other, names[77 + k])
                    while getdents(first, 4096):
                        pass
                finally:
                    os.close(other)
            finally:
                os.close(first)
            want = set(names) | ({os.fsdecode(extra)} if change == "create" else set())
            for _ in range(2):
                listed = os.listdir(d)
                assert len(listed) == len(want), (k, len(listed))
                _once_each(listed, want)


# -- a pass read on after the names it has not read yet changed --------------------------
@pytest.fixture
def open_pass(layers: tuple) -> Iterator[tuple[Path, int]]:
    """A mount whose directory `d` holds 100 lower files, `f` ("lower"), a lower directory
    `sub` and an upper one `made`, and an fd on it that has read `.` and `..` only: the
    rest of its pass is read after a change."""
    lows, upper, work, mnt = layers
    (lows[0] / "d").mkdir()
    for i in range(100):
        (lows[0] / "d" / f"n{i}").write_text("other")
    (lows[0] / "d" / "f").write_text("lower")
    (lows[0] / "d" / "sub").mkdir()
    (lows[0] / "d" / "sub" / "inside").write_text("in sub")
    with mounted(lows, mnt, upper, work):
        (mnt / "d" / "made").mkdir()  # an upper directory
        fd = os.open(mnt / "d", os.O_RDONLY | os.O_DIRECTORY)
        try:
            assert getdents(fd, 64) == [".", ".."]  # the pass's listing is taken
            yield mnt / "d", fd
        finally:
            os.close(fd)


def _read_on(fd: int) -> list[str]:
    out: list[str] = []
    while batch := getdents(fd, 4096):
        out += batch
    return out


@needs_fuse
def test_a_name_replaced_during_a_pass_reads_as_the_new_file(open_pass: tuple[Path, int]) -> None:
    """The rest of a pass whose listing was taken before `f` was removed and made again
    handed the kernel the removed lower file under that name, with its attributes: `cat f`
    then read the removed file's data, and `f` changed its inode number."""
    d, fd = open_pass
    os.unlink(d / "f")
    (d / "f").write_text("new")
    ino = os.stat(d / "f").st_ino
    _read_on(fd)
    assert (d / "f").read_text() == "new"
    assert os.stat(d / "f").st_ino == ino


@needs_fuse
def test_a_directory_moved_away_during_a_pass_stays_where_it_went(
    open_pass: tuple[Path, int],
) -> None:
    """The rest of the pass named the moved directory at its old place: the daemon took
    its node back there, and the directory at its new name listed whatever was made at
    the old one since."""
    d, fd = open_pass
    os.rename(d / "sub", d.parent / "moved")
    (d.parent / "moved" / "added").write_text("x")
    _read_on(fd)
    os.mkdir(d / "sub")
    (d / "sub" / "other").write_text("x")
    assert sorted(os.listdir(d.parent / "moved")) == ["added", "inside"]
    assert (d.parent / "moved" / "inside").read_text() == "in sub"


@needs_fuse
def test_a_directory_replaced_by_a_file_during_a_pass(open_pass: tuple[Path, int]) -> None:
    """The rest of the pass failed with ENOTDIR (a whole `ls` or `find` of the directory)."""
    d, fd = open_pass
    os.rmdir(d / "made")
    (d / "made").write_text("a file now")
    names = _read_on(fd)
    assert "n99" in names
    assert (d / "made").read_text() == "a file now"


@needs_fuse
def test_a_pyfuse3_built_otherwise_mounts_without_the_kernels_copies(
    layers: tuple, tmp_path: Path
) -> None:
    """fuseinit finds libfuse's session through a local symbol of pyfuse3's extension: a
    build without it (stripped, or another version of Cython's names) asks the kernel
    for neither, says why, and serves every listing and target from the daemon."""
    lows, upper, work, mnt = layers
    (lows[0] / "f").write_text("f")
    os.symlink("f", lows[0] / "s")
    here = Path(pyfuse3.__file__ or "").parent
    copy = tmp_path / "py" / "pyfuse3"
    shutil.copytree(here, copy)
    ext = copy / Path(pyfuse3.__file__ or "").name
    data = ext.read_bytes()
    assert b"__pyx_v_7pyfuse3_session\0" in data  # in its symbol table (and debug names)
    ext.write_bytes(data.replace(b"__pyx_v_7pyfuse3_session\0", b"__pyx_v_7pyfuse3_sessioX\0"))
    log = tmp_path / "daemon.log"
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "py")}
    with mounted(lows, mnt, upper, work, env=env, log=log):
        for i in range(3):
            assert sorted(os.listdir(mnt)) == sorted(["f", "s", *[f"n{j}" for j in range(i)]])
            assert os.readlink(mnt / "s") == "f"
            (mnt / f"n{i}").write_text("n")
    text = log.read_text()
    assert "symlinks' targets not cached by the kernel: no symbol" in text, text
    assert "directory listings not kept by the kernel: no symbol" in text, text


def _forget() -> None:
    """Have the kernel forget the inodes nothing holds (and the daemon release their nodes)."""
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("2\n")
    time.sleep(0.2)  # FORGETs are asynchronous


@needs_fuse
def test_a_file_copied_up_during_a_pass_keeps_its_new_data(open_pass: tuple[Path, int]) -> None:
    """`f` written (copied up) while a pass over its directory is part-way, then forgotten
    by the kernel: the rest of the pass, from a listing that had `f` in the lower layer,
    gave the kernel the lower file again, whose old data `cat` then read, and whose next
    write copied it up again over what had been written."""
    d, fd = open_pass
    with open(d / "f", "w") as f:
        f.write("written")
    _forget()
    _read_on(fd)
    assert (d / "f").read_text() == "written"
    with open(d / "f", "a") as f:
        f.write(" and more")
    assert (d / "f").read_text() == "written and more"


@needs_fuse
def test_a_directory_copied_up_during_a_pass_keeps_its_new_names(
    open_pass: tuple[Path, int],
) -> None:
    """`sub` copied up (a name made in it) while a pass over its parent is part-way, then
    forgotten by the kernel: the rest of the pass gave it its lower layer alone, and its
    new name was missing from `ls`."""
    d, fd = open_pass
    (d / "sub" / "new").write_text("n")
    _forget()
    _read_on(fd)
    assert sorted(os.listdir(d / "sub")) == ["inside", "new"]
