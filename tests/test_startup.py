"""Start-up: each command builds only its own parser, and the client path of `run` and
`mount` stays free of the daemon's and the image tools' heavy imports."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
from ocilayout import LAYER_TAR, Layout, sha
from support import PYUNION, python_output

from unionfs import __version__, cli
from unionfs.image import Store, import_image


def test_subcommand_table_names_what_each_module_registers() -> None:
    for mod, names in cli.SUBCOMMANDS.items():
        parser = argparse.ArgumentParser()
        sub = parser.add_subparsers()
        importlib.import_module(mod).register(sub)
        registered = {n for n in sub.choices if n not in ("unmount",)}
        assert registered == set(names), mod


def test_version_is_printed_without_building_the_parser() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "unionfs", "--version"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert r.stdout == f"pyunion {__version__}\n"


def test_run_and_mount_parsers_skip_heavy_modules() -> None:
    code = (
        "import sys; from unionfs import cli; "
        "cli.build_parser(modules=['unionfs.run']).parse_args(['run', 'x', 'true']); "
        "cli.build_parser(extra=False).parse_args(['mount', 'a', 'b']); "
        "heavy = [m for m in ('trio', 'pyfuse3', 'httpx', 'tqdm', 'unionfs.image.load', "
        "'unionfs.image.commit', 'unionfs.image.export', 'unionfs.registry.client') "
        "if m in sys.modules]; print(' '.join(heavy))"
    )
    out = python_output(code)
    assert out.strip() == ""


def test_the_caller_of_mount_loads_neither_logging_nor_inspect(tmp_path: Path) -> None:
    """Its process only checks the request and hands a daemon the mount: logging (set up
    when something imports it) and inspect (imported by dataclasses, lazy here) are ~6 ms
    of every mount. Bad input is still one line."""
    code = (
        "import sys, types; from unionfs import cli; "
        f"code = cli.main(['mount', '-o', 'lowerdir={tmp_path}/missing', '{tmp_path}']); "
        "loaded = [m for m in ('logging', 'inspect') "
        "if type(sys.modules.get(m)) is types.ModuleType]; "
        "print(code, ' '.join(loaded))"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert r.stdout.split() == ["1"], r.stderr
    assert r.stderr == f"pyunion: layer '{tmp_path}/missing' does not exist\n"


def test_when_imported_runs_every_callback_once_in_order_and_leaves() -> None:
    code = (
        "import sys; from unionfs.lazyimport import when_imported; seen = []; "
        "when_imported('json', lambda m: seen.append(('a', m.__name__))); "
        "when_imported('json', lambda m: seen.append(('b', m.dumps([1])))); "
        "assert not seen; import json, json.decoder; import json; "
        "when_imported('json', lambda m: seen.append(('c', m is json))); "
        "left = [f for f in sys.meta_path if type(f).__name__ == '_WhenImported']; "
        "print(seen, left)"
    )
    assert python_output(code).strip() == "[('a', 'json'), ('b', '[1]'), ('c', True)] []"


def test_a_mount_in_the_foreground_still_logs_its_debug_lines(tmp_path: Path) -> None:
    """-d: logging is set up when it is imported, before its first line."""
    r = subprocess.run(
        [*PYUNION, "mount", "-d", "-o", f"lowerdir={tmp_path}/missing,noatime", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert r.returncode == 1
    assert "unionfs.options DEBUG: ignoring mount option 'noatime'" in r.stderr


def test_parsing_a_mount_never_imports_shutil() -> None:
    """argparse imports shutil for the terminal's width each time it makes a formatter, as
    it does for every argument it adds: ~2 ms of every mount (`cli._help_width`)."""
    code = (
        "import sys, types; from unionfs import cli; "
        "cli.build_parser(extra=False).parse_args(['mount', 'a', 'b']); "
        "print(type(sys.modules.get('shutil')) is types.ModuleType)"
    )
    assert python_output(code).strip() == "False"


@pytest.mark.parametrize("columns", [None, "50", "200", "0", "x"])
def test_help_keeps_argparse_own_width(
    columns: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    if columns is None:
        monkeypatch.delenv("COLUMNS", raising=False)
    else:
        monkeypatch.setenv("COLUMNS", columns)
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for p in (parser, sub.choices["mount"], sub.choices["run"]):
        ours = p.format_help()
        p.formatter_class = argparse.HelpFormatter  # argparse's own, width from shutil
        assert ours == p.format_help()


def test_unknown_command_still_lists_every_command() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "unionfs", "nosuchcommand"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert r.returncode == 2
    for names in cli.SUBCOMMANDS.values():
        for name in names:
            assert name in r.stderr


def test_image_package_names_the_functions_whatever_was_imported_first() -> None:
    """`unionfs.image.commit` stays the function once its submodule is imported (lazily)."""
    code = (
        "import unionfs.image.commit; from unionfs.image import Changes, commit, "
        "export_image, import_image; import unionfs.image as i; "
        "print(all(callable(f) and not isinstance(f, type(i)) "
        "for f in (commit, i.commit, export_image, import_image)))"
    )
    out = python_output(code)
    assert out.strip() == "True"


def _image_store(tmp_path: Path) -> Path:
    """A store holding one image, `img`, of one empty layer (Env A=1)."""
    lay = Layout(tmp_path / "oci")
    layer = lay.put(b"\0" * 1024, LAYER_TAR)
    lay.tag(lay.image([layer], [sha(b"\0" * 1024)], {"config": {"Env": ["A=1"]}}), "t")
    store = tmp_path / "store"
    import_image(str(tmp_path / "oci"), Store(str(store)), tag="img")
    return store


def test_reading_the_image_to_run_needs_no_openssl_json_logging_or_tempfile(
    tmp_path: Path,
) -> None:
    """What `run` reads in its short-lived child (`run._confinement_and_image`: the image
    and the seccomp profile) imports none of hashlib (OpenSSL's libcrypto: ~4.5 MiB read
    from a cold disk on every start), json, logging or tempfile (shutil, bz2, lzma); the
    store checks a blob's SHA-256 with CPython's own."""
    store = _image_store(tmp_path)
    code = (
        "import sys; from unionfs import cli, confine, run\n"
        "args = cli.build_parser(modules=['unionfs.run']).parse_args(\n"
        f"    ['run', '--store', {str(store)!r}, 'img', '--', 'true'])\n"
        "opts = run.parse_run_args(args)\n"
        "confine.from_options([], [], False, [], 0)\n"
        "layers, config = run.resolve_image(opts)\n"
        "print(len(layers), config['Env'], [m for m in ('hashlib', '_hashlib', 'json', "
        "'logging', 'tempfile', 'shutil', 'bz2', 'lzma') if m in sys.modules])"
    )
    assert python_output(code).strip() == "1 ['A=1'] []"


# What the program has imported when it forks the daemon-to-be (`cli._main`).
_AT_THE_FORK = (
    "import sys\n"
    "from unionfs import cli, lazyimport, prefork, rlimits\n"
    "lazyimport.defer()\n"
    "before = set(sys.modules)\n"
)


def _not_prefetched(run: bool) -> str:
    """Code printing the modules imported since, whose files the prefetch of a cold start
    of `run` (else `mount`) did not name."""
    return _NOT_PREFETCHED.replace("RUN", str(run))


_NOT_PREFETCHED = (
    "from importlib.util import cache_from_source\n"
    "from unionfs import prefetch\n"
    "files = set(prefetch.start_files(RUN))\n"
    "def named(m):  # or not loaded (lazyimport: a lazy module is of a subclass)\n"
    "    if type(m) is not type(sys):\n"
    "        return True\n"
    "    origin = getattr(getattr(m, '__spec__', None), 'origin', None)\n"
    "    if not isinstance(origin, str) or not origin.startswith('/'):\n"
    "        return True\n"
    "    if origin.endswith('.py'):\n"
    "        return bool({cache_from_source(origin), cache_from_source(origin, optimization=2)}"
    " & files)\n"
    "    return origin in files\n"
    "print(sorted(n for n in set(sys.modules) - before if not named(sys.modules[n])))\n"
)


def test_a_cold_start_prefetches_every_module_the_daemon_imports() -> None:
    """`prefetch.start` names the files of what the daemon-to-be imports after its fork
    (`prefork.Prefork`, `mount._preload`), for `mount` too: each one left out is a round
    trip to a cold disk on the start's longest path."""
    code = (
        _AT_THE_FORK
        + "lazyimport.defer(lazyimport.DAEMON_ONLY)\n"
        + "from unionfs import mount\n"
        + "mount._preload()\n"
        + _not_prefetched(run=False)
    )
    assert python_output(code).strip() == "[]"


def test_a_cold_start_prefetches_every_module_run_imports(tmp_path: Path) -> None:
    """... and of what `run` and its image-reading child import after that fork."""
    store = _image_store(tmp_path)
    code = (
        _AT_THE_FORK
        + "from unionfs import confine, run, sandbox\n"
        + "args = cli.build_parser(modules=['unionfs.run']).parse_args(\n"
        + f"    ['run', '--store', {str(store)!r}, 'img', '--', 'true'])\n"
        + "opts = run.parse_run_args(args)\n"
        + "confine.from_options([], [], False, [], 0)\n"
        + "run.resolve_image(opts)\n"
        + _not_prefetched(run=True)
    )
    assert python_output(code).strip() == "[]"


def test_daemon_preload_skips_metadata_and_ldconfig() -> None:
    """A daemon's imports (`mount._preload`) leave out importlib.metadata (pyfuse3 reads
    its own version with it) and `ldconfig -p` (trio's find_library), and pyfuse3 still
    knows its version."""
    from importlib.metadata import version

    code = (
        "import ctypes.util, sys\n"
        "def no(name): raise AssertionError('find_library ' + name)\n"
        "ctypes.util._findSoname_ldconfig = no\n"
        "from unionfs import mount; mount._preload(); import pyfuse3\n"
        "print('importlib.metadata' in sys.modules, pyfuse3.__version__)"
    )
    out = python_output(code)
    assert out.split() == ["False", version("pyfuse3")]


def _processes_naming(marker: str) -> list[int]:
    """Live processes whose command line holds `marker` (a fork keeps its parent's)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError), open(f"/proc/{entry}/cmdline", "rb") as f:
                if marker.encode() in f.read():
                    found.append(int(entry))
    return found


@pytest.mark.skipif(os.geteuid() != 0, reason="the daemon is forked first thing for root only")
def test_the_daemon_is_forked_before_socket_signal_or_enum_are_imported(tmp_path: Path) -> None:
    """The daemon-to-be is forked on `_socket` alone: `socket` and `signal` (and their
    enums) are imported after the fork, by each side that uses them (~3 ms sooner)."""
    out = tmp_path / "at-fork"
    code = (
        "import os, sys\n"
        "real = os.fork\n"
        "def fork():\n"
        f"    with open({str(out)!r}, 'a') as f:\n"
        "        f.write(repr([m for m in ('enum', 'signal', 'socket') if m in sys.modules]))\n"
        "    return real()\n"
        "os.fork = fork\n"
        f"sys.argv = ['pyunion', 'run', {str(tmp_path / 'missing')!r}, '--', 'true']\n"
        "from unionfs import cli\n"
        "cli.main()\n"
    )
    r = subprocess.run(
        [sys.executable, "-I", "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert r.returncode != 0 and r.stderr.startswith("pyunion: "), r.stderr
    assert out.read_text().startswith("[]"), out.read_text()


@pytest.mark.skipif(os.geteuid() != 0, reason="the daemon is forked first thing for root only")
def test_a_daemon_forked_first_and_never_used_goes_with_the_program(tmp_path: Path) -> None:
    """`run` and `mount` fork their daemon before parsing anything (`prefork.start_early`);
    a bad request still gets its one line, and the daemon-to-be is gone (killed and
    reaped: it never mounted anything) by the time the program has exited."""
    marker = str(tmp_path / "no-such-layer-for-the-early-daemon")
    for args in (["run", marker, "--", "true"], ["mount", marker, str(tmp_path)]):
        r = subprocess.run(
            [*PYUNION, *args], capture_output=True, text=True, timeout=60, check=False
        )
        assert r.returncode != 0 and r.stderr.startswith("pyunion: "), r.stderr
        assert r.stderr.count("\n") == 1, r.stderr
        assert _processes_naming(marker) == []
        # Refused by the parser, before the command could take its daemon.
        r = subprocess.run(
            [*PYUNION, args[0], "--no-such-option", *args[1:]],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        usage_error = 125 if args[0] == "run" else 2  # run's is podman's
        assert r.returncode == usage_error and "--no-such-option" in r.stderr, r.stderr
        assert _processes_naming(marker) == []
