"""`pyunion build` against hostile Containerfiles, contexts and archives.

Each case is something a Containerfile or a context can hold: a heredoc name
that is a host path, patterns that made a backtracking matcher take exponential
time, an archive member that reads as gigabytes, trees too deep or too wide
for the fd limit. The build must do the right thing, or fail in one line,
quickly, leaving nothing outside the store.
"""

from __future__ import annotations

import contextlib
import io
import os
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support import PYUNION, fuse_skip_reason

from unionfs.image import Store
from unionfs.tree import rmtree

needs_fuse = pytest.mark.skipif(fuse_skip_reason() is not None, reason=fuse_skip_reason() or "")


def _build(
    store: Path, ctx: Path, *args: str, nofile: int | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """`pyunion build`, under an fd limit of `nofile` if given."""

    def limit() -> None:
        if nofile is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

    return subprocess.run(
        [*PYUNION, "build", "--store", str(store), *args, str(ctx)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        stdin=subprocess.DEVNULL,
        preexec_fn=limit,
    )


def _layer(store: Path, tag: str, index: int = -1) -> Path:
    """The unpacked tree of one layer of an image in the store."""
    s = Store(str(store))
    return Path(s.layer_path(s.lookup(tag).diff_ids[index]))


def _one_line_error(r: subprocess.CompletedProcess[str]) -> str:
    assert r.returncode != 0, r.stdout
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    return lines[0]


# --- F1: a heredoc's name is never a host path --------------------------------------------------
@needs_fuse
@pytest.mark.timeout(120)
def test_a_heredoc_name_never_becomes_a_host_path(tmp_path: Path) -> None:
    """`COPY <</abs/path` and `COPY <<../../x` wrote that host file (as root) before the
    build failed; `<<a/b` was a traceback. The name only names the file in the image,
    by its last component as buildah does."""
    outside = tmp_path / "outside"
    outside.mkdir()
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "Containerfile").write_text(
        "FROM scratch\n"
        "ARG X=q\n"
        f"COPY <<{outside}/PWNED /abs/\nabsolute\n{outside}/PWNED\n"
        "COPY <<../../../../../../PWNED2 /rel\nrelative\n../../../../../../PWNED2\n"
        "COPY <<a/b <<${X}/x /two/\none\na/b\ntwo\n${X}/x\n"
    )
    store = tmp_path / "store"
    r = _build(store, ctx, "-t", "heredoc")
    assert r.returncode == 0, r.stderr
    assert os.listdir(outside) == []
    for d in (tmp_path, store, store.parent.parent):
        assert not (d / "PWNED2").exists()
    assert (_layer(store, "heredoc", 0) / "abs/PWNED").read_text() == "absolute\n"
    assert (_layer(store, "heredoc", 1) / "rel").read_text() == "relative\n"
    two = _layer(store, "heredoc", 2) / "two"
    assert sorted(os.listdir(two)) == ["b", "x"]
    assert (two / "b").read_text() == "one\n" and (two / "x").read_text() == "two\n"
    assert os.listdir(store / "tmp") == []
    (ctx / "Containerfile").write_text("FROM scratch\nCOPY <<.. /d\nx\n..\n")
    line = _one_line_error(_build(store, ctx))
    assert "COPY <<..: not a file name for a heredoc" in line


# --- F5: patterns match in linear time ----------------------------------------------------------
PATTERN_CASES = """
import random, sys, time
from unionfs.build.ignore import Matcher
from unionfs.build.lexer import Lexer
from unionfs.build.sources import SourceTree

started = time.monotonic()
m = Matcher(["**/" * 12 + "x"])
deep = "a/" * 30
assert not m.excluded(deep + "keep") and m.excluded(deep + "x") and m.excluded("x/y")
tree = SourceTree(sys.argv[1], None, "the context")
assert tree.expand("*a" * 14 + "b") == ["a" * 40 + "b"]
assert tree.expand("*a" * 14 + "c") == []
lx = Lexer()
v = "a" * 40
assert lx.word("${X#" + "*a" * 13 + "b}", {"X": v}) == v
assert lx.word("${X%" + "*a" * 13 + "b}", {"X": v}) == v
assert lx.word("${X##" + "*a" * 13 + "}", {"X": v + "bc"}) == "bc"
assert lx.word("${X%%" + "a*" * 13 + "}", {"X": "cb" + v}) == "cb"
assert lx.word("${X/" + "*a" * 13 + "b/R}", {"X": v + "bc"}) == "Rc"
m = Matcher(["**/*a" + "?" * 250])
rnd = random.Random(14)
deep = "/".join("".join(rnd.choice("ab") for _ in range(250)) for _ in range(15))
assert not any(m.excluded(deep[:3760] + f"/f{i}") for i in range(5))
assert m.excluded("b/" + "a" * 251 + "/f")
print(round(time.monotonic() - started, 3))
"""


@pytest.mark.timeout(60)
def test_patterns_that_made_a_regex_backtrack_match_at_once(tmp_path: Path) -> None:
    """A `.dockerignore` line `**/**/.../x` against a 30-deep path, a COPY glob
    `*a*a...*ab` against a 40-character name and `${X#*a*a...*ab}` took exponential
    time (the build hung); `**/*a???...?` against a 3,764-character path took 0.8 s
    (its DFA rebuilt over and over). Each now takes milliseconds, same answers."""
    (tmp_path / ("a" * 40)).touch()
    (tmp_path / ("a" * 40 + "b")).touch()
    r = subprocess.run(
        [sys.executable, "-c", PATTERN_CASES, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    assert float(r.stdout) < 2, r.stdout


# --- F3: ADD of sparse and lying members ---------------------------------------------------------
def _octal(n: int, width: int) -> bytes:
    """A tar number field; GNU base-256 when octal does not fit."""
    s = b"%0*o" % (width - 1, n)
    if len(s) > width - 1:
        b = bytearray(n.to_bytes(width, "big"))
        b[0] |= 0x80
        return bytes(b)
    return s + b"\0"


def _header(name: bytes, size: int, kind: bytes, extra: dict[int, bytes] | None = None) -> bytes:
    h = bytearray(512)
    h[0 : len(name)] = name
    h[100:108], h[108:116], h[116:124] = b"0000644\0", b"0000000\0", b"0000000\0"
    h[124:136], h[136:148] = _octal(size, 12), _octal(0, 12)
    h[156:157] = kind
    h[257:265] = b"ustar  \0"
    for at, value in (extra or {}).items():
        h[at : at + len(value)] = value
    h[148:156] = b"        "
    h[148:156] = b"%06o\0 " % sum(h)
    return bytes(h)


def _sparse_tar(path: Path, apparent: int) -> None:
    """A GNU (old format) sparse member: one 512-byte region of 'Z' at the very end."""
    extra = {386: _octal(apparent - 512, 12), 398: _octal(512, 12), 483: _octal(apparent, 12)}
    path.write_bytes(_header(b"sparse", 512, b"S", extra) + b"Z" * 512 + b"\0" * 1024)


def _chain(top: Path, names: list[str]) -> int:
    """An fd of top/names[0]/names[1]/..., made as needed (the path may be too long)."""
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    for name in names:
        with contextlib.suppress(FileExistsError):
            os.mkdir(name, dir_fd=fd)
        nfd = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = nfd
    return fd


@needs_fuse
@pytest.mark.timeout(120)
def test_an_ignore_pattern_with_a_huge_dfa_against_long_paths(tmp_path: Path) -> None:
    """`**/*a???...?` (250 `?`) against 14 directories of 250 random a/b characters:
    the DFA overflowed its bound and was rebuilt, each character a Python walk over
    ~250 states, and every parent of every file was matched again from the start.
    300 files took over 180 s (buildah: 3 s); each file now costs its name's length."""
    rnd = random.Random(14)
    names = ["".join(rnd.choice("ab") for _ in range(250)) for _ in range(14)]
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    fd = _chain(ctx, names)
    for i in range(300):
        os.close(os.open(f"f{i}", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd))
    os.close(fd)
    (ctx / ".dockerignore").write_text("**/*a" + "?" * 250 + "\n")
    (ctx / "Containerfile").write_text("FROM scratch\nCOPY . /c/\n")
    store = tmp_path / "store"
    started = time.monotonic()
    r = _build(store, ctx, "-t", "long", timeout=90)
    took = time.monotonic() - started
    assert r.returncode == 0, r.stderr
    fd = _chain(_layer(store, "long") / "c", names)
    try:
        assert len(os.listdir(fd)) == 300
    finally:
        os.close(fd)
    assert took < 30, took


@needs_fuse
@pytest.mark.timeout(120)
def test_add_keeps_the_holes_of_sparse_members_and_bounds_them(tmp_path: Path) -> None:
    """A 2 KiB archive whose sparse member reads as 2 GiB was written densely: 2 GiB of
    disk. The data regions alone are written (the disk holds 512 bytes), and an
    archive whose holes come to more than 1 GiB is refused, as is a plain tar's member
    that declares more bytes than the archive has."""
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    apparent = 64 << 20
    _sparse_tar(ctx / "small.tar", apparent)
    (ctx / "Containerfile").write_text("FROM scratch\nADD small.tar /out/\n")
    store = tmp_path / "store"
    r = _build(store, ctx, "-t", "sparse")
    assert r.returncode == 0, r.stderr
    f = _layer(store, "sparse") / "out/sparse"
    st = f.stat()
    assert st.st_size == apparent and st.st_blocks * 512 <= 64 << 10, (st.st_size, st.st_blocks)
    with open(f, "rb") as fh:
        assert fh.read(4096) == b"\0" * 4096
        fh.seek(apparent - 512)
        assert fh.read() == b"Z" * 512
    _sparse_tar(ctx / "huge.tar", 1 << 40)
    (ctx / "Containerfile").write_text("FROM scratch\nADD huge.tar /out/\n")
    started = time.monotonic()
    line = _one_line_error(_build(store, ctx))
    assert "refusing 'sparse': a sparse file of 1099511627776 bytes" in line, line
    assert time.monotonic() - started < 30
    liar = _header(b"liar", 1 << 30, b"0") + b"x" * 512 + b"\0" * 1024
    (ctx / "liar.tar").write_bytes(liar)
    (ctx / "Containerfile").write_text("FROM scratch\nADD liar.tar /out/\n")
    line = _one_line_error(_build(store, ctx))
    assert "refusing 'liar': its header declares 1073741824 bytes, more than the" in line, line
    assert os.listdir(store / "tmp") == []


# --- F2, F4: trees deeper or wider than the fd limit -------------------------------------------
def _deep_and_wide_tar(path: Path, depth: int, width: int) -> None:
    import tarfile

    with tarfile.open(path, "w") as tf:
        for i in range(width):
            ti = tarfile.TarInfo(f"w{i}/")
            ti.type, ti.mode = tarfile.DIRTYPE, 0o755
            tf.addfile(ti)
        ti = tarfile.TarInfo("a/" * depth + "f")
        ti.size = 1
        tf.addfile(ti, io.BytesIO(b"x"))


def _depth(root: Path, name: str) -> int:
    """How many levels of `name` directories there are below `root`."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    n = 0
    try:
        while True:
            try:
                nfd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            except FileNotFoundError:
                return n
            os.close(fd)
            fd, n = nfd, n + 1
    finally:
        os.close(fd)


@needs_fuse
@pytest.mark.timeout(180)
def test_copy_and_add_of_trees_deeper_and_wider_than_the_fd_limit(tmp_path: Path) -> None:
    """Under `ulimit -n 256`: COPY of more directories than that ran out of fds (one per
    pending directory of the walk, one per directory written), ADD of a member deeper
    than Python's recursion limit was a RecursionError, ADD of many directories ran out
    of fds. Walks now hold a few fds at any width or depth."""
    ctx = tmp_path / "ctx"
    for i in range(400):
        (ctx / "wide" / f"d{i}" / "sub").mkdir(parents=True)
    deep = ctx / "deep"
    deep.mkdir()
    fd = os.open(deep, os.O_RDONLY | os.O_DIRECTORY)
    for _ in range(600):
        os.mkdir("a", dir_fd=fd)
        nfd = os.open("a", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = nfd
    os.close(fd)
    _deep_and_wide_tar(ctx / "t.tar", 1100, 800)
    (ctx / "Containerfile").write_text(
        "FROM scratch\nCOPY wide /wide\nCOPY deep /deep\nADD t.tar /t/\n"
    )
    store = tmp_path / "store"
    try:
        r = _build(store, ctx, "-t", "tree", nofile=256, timeout=150)
        assert r.returncode == 0, r.stderr
        wide = _layer(store, "tree", 0) / "wide"
        assert len(os.listdir(wide)) == 400 and os.listdir(wide / "d399") == ["sub"]
        assert _depth(_layer(store, "tree", 1) / "deep", "a") == 600
        t = _layer(store, "tree", 2) / "t"
        assert len(os.listdir(t)) == 801 and _depth(t, "a") == 1100
    finally:  # deeper than pytest's own clean-up can remove
        rmtree(str(ctx))
        rmtree(str(store))


# --- a symlink named as a COPY source never reaches what the ignore file excludes -------------
@needs_fuse
def test_a_symlink_source_does_not_bypass_the_ignore_file(tmp_path: Path) -> None:
    """`x -> secret.key` named (or globbed) as a COPY source copied the ignored file's
    content (the rules were checked against the name as written only); docker and
    buildah never send an ignored file, so the COPY fails. A link to a file the ignore
    file keeps still copies its target."""
    ctx = tmp_path / "ctx"
    (ctx / "sdir").mkdir(parents=True)
    (ctx / "secret.key").write_text("TOPSECRET")
    (ctx / "sdir" / "inner").write_text("S2")
    (ctx / "plain.txt").write_text("ok")
    os.symlink("secret.key", ctx / "link")
    os.symlink("/secret.key", ctx / "abslink")  # resolved inside the context
    os.symlink("sdir", ctx / "lnkdir")
    os.symlink("plain.txt", ctx / "fine")
    (ctx / ".dockerignore").write_text("*.key\nsdir\n")
    store = tmp_path / "store"
    for src in ("link", "lin*", "abslink", "lnkdir/inner", "lnkdir"):
        (ctx / "Containerfile").write_text(f"FROM scratch\nCOPY {src} /d/\n")
        line = _one_line_error(_build(store, ctx, "-t", "leak"))
        assert "excluded by the ignore file" in line, (src, line)
    (ctx / "Containerfile").write_text("FROM scratch\nCOPY fine /d/\n")
    r = _build(store, ctx, "-t", "fine")
    assert r.returncode == 0, r.stderr
    assert (_layer(store, "fine") / "d" / "fine").read_text() == "ok"


# --- archives tarfile chokes on, and owners out of range: one line, at once --------------------
def _pax_digits_tar(n: int) -> bytes:
    """A gzipped tar whose first member is a pax header of `n` digits (CVE-2024-6232: the
    `\\d+ hdrcharset=` search of tarfile before 3.11.10 is quadratic in it)."""
    import gzip
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        ti = tarfile.TarInfo("././@PaxHeader")
        ti.type, ti.size = tarfile.XHDTYPE, n
        tf.addfile(ti, io.BytesIO(b"1" * n))
        ti = tarfile.TarInfo("f")
        ti.size = 6
        tf.addfile(ti, io.BytesIO(b"hello\n"))
    return gzip.compress(buf.getvalue())


@needs_fuse
def test_hostile_archives_and_owners_are_one_line_at_once(tmp_path: Path) -> None:
    """A 2 KiB ADD archive with a pax header of 2 MB of digits kept tarfile's regex busy
    for hours (read now, or refused in one line by a tarfile that has the fix); a pax
    sparse map with empty fields, a header with a bad checksum and an owner id past 2^32
    were tracebacks."""
    import tarfile

    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "redos.tar.gz").write_bytes(_pax_digits_tar(2_000_000))
    (ctx / "f").write_text("f")
    odd = tarfile.TarInfo("sp")
    odd.type = tarfile.XHDTYPE
    body = (
        b"27 GNU.sparse.size=1048576\n26 GNU.sparse.numblocks=3\n22 GNU.sparse.name=sp\n"
        b"47 GNU.sparse.map=0,4096,524288,,,,,,1048576,0\n"
    )
    odd.size = len(body)
    with tarfile.open(ctx / "odd.tar", "w", format=tarfile.USTAR_FORMAT) as tf:
        tf.addfile(odd, io.BytesIO(body))
        f = tarfile.TarInfo("f")
        f.size = 1
        tf.addfile(f, io.BytesIO(b"x"))
    bad = bytearray((ctx / "odd.tar").read_bytes())
    bad[148:156] = b"0000000\0"  # the first header's checksum
    (ctx / "bad.tar").write_bytes(bytes(bad))
    store = tmp_path / "store"
    (ctx / "Containerfile").write_text("FROM scratch\nADD redos.tar.gz /x/\n")
    t0 = time.monotonic()
    r = _build(store, ctx, "-t", "redos", timeout=60)
    assert time.monotonic() - t0 < 20
    if r.returncode == 0:  # tarfile before the CVE's fix reads the header (tarsafe: linear)
        assert (_layer(store, "redos") / "x" / "f").read_text() == "hello\n"
    else:  # a tarfile with the fix (Debian's 3.11.2+deb12u4, 3.11.10) refuses the record
        assert "corrupt or truncated archive" in _one_line_error(r)
    for line, said in (
        ("ADD odd.tar /x/", "corrupt or truncated archive"),
        ("ADD bad.tar /x/", "corrupt or truncated archive"),
        ("COPY --chown=99999999999 f /f", "user id 99999999999 is out of range"),
        ("COPY --chown=0:4294967295 f /f", "group id 4294967295 is out of range"),
        # str.isdigit() takes these, int() refused them: a traceback.
        ("COPY --chown=" + "9" * 5000 + " f /f", "out of range"),
        ("COPY --chown=\u00b2 f /f", "no user"),
        ("COPY --chown=0:\u00b2 f /f", "no group"),
    ):
        (ctx / "Containerfile").write_text(f"FROM scratch\n{line}\n")
        assert said in _one_line_error(_build(store, ctx)), line


@needs_fuse
def test_numbers_in_a_containerfile_are_ascii_digits_in_range(tmp_path: Path) -> None:
    """A HEALTHCHECK duration of 400 digits (float() reads inf, int() raised
    OverflowError) and `COPY --from=` 5000 digits (str.isdigit() took them, int()
    refused them) were tracebacks; `--retries=-3`, `EXPOSE +80` and `--chmod=0o755`
    were taken (int() reads a sign and a prefix; docker and buildah refuse them)."""
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "f").write_text("f")
    store = tmp_path / "store"
    for line, said in (
        (f"HEALTHCHECK --interval={'9' * 400}s CMD true".encode(), "not a duration"),
        (b"HEALTHCHECK --retries=-3 CMD true", "--retries needs a number"),
        (b"COPY --from=" + b"9" * 5000 + b" f /f", "used before it is defined"),
        (b"COPY --chmod=0o755 f /f", "expected an octal mode"),
        (b"EXPOSE +80", "invalid port"),
    ):
        (ctx / "Containerfile").write_bytes(b"FROM scratch\n" + line + b"\n")
        assert said in _one_line_error(_build(store, ctx)), line


@needs_fuse
def test_an_image_passwd_with_absurd_ids_is_read_as_nss_reads_it(tmp_path: Path) -> None:
    """An entry whose uid has more digits than int() takes (or a `²`, which
    str.isdigit() accepts) stopped `COPY --chown` of any other user with a traceback;
    it is an entry like any other: matched by name, its id out of range."""
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "f").write_text("f")
    (ctx / "passwd").write_text(
        f"bob:x:{'9' * 5000}:0::/:/bin/sh\ncarol:x:\u00b2:0::/:/bin/sh\n"
        "alice:x:1000:1000::/home/alice:/bin/sh\n"
    )
    store = tmp_path / "store"
    head = "FROM scratch\nCOPY passwd /etc/passwd\n"
    (ctx / "Containerfile").write_text(head + "COPY --chown=alice f /f\n")
    r = _build(store, ctx, "-t", "ids")
    assert r.returncode == 0, r.stderr
    assert os.stat(_layer(store, "ids") / "f").st_uid == 1000
    for user, said in (("bob", "out of range"), ("carol", "no user 'carol'")):
        (ctx / "Containerfile").write_text(head + f"COPY --chown={user} f /f\n")
        assert said in _one_line_error(_build(store, ctx)), user


@needs_fuse
def test_quoted_heredoc_names(tmp_path: Path) -> None:
    """`COPY <<'EOF' dest` and `<<"EOF"` (quotes: no expansion, as in the shell) were taken
    for context paths ("cannot read '<<EOF' from the build context")."""
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "Containerfile").write_text(
        "FROM scratch\nARG X=expanded\nCOPY <<'EOF' /d/f\nq $X\nEOF\n"
        'COPY <<"G" /d/g\ndq\nG\nCOPY <<H /d/h\nplain $X\nH\n'
    )
    store = tmp_path / "store"
    r = _build(store, ctx, "-t", "hq")
    assert r.returncode == 0, r.stderr
    d = Store(str(store))
    files = {}
    for diff in d.lookup("hq").diff_ids:
        for p in (Path(d.layer_path(diff)) / "d").iterdir():
            files[p.name] = p.read_text()
    assert files == {"f": "q $X\n", "g": "dq\n", "h": "plain expanded\n"}


# --- a container's deep tree never becomes a layer's quadratic tar -----------------------------
# Each pass nests the chain one level deeper with short renames at /tmp (busybox's `cd` stops at
# PATH_MAX, renames do not): a chain of N 255-byte names is 6 + 256*N bytes deep.
DEEP_CHAIN = (
    "cd /tmp && mkdir d && i=0 && while [ $i -lt {n} ]; do "
    "mkdir x && mv d x/{name} && mv x d || exit 1; i=$((i+1)); done"
)


def _deep_chain(n: int) -> str:
    return DEEP_CHAIN.format(n=n, name="n" * 255)


def _sample_store(tmp_path: Path) -> Path:
    """A store holding the sample busybox image as `base`."""
    from unionfs.sample import build_sample, build_sample_oci

    layout = build_sample_oci(tmp_path / "oci", build_sample(tmp_path / "sample"))
    store = tmp_path / "store"
    r = subprocess.run(
        [*PYUNION, "image", "import", "-q", "--store", str(store), "-t", "base", layout],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    return store


@needs_fuse
@pytest.mark.timeout(120)
def test_a_run_step_deeper_than_path_max_is_one_line(tmp_path: Path) -> None:
    """A RUN step's tree is walked three times into a layer (prune, sockets, tar), and a
    tar names each entry by its whole path: a container's chain 20,000 deep cost 27 + 14 s
    and 440 MB in the walks, then 46 s and 2.9 GB writing 800 MB of names that the store
    refused. A path past PATH_MAX (which no extracting tool can make) now stops the step at
    the first such entry, in one line; one that fits is a layer as before."""
    store = _sample_store(tmp_path)
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "Containerfile").write_text(f"FROM base\nRUN {_deep_chain(15)}\n")
    r = _build(store, ctx, "-t", "fits")
    assert r.returncode == 0, r.stderr
    (ctx / "Containerfile").write_text(f"FROM base\nRUN {_deep_chain(16)}\n")
    t0 = time.monotonic()
    line = _one_line_error(_build(store, ctx, "-t", "deep"))
    assert time.monotonic() - t0 < 30
    assert "a path longer than 4095 bytes (PATH_MAX) has no place in a layer" in line, line
    assert os.listdir(store / "tmp") == []
    assert (
        "deep"
        not in subprocess.run(
            [*PYUNION, "images", "--store", str(store)], capture_output=True, text=True, timeout=30
        ).stdout
    )


@needs_fuse
@pytest.mark.timeout(120)
def test_commit_of_a_kept_upper_deeper_than_path_max_is_one_line(tmp_path: Path) -> None:
    """`pyunion commit` of the upper a container wrote (`run --upper`) walked the chain
    to its end and wrote the quadratic tar before the store refused it; now the first
    path past PATH_MAX stops it, in one line, nothing left in the store's tmp/."""
    store = _sample_store(tmp_path)
    upper = tmp_path / "upper"
    env = dict(os.environ, TMPDIR=str(tmp_path))
    for n, tag in ((15, "fits"), (16, "deep")):
        rmtree(str(upper))
        run = [*PYUNION, "run", "--store", str(store), "--upper", str(upper), "base"]
        r = subprocess.run(
            [*run, "--", "sh", "-c", _deep_chain(n)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            env=env,
        )
        assert r.returncode == 0, r.stderr
        commit = [*PYUNION, "commit", "--store", str(store), "-i", "base", "-t", tag, str(upper)]
        r = subprocess.run(commit, capture_output=True, text=True, timeout=60, check=False)
        if tag == "fits":
            assert r.returncode == 0, r.stderr
    line = _one_line_error(r)
    assert "a path longer than 4095 bytes (PATH_MAX) has no place in a layer" in line, line
    assert os.listdir(store / "tmp") == []


def _a_chain(top: Path, depth: int, opaque_at: int | None = None) -> None:
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    for i in range(depth):
        os.mkdir("a", 0o755, dir_fd=fd)
        nfd = os.open("a", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = nfd
        if i == opaque_at:
            os.setxattr(fd, "trusted.overlay.opaque", b"y")
    os.close(fd)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (trusted xattrs)")
@pytest.mark.timeout(120)
def test_pruning_a_deep_copied_up_chain_is_linear(tmp_path: Path) -> None:
    """A RUN step that changes something at the bottom of a deep tree of its base (which
    a hostile base image, or the step before, makes) copies every directory on the way
    up; pruning those, deepest first, walked every one from the top, in the upper and in
    each layer below: 88 s for 2,000 levels. Each directory is now looked at once."""
    from unionfs.build.layer import prune_upper

    low, up = tmp_path / "low", tmp_path / "up"
    low.mkdir()
    up.mkdir()
    try:
        _a_chain(low, 1500)
        _a_chain(up, 1500)
        t0 = time.monotonic()
        prune_upper(str(up), [str(low)])
        assert time.monotonic() - t0 < 15
        assert os.listdir(up) == []  # nothing changed: no layer
        _a_chain(up, 1500, opaque_at=700)  # under an opaque directory, nothing is a copy-up
        prune_upper(str(up), [str(low)])
        assert _depth(up, "a") == 1500
    finally:  # deeper than pytest's own clean-up can remove
        rmtree(str(low))
        rmtree(str(up))


# --- a context a user owns: no symlink of hers leads root's build out of it -------------------
def _as_user(who: tuple[int, int], *cmd: str, **kw: object) -> subprocess.Popen[str]:
    return subprocess.Popen(
        ["setpriv", f"--reuid={who[0]}", f"--regid={who[1]}", "--clear-groups", *cmd],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=str(Path(__file__).parent.parent),
        **kw,  # type: ignore[arg-type]
    )


def _she(who: tuple[int, int], script: str) -> None:
    p = _as_user(who, "sh", "-c", script)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 0, err


_EXCHANGE = r"""
import os, sys, time
from unionfs.syscalls import RENAME_EXCHANGE, renameat2
fd = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECTORY)
end, n = time.monotonic() + float(sys.argv[2]), 0
while time.monotonic() < end:
    renameat2(fd, b"ctx", fd, b"swap", RENAME_EXCHANGE)
    n += 1
    time.sleep(0.0005)
print(n)
"""


@needs_fuse
@pytest.mark.timeout(180)
def test_a_users_symlink_never_leads_roots_build_out_of_her_context(
    local_user: tuple[tuple[int, int], Path],
) -> None:
    """Root builds a context in a user's home. A symlink of hers in place of the context
    (or a parent), swapped in while root builds, or as the Containerfile (found there or
    named by `-f`), was followed: `COPY . /` put a root-only file (standing for
    /etc/shadow) into the layer, and a Containerfile -> it showed its first line in the
    error; `-f` her FIFO hung the build. Now the context and its Containerfile are
    resolved as root's other paths (`tree.open_trusted`: only root's and the caller's
    symlinks), the context once, into the fd every COPY reads from."""
    who, home = local_user
    t = home.parent
    victim, store = t / "victim", t / "store"
    victim.mkdir(mode=0o700)
    (victim / "shadow").write_text("root:SECRET-HASH:19000::::::\n")
    (victim / "Containerfile").write_text("FROM scratch\nCOPY . /\n")
    _she(
        who,
        f"mkdir {home}/ctx {home}/via"
        f" && printf 'FROM scratch\\nCOPY . /\\n' >{home}/ctx/Containerfile"
        f" && echo mine >{home}/ctx/mine && ln -s {victim} {home}/via/ctx && ln -s {t} {home}/up"
        f" && mkdir {home}/ctx2 && ln -s {victim}/shadow {home}/ctx2/Containerfile",
    )
    for args in (
        ("-f", str(home / "ctx/Containerfile"), str(home / "via/ctx")),
        (str(home / "via/ctx"),),
        ("-f", str(home / "ctx/Containerfile"), str(home / "up/victim")),
        (str(home / "ctx2"),),
        ("-f", str(home / "ctx2/Containerfile"), str(home / "ctx")),
    ):
        r = _build(store, Path(args[-1]), "-t", "leak", *args[:-1])
        assert "symlink owned by uid" in _one_line_error(r), r.stderr
        assert "SECRET" not in r.stderr + r.stdout
    # `-f` her FIFO: one line, not a build waiting for good; `-f <(...)`, root's pipe: read.
    _she(who, f"mkfifo {home}/fifo")
    r = _build(store, home / "ctx", "-f", str(home / "fifo"), timeout=20)
    assert "pipe or device of this user's" in _one_line_error(r)
    rfd, wfd = os.pipe()
    os.write(wfd, b"FROM scratch\nCOPY mine /\n")
    os.close(wfd)
    try:
        piped = ("-t", "piped", "-f", f"/dev/fd/{rfd}", str(home / "ctx"))
        r = subprocess.run(
            [*PYUNION, "build", "--store", str(store), *piped],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            pass_fds=(rfd,),
        )
    finally:
        os.close(rfd)
    assert r.returncode == 0 and os.listdir(_layer(store, "piped")) == ["mine"], r.stderr
    # The race: her context and `swap` (a symlink to the victim) exchanged while root builds.
    _she(who, f"ln -s {victim} {home}/swap")
    racer = _as_user(who, sys.executable, "-c", _EXCHANGE, str(home), "15")
    built = 0
    try:
        for i in range(10):
            r = _build(store, home / "ctx", "-t", f"race{i}")
            assert "SECRET" not in r.stderr + r.stdout
            if r.returncode != 0:  # her swap met: refused, or seen moving under the copy
                why = _one_line_error(r)
                assert "symlink owned by uid" in why or "moved while it was read" in why, why
                continue
            built += 1
            assert sorted(os.listdir(_layer(store, f"race{i}"))) == ["Containerfile", "mine"]
    finally:
        racer.kill()  # it ends by itself in 15 s; a failure above need not wait for it
        racer.communicate(timeout=60)
    print("built during the race:", built)


# --- a Containerfile's text reaches the terminal escaped ----------------------------------------
_CONTROLS = ("\x1b", "\x07", "\x9b")


@needs_fuse
@pytest.mark.timeout(120)
def test_a_containerfiles_escape_sequences_reach_the_terminal_escaped(tmp_path: Path) -> None:
    """A Containerfile from the internet, or an ONBUILD trigger of a base image, is text
    someone else wrote: `pyunion build` printed each step as written, so a LABEL holding
    `ESC ] 0 ; ... BEL` retitled the terminal (any sequence reached it: cleared lines,
    faked output), and so did the error naming a step that failed. Now printed as
    `history` shows them: `\\x1b`."""
    title = "\x1b]0;PWNED\x07"
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "Containerfile").write_text(
        f'FROM scratch\nLABEL a="{title}"\nENV B="\x1b[31mred"\nONBUILD LABEL c="{title}"\n'
    )
    r = _build(tmp_path / "s", ctx, "-t", "parent")
    assert r.returncode == 0, r.stderr
    assert not any(c in r.stdout + r.stderr for c in _CONTROLS), repr(r.stdout)
    assert 'LABEL a="\\x1b]0;PWNED\\x07"' in r.stdout, r.stdout
    # The trigger comes from the image: the child's Containerfile is plain.
    (ctx / "Containerfile").write_text(f'FROM parent\nRUN ["/nowhere{title}"]\n')
    r = _build(tmp_path / "s", ctx, "-t", "child")
    assert not any(c in r.stdout + r.stderr for c in _CONTROLS), repr(r.stdout + r.stderr)
    assert 'ONBUILD LABEL c="\\x1b]0;PWNED\\x07"' in r.stdout, r.stdout
    last = r.stderr.splitlines()[-1]
    assert r.returncode != 0 and 'STEP 2/2: RUN ["/nowhere\\x1b]0;PWNED\\x07"]' in last, last
