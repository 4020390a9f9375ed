"""Seccomp profiles for `pyunion run`: the containers' JSON format, evaluated and loaded.

A profile is the JSON podman and Docker take (`--security-opt seccomp=FILE`):
`defaultAction`, `defaultErrnoRet`, `archMap` (or the OCI runtime spec's
`architectures`), `flags`, and `syscalls`, each entry with `names`,
`action`, `errnoRet`, `args` and the `includes`/`excludes` conditions on
capabilities, architecture and kernel version. The default profile shipped
in `data/seccomp.json` is derived from containers/common's (see
`data/NOTICE`).

Three steps, in three processes, so that `pyunion run` pays for each at most once:

- `load_profile` (pyunion itself, before anything is mounted): read and check
  the JSON, keep the rules that apply to this container's capabilities, this
  architecture and this kernel. A bad profile is one line and exit 125.
- `program` (pyunion, while the daemon starts): import the libseccomp binding,
  add the rules and have libseccomp generate the BPF program
  (`seccomp_export_bpf`), or take the one it generated for the same filter
  before, kept in the private state directory.
- `install` (the container's init, and the command just before execve): load
  that program into the kernel with the flags libseccomp's `seccomp_load` uses.

The binding is pyseccomp: ctypes over the system's libseccomp2 with the same
API as libseccomp's own Python module, which is not on PyPI (Debian's
python3-seccomp is built for Debian's interpreter only). libseccomp does the
work that matters: syscall tables per architecture, argument comparisons,
the BPF program. Names libseccomp does not know are skipped, as runc does.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import struct
import time
from dataclasses import dataclass
from typing import Any

from . import caps
from .digits import number
from .errors import UserError
from .sha256 import sha256_hex
from .syscalls import (
    AT_FDCWD,
    SECCOMP_FILTER_FLAG_LOG,
    SECCOMP_FILTER_FLAG_SPEC_ALLOW,
    seccomp_set_filter,
)
from .tree import NotRegularFile, open_own_file, read_regular, replace_file

DEFAULT_PROFILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "seccomp.json")
MAX_PROFILE = 4 << 20
EPERM = 1

# libseccomp's action values (the kernel's SECCOMP_RET_*); ERRNO and TRACE carry a number.
ACTIONS = {
    "SCMP_ACT_KILL": 0x00000000,
    "SCMP_ACT_KILL_THREAD": 0x00000000,
    "SCMP_ACT_KILL_PROCESS": 0x80000000,
    "SCMP_ACT_TRAP": 0x00030000,
    "SCMP_ACT_ERRNO": 0x00050000,
    "SCMP_ACT_TRACE": 0x7FF00000,
    "SCMP_ACT_LOG": 0x7FFC0000,
    "SCMP_ACT_ALLOW": 0x7FFF0000,
}
WITH_NUMBER = {"SCMP_ACT_ERRNO", "SCMP_ACT_TRACE"}
OPS = {
    "SCMP_CMP_NE": 1,
    "SCMP_CMP_LT": 2,
    "SCMP_CMP_LE": 3,
    "SCMP_CMP_EQ": 4,
    "SCMP_CMP_GE": 5,
    "SCMP_CMP_GT": 6,
    "SCMP_CMP_MASKED_EQ": 7,
}
FLAGS = {"SECCOMP_FILTER_FLAG_TSYNC", "SECCOMP_FILTER_FLAG_LOG", "SECCOMP_FILTER_FLAG_SPEC_ALLOW"}

# uname's machine -> (libseccomp's name for the architecture, Go's name used in `arches`)
_MACHINES = {
    "x86_64": ("SCMP_ARCH_X86_64", "amd64"),
    "aarch64": ("SCMP_ARCH_AARCH64", "arm64"),
    "armv7l": ("SCMP_ARCH_ARM", "arm"),
    "armv6l": ("SCMP_ARCH_ARM", "arm"),
    "i686": ("SCMP_ARCH_X86", "x86"),
    "i386": ("SCMP_ARCH_X86", "x86"),
    "ppc64le": ("SCMP_ARCH_PPC64LE", "ppc64le"),
    "s390x": ("SCMP_ARCH_S390X", "s390x"),
    "riscv64": ("SCMP_ARCH_RISCV64", "riscv64"),
    "mips64": ("SCMP_ARCH_MIPS64", "mips64"),
}


class SeccompError(Exception):
    """The filter could not be built or loaded (no libseccomp, a rule it refused)."""


@dataclass(frozen=True)
class Rule:
    action: int
    name: str
    args: tuple[tuple[int, int, int, int], ...] = ()  # (index, op, value, valueTwo)


@dataclass(frozen=True)
class Filter:
    """A profile evaluated for one container: what `compile` turns into a filter."""

    default_action: int
    arches: tuple[str, ...]  # SCMP_ARCH_* besides the native one
    rules: tuple[Rule, ...]
    log: bool = False
    spec_allow: bool = False


# -- reading a profile (pyunion itself) ------------------------------------------------------
def _bad(path: str, what: str) -> UserError:
    return UserError(f"seccomp profile {path}: {what}", 125)


def _read(path: str) -> Any:
    from . import jsondoc  # here: the container's init imports this module and reads no profile

    try:
        # resolve="trusted": her symlink in her project could name root's laxer profile
        data = read_regular(AT_FDCWD, path, MAX_PROFILE, resolve="trusted")
    except NotRegularFile:
        raise _bad(path, "not a regular file") from None
    except OSError as e:
        if e.errno == errno.EFBIG:
            raise _bad(path, f"larger than {MAX_PROFILE >> 20} MiB") from e
        raise _bad(path, e.strerror or str(e)) from e
    try:
        return jsondoc.parse(data, "it")
    except jsondoc.JSONError as e:
        raise _bad(path, str(e).removeprefix("it is ")) from None


def _kernel() -> tuple[int, ...]:
    m = re.match(r"(\d+)\.(\d+)", os.uname().release)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def _version(path: str, v: object) -> tuple[int, ...]:
    # ASCII digits (re's \d takes every script's), read by the one rule (digits.number):
    # int() refused more than 4300 of them with a traceback.
    m = re.fullmatch(r"([0-9]+)\.([0-9]+)(\.[0-9]+)?", v) if isinstance(v, str) else None
    major, minor = (number(m.group(1)), number(m.group(2))) if m else (None, None)
    if major is None or minor is None:
        raise _bad(path, f"bad minKernel {v!r}")
    return major, minor


def _strings(path: str, v: object, what: str) -> list[str]:
    if v is None:
        return []
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise _bad(path, f"{what} must be a list of strings")
    return v


def _applies(path: str, entry: dict[str, Any], capnames: set[str], arch: str) -> bool:
    """The `includes`/`excludes` conditions of one entry, as containers/common reads them."""
    inc, exc = entry.get("includes") or {}, entry.get("excludes") or {}
    if not isinstance(inc, dict) or not isinstance(exc, dict):
        raise _bad(path, "includes/excludes must be objects")
    kernel = _kernel()
    if arch in _strings(path, exc.get("arches"), "excludes.arches"):
        return False
    if any(c in capnames for c in _strings(path, exc.get("caps"), "excludes.caps")):
        return False
    if exc.get("minKernel") and kernel >= _version(path, exc["minKernel"]):
        return False
    arches = _strings(path, inc.get("arches"), "includes.arches")
    if arches and arch not in arches:
        return False
    if not all(c in capnames for c in _strings(path, inc.get("caps"), "includes.caps")):
        return False
    return not (inc.get("minKernel") and kernel < _version(path, inc["minKernel"]))


def _action(path: str, name: object, number: object, default_number: int) -> int:
    if not isinstance(name, str) or name not in ACTIONS:
        raise _bad(path, f"unknown action {name!r}")
    value = ACTIONS[name]
    if name in WITH_NUMBER:
        n = default_number if number is None else number
        if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n <= 0xFFFF:
            raise _bad(path, f"bad errnoRet {number!r}")
        value |= n
    return value


def _args(path: str, raw: object) -> list[tuple[int, int, int, int]]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise _bad(path, "args must be a list")
    out = []
    for a in raw:
        if not isinstance(a, dict):
            raise _bad(path, "each of args must be an object")
        index, op = a.get("index"), a.get("op")
        value, two = a.get("value", 0), a.get("valueTwo", 0)
        if not (_uint(index, 5) and _uint(value, (1 << 64) - 1) and _uint(two, (1 << 64) - 1)):
            raise _bad(path, f"bad argument comparison {a!r}")
        assert isinstance(index, int) and isinstance(value, int) and isinstance(two, int)
        if op not in OPS:
            raise _bad(path, f"unknown comparison {op!r}")
        out.append((index, OPS[op], value, two))
    return out


def _uint(v: object, top: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= top


def native() -> tuple[str, str]:
    """(libseccomp's, Go's) name of this machine's architecture."""
    m = os.uname().machine
    return _MACHINES.get(m, ("SCMP_ARCH_" + m.upper(), m))


def load_profile(path: str | None, capset: frozenset[int]) -> Filter:
    """Read the profile at `path` (None: the default) and evaluate it for `capset`."""
    path = path or DEFAULT_PROFILE
    doc = _read(path)
    if not isinstance(doc, dict):
        raise _bad(path, "not a JSON object")
    scmp_arch, go_arch = native()
    capnames = {caps.name(c) for c in capset}
    default = _action(path, doc.get("defaultAction"), doc.get("defaultErrnoRet"), EPERM)
    arches: list[str] = []
    for entry in doc.get("archMap") or []:
        if not isinstance(entry, dict):
            raise _bad(path, "archMap entries must be objects")
        if entry.get("architecture") == scmp_arch:
            arches += _strings(path, entry.get("subArchitectures"), "subArchitectures")
    arches += [
        a for a in _strings(path, doc.get("architectures"), "architectures") if a != scmp_arch
    ]
    flags = _strings(path, doc.get("flags"), "flags")
    for flag in flags:
        if flag not in FLAGS:
            raise _bad(path, f"unknown flag {flag!r}")
    if doc.get("listenerPath"):
        raise _bad(path, "seccomp notification (listenerPath) is not supported")
    entries = doc.get("syscalls") or []
    if not isinstance(entries, list):
        raise _bad(path, "syscalls must be a list")
    rules: list[Rule] = []
    for entry in entries:
        if not isinstance(entry, dict):
            raise _bad(path, "each of syscalls must be an object")
        names = _strings(path, entry.get("names"), "names")
        if isinstance(entry.get("name"), str):
            names = [*names, entry["name"]]
        if not names:
            import json

            raise _bad(path, f"a syscalls entry without names: {json.dumps(entry)[:80]}")
        action = _action(path, entry.get("action"), entry.get("errnoRet"), EPERM)
        args = _args(path, entry.get("args"))
        if not _applies(path, entry, capnames, go_arch) or action == default:
            continue  # libseccomp refuses a rule that repeats the default action
        indexes = [a[0] for a in args]
        # Two comparisons of one argument are an OR (runc's reading): one rule each.
        groups = [[a] for a in args] if len(set(indexes)) < len(indexes) else [args]
        for name in names:
            for group in groups:
                rules.append(Rule(action, name, tuple(group)))
    return Filter(
        default,
        tuple(dict.fromkeys(arches)),
        tuple(rules),
        log="SECCOMP_FILTER_FLAG_LOG" in flags,
        spec_allow="SECCOMP_FILTER_FLAG_SPEC_ALLOW" in flags,
    )


# -- building and loading the filter (the container's init, then the command) -------------------
def _import_pyseccomp() -> Any:
    from .syscalls import import_with_sonames  # no `ldconfig -p` for libc and libseccomp

    return import_with_sonames("pyseccomp")


@dataclass(frozen=True)
class Program:
    """A filter as libseccomp generated it (`seccomp_export_bpf`), with the flags its
    `seccomp_load` passes to seccomp(2) for this filter's attributes.

    init and the command both load it: generated once, the BPF costs libseccomp's
    code generation once per container instead of once per process.
    """

    bpf: bytes
    flags: int


def compile(f: Filter) -> Program:
    """The filter's BPF program, made by libseccomp from every rule (not loaded yet)."""
    filt = _build(f)
    fd = os.memfd_create("pyunion-seccomp", os.MFD_CLOEXEC)
    try:
        with os.fdopen(os.dup(fd), "wb") as out:  # export_bpf writes to the fd
            filt.export_bpf(out)
        size = os.fstat(fd).st_size
        bpf = os.pread(fd, size, 0)
    except OSError as e:
        raise SeccompError(f"cannot build the seccomp filter: {e.strerror}") from e
    finally:
        os.close(fd)
    # seccomp_load's flags: no TSYNC (one thread), no listener (no NOTIFY action).
    flags = (SECCOMP_FILTER_FLAG_LOG if f.log else 0) | (
        SECCOMP_FILTER_FLAG_SPEC_ALLOW if f.spec_allow else 0
    )
    return Program(bpf, flags)


# -- the program, kept between containers -------------------------------------------------------
# libseccomp's part (import the binding, add the rules, generate the BPF) is ~40 ms of
# CPU on every container start. The program it made is kept in the state directory
# (private to the user, see mount.state_dir), named by a hash of everything it depends
# on: the filter, this module, libseccomp's version, the kernel and the architecture.
CACHE_MAGIC = b"pyunion seccomp program 1\n"
_FLAGS = struct.Struct("<I")
MAX_PROGRAM = 8 * 0xFFFF  # BPF programs are at most 65535 instructions of 8 bytes


def program(f: Filter, cache_fd: int | None) -> Program:
    """`compile(f)`, or the program compiled for the same filter before (`cache_fd`: the
    state directory, None for no cache)."""
    name = _cache_name(f) if cache_fd is not None else None
    if cache_fd is not None and name is not None:
        prog = _read_cached(cache_fd, name)
        if prog is not None:
            return prog
    prog = compile(f)
    if cache_fd is not None and name is not None:
        with contextlib.suppress(OSError):  # a full disk costs the next start, no more
            _write_cached(cache_fd, name, prog)
            _prune(cache_fd, name)
    return prog


def _libseccomp_version() -> str | None:
    """libseccomp's version (without the binding's import; None if it is missing)."""
    import ctypes

    from .syscalls import SONAMES

    class Version(ctypes.Structure):
        _fields_ = [("major", ctypes.c_uint), ("minor", ctypes.c_uint), ("micro", ctypes.c_uint)]

    try:
        lib = ctypes.CDLL(SONAMES["seccomp"])
    except OSError:
        return None
    lib.seccomp_version.restype = ctypes.POINTER(Version)
    v = lib.seccomp_version().contents
    return f"{v.major}.{v.minor}.{v.micro}"


def _cache_name(f: Filter) -> str | None:
    version = _libseccomp_version()
    if version is None:
        return None  # compile() says what is wrong
    me = os.stat(__file__)
    uname = os.uname()
    key = "\0".join(
        (repr(f), f"{me.st_mtime_ns}:{me.st_size}", version, uname.release, uname.version)
    )
    return f"seccomp-{uname.machine}-{sha256_hex(key.encode())[:32]}.bpf"


def _read_cached(dfd: int, name: str) -> Program | None:
    """The kept program, if it is ours, whole and sound; None otherwise (compile again)."""
    got = open_own_file(dfd, name)
    if got is None:
        return None
    fd, st = got
    try:
        head = len(CACHE_MAGIC) + _FLAGS.size
        if not head < st.st_size <= head + MAX_PROGRAM:
            return None
        data = os.pread(fd, st.st_size + 1, 0)
    except OSError:
        return None
    finally:
        os.close(fd)
    bpf = data[head:]
    if len(data) != st.st_size or not data.startswith(CACHE_MAGIC) or len(bpf) % 8:
        return None
    (flags,) = _FLAGS.unpack_from(data, len(CACHE_MAGIC))
    return Program(bpf, flags)


# Each pyunion version, kernel, libseccomp and profile makes a program of its own; a new
# one pushes the oldest out (one that is still used is made again, once: ~40 ms).
KEEP_PROGRAMS = 16


STALE_TMP_S = 60  # a program's temporary file older than this lost its writer (SIGKILL)


def _prune(dfd: int, keep: str) -> None:
    """Keep at most KEEP_PROGRAMS programs in the state directory, `keep` among them, and
    remove temporary files a killed writer left (`_write_cached`; written in milliseconds)."""
    kept = []
    for entry in os.listdir(dfd):
        if entry.startswith(".seccomp-"):
            with contextlib.suppress(OSError):
                st = os.stat(entry, dir_fd=dfd, follow_symlinks=False)
                if time.time() - st.st_mtime > STALE_TMP_S:
                    os.unlink(entry, dir_fd=dfd)
        elif entry.startswith("seccomp-") and entry.endswith(".bpf") and entry != keep:
            with contextlib.suppress(OSError):
                st = os.stat(entry, dir_fd=dfd, follow_symlinks=False)
                kept.append((st.st_mtime_ns, entry))
    kept.sort()
    for _, entry in kept[: max(0, len(kept) - (KEEP_PROGRAMS - 1))]:
        with contextlib.suppress(OSError):
            os.unlink(entry, dir_fd=dfd)


def _write_cached(dfd: int, name: str, prog: Program) -> None:
    """Under a fresh name, then renamed into place: a reader sees all of it or nothing."""
    replace_file(dfd, name, CACHE_MAGIC + _FLAGS.pack(prog.flags) + prog.bpf, 0o600)


def _build(f: Filter) -> Any:
    """A libseccomp filter context with every rule added."""
    try:
        sc = _import_pyseccomp()
    except (ImportError, RuntimeError) as e:  # RuntimeError: libseccomp.so not found
        raise SeccompError(
            f"cannot load libseccomp ({e}); install libseccomp2 or run with "
            "--security-opt seccomp=unconfined"
        ) from e
    try:
        filt = sc.SyscallFilter(f.default_action)
        filt.set_attr(sc.Attr.CTL_NNP, 0)  # no_new_privs only when asked for
        if f.log:
            filt.set_attr(sc.Attr.CTL_LOG, 1)
        if f.spec_allow:
            filt.set_attr(sc.Attr.CTL_SSB, 1)
        for arch in f.arches:
            token = getattr(sc.Arch, arch.removeprefix("SCMP_ARCH_"), None)
            if token is not None and not filt.exist_arch(token):
                filt.add_arch(token)
    except OSError as e:
        raise SeccompError(f"cannot set up the seccomp filter: {e.strerror}") from e
    for rule in f.rules:
        nr = sc.resolve_syscall(sc.Arch.NATIVE, rule.name)
        if nr == -1:  # __NR_SCMP_ERROR: a name this libseccomp does not know
            continue
        try:
            filt.add_rule(rule.action, nr, *(sc.Arg(i, op, a, b) for i, op, a, b in rule.args))
        except OSError as e:
            raise SeccompError(f"seccomp rejected the rule for {rule.name}: {e.strerror}") from e
    return filt


def install(prog: Program) -> None:
    """Load the filter into this process (needs CAP_SYS_ADMIN or no_new_privs)."""
    try:
        seccomp_set_filter(prog.flags, prog.bpf)
    except OSError as e:
        raise SeccompError(f"cannot load the seccomp filter: {e.strerror}") from e
