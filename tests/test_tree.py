"""tree.rmtree_at / walk_at: deep trees, symlinks, read-only dirs; no recursion, no escape."""

from __future__ import annotations

import os

import pytest

from unionfs.tree import rmtree, rmtree_at, walk_at


def _deep(root: str, depth: int) -> None:
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    for i in range(depth):
        os.mkdir("d", dir_fd=fd)
        with open(os.open("f", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=fd), "w") as f:
            f.write(str(i))
        nfd = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = nfd
    os.close(fd)


def test_rmtree_deeper_than_recursion_and_fd_limits(tmp_path) -> None:  # type: ignore[no-untyped-def]
    top = tmp_path / "top"
    top.mkdir()
    _deep(str(top), 3000)
    assert len(walk_at(os.open(str(top), os.O_RDONLY | os.O_DIRECTORY))) == 6000
    rmtree(str(top))
    assert not top.exists()


def test_rmtree_never_follows_symlinks(tmp_path) -> None:  # type: ignore[no-untyped-def]
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious").write_text("x")
    top = tmp_path / "top"
    (top / "a").mkdir(parents=True)
    (top / "a" / "link").symlink_to(outside)
    (top / "link").symlink_to(outside / "precious")
    fd = os.open(str(tmp_path), os.O_RDONLY | os.O_DIRECTORY)
    try:
        rmtree_at(fd, "top")
    finally:
        os.close(fd)
    assert not top.exists() and (outside / "precious").read_text() == "x"


def test_rmtree_of_a_symlink_removes_only_the_link(tmp_path) -> None:  # type: ignore[no-untyped-def]
    outside = tmp_path / "outside"
    (outside / "sub").mkdir(parents=True)
    (tmp_path / "top").symlink_to(outside)
    rmtree(str(tmp_path / "top"))
    assert not os.path.lexists(tmp_path / "top") and (outside / "sub").is_dir()


def test_rmtree_read_only_dirs(tmp_path) -> None:  # type: ignore[no-untyped-def]
    top = tmp_path / "top"
    (top / "a" / "b").mkdir(parents=True)
    (top / "a" / "b" / "f").write_text("x")
    os.chmod(top / "a" / "b", 0o555)
    os.chmod(top / "a", 0o555)
    rmtree(str(top))
    assert not top.exists()


def test_rmtree_missing(tmp_path) -> None:  # type: ignore[no-untyped-def]
    rmtree(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError):
        rmtree(str(tmp_path / "nope"), missing_ok=False)
