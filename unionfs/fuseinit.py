"""What pyfuse3 does not ask the kernel for: symlinks' targets and listings kept.

Without FUSE_CACHE_SYMLINKS the kernel asks the daemon for a symlink's target on
every path walk through it: a `chroot . true` on a warm mount is 13 requests, 4 of
them READLINKs (`/lib64`, `/lib` twice, ld.so's link). With it the target is kept in
the symlink inode's page cache, for as long as the kernel keeps the inode. pyfuse3
(3.5) offers no way to ask for it, but its INIT handler calls the file system's
`init()` (`FuseOps.init`) before libfuse builds the answer from the session's
`conn.want`. That `struct fuse_conn_info` is reached through pyfuse3's module-level
`session` pointer, a local symbol of its extension (`SESSION_SYMBOL`, in the file's
ELF symbol table, read here with pread), and found inside libfuse's session by its
shape: proto_major 7, a proto_minor, max_write, max_read, max_readahead, capable,
want, where pyfuse3 has already asked for READDIRPLUS and cleared READDIRPLUS_AUTO.
No symbol (a stripped build), a load address not found, not exactly one place of
that shape, a kernel that does not offer the capability: nothing is written, and
the mount works as before (`want` says why). The process's memory is read and
written through /proc/self/mem, so a wrong address is an error, never a crash.

Why caching is safe: the kernel keeps a target per inode (node id and generation),
and a symlink's target never changes in place. A new target is a new object: a new
upper inode, whose node id is never one the kernel still holds for another object
(`Identity.new_upper_node`; `InodeTable.replace` gives a new generation where an id
does go to another object). The same rule already keeps a file's page cache right.

Listings (`keep_listings`): a directory opened with FOPEN_CACHE_DIR | FOPEN_KEEP_CACHE
is listed once into the kernel's readdir cache (the directory's page cache) and read
from there after, until the directory changes: the kernel drops it when a change
through the mount touches the directory (create, unlink, rename, link: its i_version)
or its mtime is not the one cached, as kernel overlayfs keeps a merged directory's
listing until its version changes. pyfuse3 sets neither flag; its OPENDIR handler is
wrapped to set them. Only the daemon's own changes are unseen by the kernel, and none
of them adds, removes or retypes a name (a copy-up, the links of a copied-up hard
link), so a kept listing stays true.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import struct
from collections.abc import Callable, Iterator

from .syscalls import SONAMES

FUSE_CAP_READDIRPLUS = 1 << 13  # libfuse's fuse_common.h: pyfuse3 requires it
FUSE_CAP_READDIRPLUS_AUTO = 1 << 14  # pyfuse3 clears it from want
FUSE_CAP_CACHE_SYMLINKS = 1 << 23
SESSION_SYMBOL = b"__pyx_v_7pyfuse3_session"
# struct fuse_session's conn lies within its first bytes (libfuse 3.x: after the
# mount point, a few ints and the ~45 handler pointers of fuse_lowlevel_ops, ~0.45 KiB
# in; the conn itself is 128 bytes).
SCAN_BYTES = 768
_CONN = struct.Struct("<7I")  # proto_major, proto_minor, max_write, max_read, ..., want
_WANT = 24  # offset of `want` in struct fuse_conn_info
_CAPABLE = 20

_SHT_SYMTAB = 2
_PT_LOAD = 1
_STT_OBJECT = 1
_STT_FUNC = 2
_PTR = struct.Struct("<Q")
log = logging.getLogger(__name__)

OPENDIR_SYMBOL = b"__pyx_f_7pyfuse3_fuse_opendir"
# struct fuse_file_info (libfuse 3): int flags, then its bit-fields in one word, first
# bit lowest: writepage, direct_io, keep_cache, flush, nonseekable, flock_release,
# cache_readdir, noflush.
_FI_BITS = 4
_FI_KEEP_CACHE = 1 << 2
_FI_CACHE_READDIR = 1 << 6
_OPENDIR_ARGS = (ctypes.c_void_p, ctypes.c_uint64, ctypes.c_void_p)  # req, ino, fi
_KEPT: list[object] = []  # the wrapper and pyfuse3's handler: alive as long as the process


NOT_OFFERED = "the kernel does not offer it"  # `want`'s answer for an older kernel


class NotAsked(Exception):
    """Why the capability was not asked for (logged; the mount goes on without it)."""


def _symbol(path: str, name: bytes, kind: int) -> tuple[int, int]:
    """(value, size) of the symbol `name` in the ELF64 file's .symtab, its file offset 0
    mapped at its address 0 (so the value is an offset from the load address)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        head = os.pread(fd, 64, 0)
        if head[:6] != b"\x7fELF\x02\x01":  # 64-bit, little-endian
            raise NotAsked("not a 64-bit little-endian ELF file")
        (phoff, shoff) = struct.unpack_from("<QQ", head, 0x20)
        phentsize, phnum, shentsize, shnum = struct.unpack_from("<HHHH", head, 0x36)
        programs = os.pread(fd, phentsize * phnum, phoff)
        for i in range(phnum):
            p_type, _, p_offset, p_vaddr = struct.unpack_from("<IIQQ", programs, i * phentsize)
            if p_type == _PT_LOAD and p_offset == 0 and p_vaddr != 0:
                raise NotAsked("its first segment is not loaded at its address 0")
        sections = os.pread(fd, shentsize * shnum, shoff)
        for i in range(shnum):
            (sh_type,) = struct.unpack_from("<I", sections, i * shentsize + 4)
            if sh_type != _SHT_SYMTAB:
                continue
            off, size, link = struct.unpack_from("<QQI", sections, i * shentsize + 24)
            str_off, str_size = struct.unpack_from("<QQ", sections, link * shentsize + 24)
            strtab = os.pread(fd, str_size, str_off)
            whole = name + b"\0"
            for s_name, info, value, sym_size in struct.iter_unpack(
                "<IBxxxQQ", os.pread(fd, size, off)
            ):
                if info & 0xF == kind and strtab.startswith(whole, s_name):
                    return value, sym_size
            break
        raise NotAsked(f"no symbol {name.decode()} (a stripped build?)")
    finally:
        os.close(fd)


def _load_address(path: str) -> int:
    """Where the file at `path` is mapped in this process (its offset-0 mapping): the
    file read by `_symbol` itself, not one installed over it since."""
    real = os.path.realpath(path)
    ino = str(os.stat(real).st_ino)
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split(None, 5)
            if (
                len(fields) == 6
                and fields[5].rstrip("\n") == real
                and fields[4] == ino
                and int(fields[2], 16) == 0
            ):
                return int(fields[0].split("-")[0], 16)
    raise NotAsked("its extension is not mapped under its own path")


def conn_offset(raw: bytes) -> int:
    """The offset of the one `struct fuse_conn_info` shape in `raw` (see the docstring)."""
    found = []
    for k in range(0, len(raw) - _CONN.size + 1, 4):
        major, minor, max_write, _, _, capable, want = _CONN.unpack_from(raw, k)
        if (
            major == 7
            and 26 <= minor < 100
            and max_write
            and capable & FUSE_CAP_READDIRPLUS
            and want & FUSE_CAP_READDIRPLUS
            and not want & FUSE_CAP_READDIRPLUS_AUTO
            and not want & ~capable
        ):
            found.append(k)
    if len(found) != 1:
        raise NotAsked(f"{len(found)} places in its session look like its connection, not 1")
    return found[0]


@contextlib.contextmanager
def session(extension: str) -> Iterator[tuple[int, int, int]]:
    """(an fd on /proc/self/mem, the extension's load address, libfuse's session's
    address) for the block. `extension`: pyfuse3's extension module file."""
    value, size = _symbol(extension, SESSION_SYMBOL, _STT_OBJECT)
    if size != 8:
        raise NotAsked(f"{SESSION_SYMBOL.decode()} is not a pointer")
    base = _load_address(extension)
    mem = os.open("/proc/self/mem", os.O_RDWR | os.O_CLOEXEC)
    try:
        (session,) = _PTR.unpack(os.pread(mem, 8, base + value))
        if not session:
            raise NotAsked("pyfuse3 has no session")
        yield mem, base, session
    finally:
        os.close(mem)


def handler_slot(
    mem: int, base: int, address: int, extension: str, symbol: bytes
) -> tuple[int, int]:
    """(the address of the one slot in the session at `address` that holds pyfuse3's
    handler `symbol`, the handler's address): a slot of its `struct fuse_lowlevel_ops`,
    found as the only word of the session's first bytes with that value. `mem`, `base`:
    as `session` gives them."""
    value, _ = _symbol(extension, symbol, _STT_FUNC)
    handler = base + value
    raw = os.pread(mem, SCAN_BYTES, address)
    slots = [k for k in range(0, len(raw) - 7, 8) if _PTR.unpack_from(raw, k)[0] == handler]
    if len(slots) != 1:
        raise NotAsked(f"{len(slots)} places in its session hold its {symbol.decode()} handler")
    return address + slots[0], handler


def libfuse() -> ctypes.CDLL:
    """The libfuse pyfuse3's extension is linked with, as this process has it loaded
    (RTLD_NOLOAD: never a second copy, whose session would not be pyfuse3's)."""
    name = SONAMES["fuse3"]
    try:
        return ctypes.CDLL(name, mode=os.RTLD_NOLOAD | os.RTLD_NOW)
    except OSError as e:
        raise NotAsked(f"{name} is not loaded: {e}") from None


def why(e: Exception) -> str:
    """What an exception from the hooks says in the log (NotAsked: its reason)."""
    return str(e) if isinstance(e, NotAsked) else f"{type(e).__name__}: {e}"


def want(extension: str, cap: int) -> str | None:
    """Add `cap` to the INIT answer being built, if the kernel offers it: None once done,
    else why not. `extension`: pyfuse3's extension module file. Only from `init()`."""
    try:
        with session(extension) as (mem, _, address):
            raw = os.pread(mem, SCAN_BYTES, address)
            conn = address + conn_offset(raw)
            (capable, wanted) = struct.unpack_from("<II", raw, conn - address + _CAPABLE)
            if not capable & cap:
                return NOT_OFFERED
            os.pwrite(mem, struct.pack("<I", wanted | cap), conn + _WANT)
    except (NotAsked, OSError, ValueError, IndexError, struct.error) as e:
        return why(e)
    return None


def _wrap_handler(
    mem: int,
    base: int,
    address: int,
    extension: str,
    symbol: bytes,
    argtypes: tuple[type, ...],
    before: Callable[..., None],
) -> None:
    """Point the one slot of the session's `struct fuse_lowlevel_ops` that holds pyfuse3's
    handler `symbol` at a wrapper that calls `before(*args)`, then the handler.

    The slot is found by `handler_slot`. Requests are handled one at a time in this
    thread, INIT (where this runs) included, so the slot is never read while it is
    written.
    """
    slot, handler = handler_slot(mem, base, address, extension, symbol)
    # pyfuse3's handler runs Python code: called with the interpreter's lock held.
    original = ctypes.PYFUNCTYPE(None, *argtypes)(handler)

    def wrapper(*args: int) -> None:
        try:
            before(*args)
        finally:
            original(*args)

    callback = ctypes.CFUNCTYPE(None, *argtypes)(wrapper)
    target = ctypes.cast(callback, ctypes.c_void_p).value
    assert target is not None
    _KEPT.extend((original, callback))
    os.pwrite(mem, _PTR.pack(target), slot)


def keep_listings(extension: str) -> str | None:
    """Have every directory opened from now on kept in the kernel's readdir cache: None
    once done, else why not. `extension`: pyfuse3's extension module file.

    pyfuse3's OPENDIR handler (`OPENDIR_SYMBOL`) answers with a copy of the
    `struct fuse_file_info` libfuse hands it, its own handle set and nothing else. So
    its slot is pointed at a wrapper (`_wrap_handler`) that sets `keep_cache` and
    `cache_readdir` in that structure first, which pyfuse3's copy then carries into
    the answer (FOPEN_KEEP_CACHE | FOPEN_CACHE_DIR).
    """

    def opendir(req: int, ino: int, fi: int) -> None:
        bits = ctypes.c_uint32.from_address(fi + _FI_BITS)
        bits.value |= _FI_KEEP_CACHE | _FI_CACHE_READDIR

    try:
        with session(extension) as (mem, base, address):
            _wrap_handler(mem, base, address, extension, OPENDIR_SYMBOL, _OPENDIR_ARGS, opendir)
    except (NotAsked, OSError, ValueError, IndexError, struct.error) as e:
        return why(e)
    except MemoryError as e:  # libffi found no executable memory for the callback
        return f"no callback: {e}"
    return None


# -- set-ID bits cleared by the daemon: FUSE_HANDLE_KILLPRIV_V2 -----------------------------
# include/uapi/linux/fuse.h (protocol 7.33, Linux 5.11)
FUSE_HANDLE_KILLPRIV_V2 = 1 << 28  # fuse_init_out.flags
KILLPRIV_V2_MINOR = 33
# fuse_setattr_in.valid; libfuse keeps the bit (its FUSE_SET_ATTR_KILL_SUID) in `to_set`
FATTR_KILL_SUIDGID = 1 << 11
LIBFUSE_CHECKED = 314  # fuse_version() of the libfuse whose layouts are used below
SETATTR_SYMBOL = b"__pyx_f_7pyfuse3_fuse_setattr"
_SETATTR_ARGS = (  # req, ino, struct stat *, to_set, struct fuse_file_info * (or NULL)
    ctypes.c_void_p,
    ctypes.c_uint64,
    ctypes.c_void_p,
    ctypes.c_int,
    ctypes.c_void_p,
)
# struct fuse_init_out: major, minor, max_readahead, flags, ...
_INIT_OUT = struct.Struct("<IIII")
_IOVS = struct.Struct("<QQQQ")  # two struct iovec: the header, the answer
_WRITEV = ctypes.CFUNCTYPE(
    ctypes.c_ssize_t, ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, use_errno=True
)


class _CustomIo(ctypes.Structure):
    """libfuse 3.14's `struct fuse_custom_io` (32 bytes, copied by `fuse_session_custom_io`)."""

    _fields_ = (
        ("writev", ctypes.c_void_p),
        ("read", ctypes.c_void_p),
        ("splice_receive", ctypes.c_void_p),
        ("splice_send", ctypes.c_void_p),
    )


class KillPriv:
    """Whether INIT was answered with HANDLE_KILLPRIV_V2, and the `to_set` of the
    SETATTR being handled, kept by the wrapper of pyfuse3's SETATTR handler for the
    file system's setattr(), which pyfuse3 runs as soon as libfuse returns, with no
    other request in between (its coroutine starts before its first await)."""

    on = False  # set-ID bits are the daemon's to clear
    setattr: tuple[int, int] | None = None  # node id, to_set


def setattr_valid(ino: int) -> int | None:
    """The `to_set` of the SETATTR being handled (node `ino`) as the kernel sent it,
    FATTR_KILL_SUIDGID included; None while the kernel clears set-ID bits itself.
    Only from the file system's setattr()."""
    if not KillPriv.on:
        return None
    seen, KillPriv.setattr = KillPriv.setattr, None
    if seen is None or seen[0] != ino:
        return FATTR_KILL_SUIDGID  # not read (never expected): the bits go, the safe side
    return seen[1]


def _setattr_seen(req: int, ino: int, attr: int, to_set: int, fi: int | None) -> None:
    KillPriv.setattr = (ino, to_set)


def handle_killpriv(extension: str) -> str | None:
    """Answer INIT with FUSE_HANDLE_KILLPRIV_V2: None once arranged, else why not.
    `extension`: pyfuse3's extension module file.

    With it the kernel asks for `security.capability` once per inode, not before
    every write (it keeps "nothing to clear" in S_NOSEC), and leaves set-ID bits to
    the daemon: before a write that clears them it sends a SETATTR with nothing to
    set (its new mode dropped), a truncation's SETATTR says FATTR_KILL_SUIDGID when
    the caller lacks CAP_FSETID, a chown's always (FuseOps.setattr acts on them).

    libfuse 3.14 builds the answer's flags from the capabilities it knows, and it
    knows none for this one; pyfuse3 hands the file system no `to_set` bit beyond
    the fields. So pyfuse3's SETATTR handler is wrapped to keep `to_set`
    (`KillPriv`), and the answer is written through libfuse's custom I/O
    (`fuse_session_custom_io`, public in 3.14): a writev that adds the flag to the
    INIT answer, then puts libc's plain read and writev in its own place, so that
    no other request or answer passes through Python. Anything not as expected:
    nothing is asked, and the kernel clears the bits itself, as before.
    """
    try:
        with session(extension) as (mem, base, address):
            raw = os.pread(mem, SCAN_BYTES, address)
            conn = address + conn_offset(raw)
            (minor,) = struct.unpack_from("<I", raw, conn - address + 4)
            if minor < KILLPRIV_V2_MINOR:
                return NOT_OFFERED
            fuse = libfuse()
            fuse.fuse_version.restype = ctypes.c_int
            version = fuse.fuse_version()
            if version != LIBFUSE_CHECKED:
                raise NotAsked(f"libfuse {version}, not the {LIBFUSE_CHECKED} checked")
            fuse.fuse_session_fd.argtypes = (ctypes.c_void_p,)
            fuse.fuse_session_fd.restype = ctypes.c_int
            fuse.fuse_session_custom_io.argtypes = (
                ctypes.c_void_p,
                ctypes.POINTER(_CustomIo),
                ctypes.c_int,
            )
            fuse.fuse_session_custom_io.restype = ctypes.c_int
            fd = fuse.fuse_session_fd(address)
            libc = ctypes.CDLL(SONAMES["c"], use_errno=True)
            libc.writev.argtypes = (ctypes.c_int, ctypes.c_void_p, ctypes.c_int)
            libc.writev.restype = ctypes.c_ssize_t
            read = ctypes.cast(libc.read, ctypes.c_void_p).value
            plain = _CustomIo(ctypes.cast(libc.writev, ctypes.c_void_p).value, read, None, None)

            def answer(out: int, iov: int, count: int, userdata: int | None) -> int:
                """The INIT answer's writev (libfuse's first after `init()`)."""
                try:
                    if count == 2:
                        _, _, body, size = _IOVS.unpack(ctypes.string_at(iov, _IOVS.size))
                        major, _, _, flags = _INIT_OUT.unpack(
                            ctypes.string_at(body, _INIT_OUT.size)
                        )
                        if major == 7 and size >= _INIT_OUT.size:
                            flags |= FUSE_HANDLE_KILLPRIV_V2
                            ctypes.c_uint32.from_address(body + 12).value = flags
                            KillPriv.on = True
                            log.debug("INIT: answered with HANDLE_KILLPRIV_V2")
                except Exception:  # the answer goes out all the same, without the flag
                    log.exception("INIT: HANDLE_KILLPRIV_V2 not added to the answer")
                # libc's own from now on; failing that this one goes on, as a relay
                fuse.fuse_session_custom_io(address, ctypes.byref(plain), fd)
                return int(libc.writev(out, iov, count))

            hook = _WRITEV(answer)
            _KEPT.extend((hook, plain, fuse, libc))
            _wrap_handler(
                mem, base, address, extension, SETATTR_SYMBOL, _SETATTR_ARGS, _setattr_seen
            )
            io = _CustomIo(ctypes.cast(hook, ctypes.c_void_p).value, read, None, None)
            if fuse.fuse_session_custom_io(address, ctypes.byref(io), fd):
                raise NotAsked("fuse_session_custom_io refused")
    except (NotAsked, OSError, ValueError, IndexError, AttributeError, struct.error) as e:
        return why(e)
    except MemoryError as e:  # libffi found no executable memory for the callback
        return f"no callback: {e}"
    return None
