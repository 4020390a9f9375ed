"""JSON from outside: one strict parser (`unionfs.jsondoc`) for every document, and each
place that reads one says what was wrong in one line."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.support import pyunion
from unionfs import jsondoc
from unionfs.build.cache import BuildCache
from unionfs.image.store import Store

DEEP = "[" * 100_000


def _one_line(r: subprocess.CompletedProcess[str], said: str) -> None:
    assert r.returncode != 0, r.stdout
    assert said in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize(
    ("data", "said"),
    [
        (DEEP, "nested too deeply"),
        (b"[" * 100_000, "nested too deeply"),
        ("NaN", "not valid JSON"),
        ('{"a": Infinity}', "not valid JSON"),
        ("1e999", "not valid JSON"),  # out of range: no float('inf') sneaks in
        (b'"\xff"', "not valid JSON"),  # not UTF-8
        ('{"a": 1', "not valid JSON"),
        ("", "not valid JSON"),
    ],
)
def test_bad_documents_are_one_error_naming_them(data: str | bytes, said: str) -> None:
    with pytest.raises(jsondoc.JSONError) as e:
        jsondoc.parse(data, "the thing")
    assert str(e.value).startswith("the thing ") and said in str(e.value)


def test_good_documents_are_plain_values() -> None:
    doc = {"a": [1, 2.5, "x", None, True], "b": {"c": "\u00e9"}}
    assert jsondoc.parse(json.dumps(doc), "d") == doc
    assert jsondoc.parse(json.dumps(doc).encode(), "d") == doc
    assert jsondoc.parse("[" * 200 + "]" * 200, "d") is not None  # real nesting is fine
    assert jsondoc.parse_object(b"{}", "d") == {}
    with pytest.raises(jsondoc.JSONError, match="is not a JSON object"):
        jsondoc.parse_object(b"[]", "d")


def test_deep_json_on_the_command_line_is_one_line(tmp_path: Path) -> None:
    upper = tmp_path / "upper"
    upper.mkdir()
    Store(str(tmp_path / "s"))
    r = pyunion(
        "commit", "--store", str(tmp_path / "s"), "-i", "x", "--cmd", DEEP, str(upper), check=False
    )
    _one_line(r, "--cmd is nested too deeply")


def test_deep_json_in_a_seccomp_profile_is_one_line(tmp_path: Path) -> None:
    prof = tmp_path / "deep.json"
    prof.write_text(DEEP)
    r = pyunion(
        "run", "--security-opt", f"seccomp={prof}", str(tmp_path), "--", "true", check=False
    )
    _one_line(r, f"seccomp profile {prof}: nested too deeply")
    assert r.returncode == 125


def test_a_deep_build_cache_entry_is_dropped(tmp_path: Path) -> None:
    """The cache is the store's own file, but a damaged or planted entry is a miss, not a
    traceback, and is removed."""
    cache = BuildCache(Store(str(tmp_path / "s")))
    Path(cache.dir).mkdir(parents=True)
    entry = Path(cache._path("k"))
    entry.write_text(DEEP)
    assert cache.get("k") is None
    assert not entry.exists()
