"""An image that repeats a layer (the same DiffID at two places) runs and is built upon.

Old Docker Hub images repeat the empty layer, and two identical `COPY` steps make
the same layer twice. A mount refuses one directory twice, as the kernel does, so
the layer list made from an image keeps each layer at its topmost place only
(`Store.lower_dirs`): the same tree, checked here against kernel overlayfs over
the full list (with a copy standing in for the repeated layer).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from support import force_unmount, kernel_overlay, kernel_overlay_skip_reason, pyunion, tree_view
from test_image import make_layout, tar_bytes

from unionfs.image import Store, import_image, resolve_layers

A = [
    ("d", "dir"),
    ("d/a", b"a from A"),
    ("d/shared", b"shared from A"),
    ("gone", b"removed by B, back with A"),
    ("o", "dir"),
    ("o/kept", b"A's, under B's opaque o"),
    ("x", b"x from A"),
]
B = [
    ("d", "dir"),
    ("d/.wh.a", b""),
    ("d/shared", b"shared from B"),
    ("d/b", b"b from B"),
    (".wh.gone", b""),
    ("o", "dir"),
    ("o/.wh..wh..opq", b""),
    ("o/b", b"B's"),
]


def test_repeated_layer_is_listed_once_topmost(tmp_path: Path) -> None:
    s = Store(str(tmp_path / "store"))
    a, b = tar_bytes(A), tar_bytes(B)
    import_image(str(make_layout(tmp_path / "lay", [a, b, a, b])), s, tag="rep")
    got = resolve_layers("rep", s.root)
    img = s.lookup("rep")
    da, db = (s.layer_path(d) for d in img.diff_ids[:2])
    assert got == [db, da]  # B on top (its topmost place), then A


@pytest.mark.skipif(kernel_overlay_skip_reason() is not None, reason="needs kernel overlayfs")
def test_an_image_that_repeats_a_layer_mounts_as_the_kernel_shows_it(tmp_path: Path) -> None:
    """A over B over A: the mount of the image name (before: "layer X and layer X are
    the same directory") shows what kernel overlayfs shows over A, B and a copy of A."""
    s = Store(str(tmp_path / "store"))
    a, b = tar_bytes(A), tar_bytes(B)
    import_image(str(make_layout(tmp_path / "lay", [a, b, a])), s, tag="rep")
    img = s.lookup("rep")
    la, lb = (Path(s.layer_path(d)) for d in img.diff_ids[:2])
    copy = tmp_path / "a-copy"
    subprocess.run(["cp", "-a", str(la), str(copy)], check=True, timeout=30)
    with kernel_overlay([la, lb, copy], tmp_path / "kmnt") as kmnt:
        want = tree_view(kmnt)
    assert want[b"gone"] and want[b"d/a"] and b"o/kept" in want  # A shows again over B
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    pyunion("mount", "--store", s.root, "rep", str(mnt), timeout=60)
    try:
        assert tree_view(mnt) == want
    finally:
        pyunion("umount", str(mnt), check=False, timeout=30)
        force_unmount(mnt)
    # Layers a user lists are taken as given: one directory twice is still refused.
    r = pyunion("mount", str(la), str(lb), str(la), str(mnt), check=False, timeout=30)
    assert r.returncode != 0 and "same directory" in r.stderr, r.stderr


def test_a_build_that_repeats_a_layer_is_built_upon(tmp_path: Path) -> None:
    """Two identical COPY steps make one layer twice; a later build FROM it runs."""
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "f").write_text("a\n")
    store = str(tmp_path / "store")
    (ctx / "Containerfile").write_text("FROM scratch\nCOPY f /x\nCOPY f /x\n")
    pyunion("build", "-q", "--store", store, "-t", "dup", str(ctx), timeout=120)
    (ctx / "Containerfile").write_text("FROM dup\nCOPY f /y\n")
    pyunion("build", "-q", "--store", store, "-t", "dup2", str(ctx), timeout=120)
    img = Store(store).lookup("dup2")
    assert len(img.diff_ids) == 3 and img.diff_ids[0] == img.diff_ids[1]
    assert len(resolve_layers("dup2", store)) == 2
