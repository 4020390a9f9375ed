"""The read-only merged view against kernel overlayfs, on stacks of layers made by hypothesis.

Each generated stack is written twice: as generated (OCI `.wh.` files, AUFS
metadata, user.overlay/fuseoverlayfs opaque xattrs, `.wh..opq` devices, xattr
whiteouts, kernel whiteouts, all mixed) and converted to the kernel format.
Kernel overlayfs mounts the converted one; pyunion mounts both; the three
views must be equal in everything a snapshot records (see oracle.py),
including which names share an inode. pyunion must also give readdir d_ino
equal to st_ino and EINVAL for names starting with `.wh.`.

PYUNION_EXAMPLES=N runs N examples (of up to four stacks each) instead of the default.
"""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

import oracle as o
import pytest
from hypothesis import given
from hypothesis import strategies as st
from support import kernel_overlay, kernel_overlay_skip_reason, pyunion_mount

pytestmark = pytest.mark.skipif(
    kernel_overlay_skip_reason() is not None, reason=kernel_overlay_skip_reason() or ""
)


def _views(stacks: list[list[o.Dir]], td: Path) -> tuple[o.Snapshot, o.Snapshot, o.Snapshot]:
    raw = o.build_batch(td / "raw", stacks, kernel=False)
    conv = o.build_batch(td / "conv", stacks, kernel=True)
    if len(raw) == 1:
        # A read-only kernel mount needs two layers: both get the same empty second
        # one (with it the root is merged, and its st_nlink is 1).
        for layers in (raw, conv):
            layers.append(layers[0].parent / "empty")
            layers[-1].mkdir()
    with kernel_overlay(conv, td / "mk") as mk:
        kernel = o.snapshot(mk)
    with pyunion_mount(raw, td / "mp") as mp:
        mine = o.snapshot(mp)
        _check_identity_and_names(mp, mine)
    with pyunion_mount(conv, td / "mc") as mc:
        mine_conv = o.snapshot(mc)
        _check_identity_and_names(mc, mine_conv)
    return kernel, mine, mine_conv


def _check_identity_and_names(mnt: Path, snap: o.Snapshot) -> None:
    assert not snap.ghosts, f"readdir lists names that lstat cannot find: {snap.ghosts}"
    bad = o.dino_mismatches(snap)
    assert not bad, "readdir d_ino != st_ino:\n  " + "\n  ".join(bad)
    dirs = [p for p, e in snap.entries.items() if e.kind == "dir"][:3]
    for d in dirs:
        for name in (".wh.a", ".wh..wh..opq", ".wh..opq", ".wh..wh.aufs"):
            p = mnt / d / name
            with pytest.raises(OSError) as ei:
                os.lstat(p)
            assert ei.value.errno == errno.EINVAL, f"lstat {p}: {ei.value}"


@o.settings_for(90)
@given(stacks=st.lists(o.stack_st(), min_size=1, max_size=4))
def test_read_view_matches_kernel(stacks: list[list[o.Dir]]) -> None:
    """Each example is up to four independent stacks (the first at the layer roots, the
    others in subdirectories s1, s2, ...), so that one mount tests several."""
    with tempfile.TemporaryDirectory(prefix="pyunion-dread-") as t:
        td = Path(t)
        try:
            kernel, mine, mine_conv = _views(stacks, td)
        finally:
            o.rmtree(td)
    o.assert_same(kernel, mine_conv, "kernel vs pyunion, both on kernel-format layers")
    # AUFS metadata directories (.wh..wh.plnk) never show, but a directory of one layer
    # shows its own st_nlink, which counts them (docs/semantics.md).
    aufs = any(layer.aufs for stack in stacks for layer in stack)
    o.assert_same(
        kernel,
        mine,
        "kernel on kernel-format layers vs pyunion on the layers "
        "as generated (OCI and other formats)",
        ignore=("dirlinks",) if aufs else (),
    )


def test_read_only_mount_refuses_writes(tmp_path: Path) -> None:
    lower = tmp_path / "l"
    lower.mkdir()
    (lower / "f").write_text("x")
    (lower / "d").mkdir()
    with pyunion_mount([lower], tmp_path / "m") as m:

        def opens(path: Path, flags: int) -> None:
            os.close(os.open(path, flags, 0o644))

        for op in (
            lambda: opens(m / "f", os.O_WRONLY | os.O_APPEND),
            lambda: opens(m / "new", os.O_WRONLY | os.O_CREAT),
            lambda: os.mkdir(m / "e"),
            lambda: os.unlink(m / "f"),
            lambda: os.chmod(m / "f", 0o600),
            lambda: os.rename(m / "f", m / "g"),
            lambda: os.setxattr(m / "f", "user.x", b"1"),
            lambda: os.rmdir(m / "d"),
        ):
            with pytest.raises(OSError) as ei:
                op()
            assert ei.value.errno == errno.EROFS, ei.value
        assert (m / "f").read_text() == "x"


def test_big_directories_and_odd_names_match_kernel(tmp_path: Path) -> None:
    """Listings that take many readdir calls, names of 255 bytes, and names with
    characters that paths and option strings treat specially."""
    odd = [
        "sp ace",
        "new\nline",
        "colon:x",
        "back\\slash",
        "comma,y",
        "ü-ñ-✓",
        "-dash",
        "x" * 255,
        "y" * 251,
        "%s",
        "...",
    ]
    stacks = []
    for fmt in (False, True):
        top = [(f"f{i:04d}", o.File(b"top", o.Meta(0o644))) for i in range(0, 1500, 2)]
        top += [
            (n, o.File(n.encode("utf-8", "surrogateescape")[:10], o.Meta(0o600))) for n in odd[:4]
        ]
        bottom = [(f"f{i:04d}", o.File(b"bottom", o.Meta(0o644))) for i in range(1500)]
        bottom += [(n, o.Symlink(n)) for n in odd]
        hidden = (*tuple(f"f{i:04d}" for i in range(1, 600, 4)), "y" * 251, "sp ace x")
        if fmt:
            upper = o.Dir(tuple(top), o.Meta(0o755), oci_whiteouts=hidden)
        else:
            upper = o.Dir(tuple(top) + tuple((n, o.Whiteout()) for n in hidden), o.Meta(0o755))
        stacks.append([upper, o.Dir(tuple(bottom), o.Meta(0o755))])
    with tempfile.TemporaryDirectory(prefix="pyunion-dread-") as t:
        td = Path(t)
        kernel, mine, mine_conv = _views(stacks, td)
    assert len(kernel.entries) > 2500
    o.assert_same(kernel, mine_conv, "kernel vs pyunion, both on kernel-format layers")
    o.assert_same(kernel, mine, "kernel vs pyunion on OCI-format layers")
