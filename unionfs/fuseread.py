"""READ answered in libfuse's own callback, a big one's data spliced from the file.

pyfuse3 answers a READ with the bytes its handler returns: the daemon reads the
lower (or upper) file into its buffer, the first copy, and writes that buffer to
/dev/fuse, which copies it into the kernel's page cache of the mount, the second.
fuse-overlayfs hands libfuse the file itself and libfuse splices it: the file's
page-cache pages go into a pipe by reference and the FUSE device copies them once.
pyfuse3 (3.5) has no way to reply so.

So pyfuse3's READ handler's slot in the session's `struct fuse_lowlevel_ops` (found
as `fuseinit.keep_listings` finds OPENDIR's) is pointed at `FastReads.read`, which
answers the request itself, in the callback: a read of at least `SPLICE_MIN` bytes is
the reply header written into a pipe kept for it, the file's bytes spliced after it
and the pipe spliced into /dev/fuse in one piece; a smaller one (a splice costs two
more syscalls) is read into the adaptor's buffer and written with the header in one
`writev` (no faster than pyfuse3's handler, measured: README, Performance; one
path for every READ all the same). The request is then freed with
`fuse_reply_none`, which sends nothing. The header needs the request's `unique`,
the second word of libfuse's `struct fuse_req` (after its session pointer, which
the first request is checked against: anything else and every READ goes back to
pyfuse3's handler). A read that comes
short of the size asked (the end of the file) is taken back out of the pipe and sent
with its real length. Errors go back as `fuse_reply_err` with the errno.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import logging
import os
import struct
from collections.abc import Callable

from . import fuseinit

log = logging.getLogger(__name__)

READ_SYMBOL = b"__pyx_f_7pyfuse3_fuse_read"
DEVICE = "/dev/fuse"  # an OSError's filename: the answer could not be sent
SPLICE_MIN = 32 << 10  # smaller reads: read into the buffer and write, two syscalls
# The pipe: 1 MiB, the most an unprivileged process may ask for (pipe-max-size), and more
# needs CAP_SYS_RESOURCE, which a daemon in a container or sandbox often lacks. It takes a
# read of up to 1 MiB less two pages: one for the header, one for an unaligned start
# (`mount.READAHEAD_KB` keeps the kernel's sequential reads to that size).
PIPE_BYTES = 1 << 20
_PAGE = os.sysconf("SC_PAGE_SIZE")
_PTR = struct.Struct("<Q")
_HEADER = struct.Struct("<IiQ")  # struct fuse_out_header: len, error, unique
_FI_FH = 16  # offset of `fh` in struct fuse_file_info (libfuse 3)
_REQ_UNIQUE = 8  # offset of `unique` in struct fuse_req, after `se`
_HANDLER = ctypes.CFUNCTYPE(
    None, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_size_t, ctypes.c_int64, ctypes.c_void_p
)
_KEPT: list[object] = []  # callbacks and handlers: alive as long as the process


class FastReads:
    """The READ handler that answers in libfuse's callback (see the module's docstring).

    `fd_of(fh)`: the fd a read of handle `fh` reads (an OSError with the errno for a
    bad one); `buffer(size)`: a writable buffer of at least `size` bytes for a small
    read, valid until the reply is written."""

    def __init__(
        self,
        lib: ctypes.CDLL,
        session: int,
        original: Callable[[int, int, int, int, int], None],
        restore: Callable[[], None],
        fd_of: Callable[[int], int],
        buffer: Callable[[int], memoryview],
        debug: bool = False,
    ) -> None:
        self._debug = debug  # log each READ as the adaptor's debug mode logs a request
        self._reply_none = lib.fuse_reply_none
        self._reply_none.argtypes = (ctypes.c_void_p,)
        self._reply_none.restype = None
        self._reply_err = lib.fuse_reply_err
        self._reply_err.argtypes = (ctypes.c_void_p, ctypes.c_int)
        self._reply_err.restype = ctypes.c_int
        session_fd = lib.fuse_session_fd
        session_fd.argtypes = (ctypes.c_void_p,)
        session_fd.restype = ctypes.c_int
        self._dev = session_fd(session)
        self._session = session
        self._checked = False
        self._original = original
        self._restore = restore
        self._fd_of = fd_of
        self._buffer = buffer
        self._header = bytearray(_HEADER.size)
        self._pipe: tuple[int, int] | None = None
        self.splice_max = 0  # the largest read spliced (0: none, the pipe could not be had)
        self.spliced = self.copied = 0  # counters, for tests and debugging
        self._open_pipe()

    def _open_pipe(self) -> None:
        """The pipe, `PIPE_BYTES` if allowed (else as it comes, 64 KiB); the largest read
        it takes leaves a page for the header and one for an unaligned start."""
        r, w = os.pipe2(os.O_CLOEXEC)
        try:
            size = fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
        except OSError:  # pipe-max-size lowered, or the user's pipe pages used up
            size = fcntl.fcntl(w, fcntl.F_GETPIPE_SZ)
        self._pipe = (r, w)
        self.splice_max = max(0, size - 2 * _PAGE)

    def _drop_pipe(self) -> None:
        """After a failure in the middle of a splice the pipe may hold part of a reply:
        a new one for the next."""
        if self._pipe is not None:
            for fd in self._pipe:
                os.close(fd)
            self._pipe = None
        with contextlib.suppress(OSError):
            self._open_pipe()

    def read(self, req: int, ino: int, size: int, off: int, fi: int) -> None:
        """libfuse's READ callback: answer `req`, one way or another, exactly once."""
        if not self._checked:
            if ctypes.c_void_p.from_address(req).value != self._session:
                log.warning("READ: libfuse's request is not laid out as expected: pyfuse3 reads")
                self._restore()
                self._original(req, ino, size, off, fi)
                return
            self._checked = True
        unique = ctypes.c_uint64.from_address(req + _REQ_UNIQUE).value
        fh = ctypes.c_uint64.from_address(fi + _FI_FH).value
        err = 0
        try:
            fd = self._fd_of(fh)
            if SPLICE_MIN <= size <= self.splice_max:
                self._splice(fd, off, size, unique)
            else:
                self._copy(fd, off, size, unique)
        except OSError as e:
            err = e.errno or errno.EIO
            if e.errno == errno.ENOENT and e.filename == DEVICE:
                self._reply_none(req)  # interrupted: the kernel wants no answer any more
            else:
                self._reply_err(req, err)
        except Exception:
            log.exception("internal error in read")
            err = errno.EIO
            self._reply_err(req, err)
        else:
            self._reply_none(req)
        if self._debug:
            log.debug(
                "read%r -> %s", (fh, off, size), errno.errorcode.get(err, err) if err else "ok"
            )

    def _send(self, iov: list[memoryview | bytearray | bytes]) -> None:
        try:
            os.writev(self._dev, iov)
        except OSError as e:
            e.filename = DEVICE  # ENOENT: no answer is wanted any more
            raise

    def _copy(self, fd: int, off: int, size: int, unique: int) -> None:
        buf = self._buffer(size)[:size]
        n = os.preadv(fd, (buf,), off)
        _HEADER.pack_into(self._header, 0, _HEADER.size + n, 0, unique)
        self._send([self._header, buf[:n]])
        self.copied += 1

    def _splice(self, fd: int, off: int, size: int, unique: int) -> None:
        pipe = self._pipe
        if pipe is None:
            self._copy(fd, off, size, unique)
            return
        r, w = pipe
        _HEADER.pack_into(self._header, 0, _HEADER.size + size, 0, unique)
        n = 0
        try:
            os.write(w, self._header)
            while n < size:
                got = os.splice(fd, w, size - n, offset_src=off + n)
                if not got:
                    break
                n += got
        except OSError as e:
            self._drop_pipe()
            if n or e.errno not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                raise
            self._copy(fd, off, size, unique)  # a file system that cannot splice
            return
        if n < size:  # the end of the file: the header says too much
            self._short(r, n, unique)
            return
        try:
            os.splice(r, self._dev, _HEADER.size + n)
        except OSError as e:
            self._drop_pipe()  # the device takes all of it or none; none may be left
            e.filename = DEVICE
            raise
        self.spliced += 1

    def _short(self, r: int, n: int, unique: int) -> None:
        """Take a short read's header and bytes back out of the pipe and send them."""
        buf = self._buffer(n)[:n] if n else memoryview(bytearray(0))
        got = os.readv(r, (self._header, buf))
        if got != _HEADER.size + n:
            self._drop_pipe()
            raise OSError(errno.EIO, "short read back from the pipe")
        _HEADER.pack_into(self._header, 0, _HEADER.size + n, 0, unique)
        self._send([self._header, buf])
        self.copied += 1


def install(
    extension: str,
    fd_of: Callable[[int], int],
    buffer: Callable[[int], memoryview],
    debug: bool = False,
) -> FastReads | str:
    """Answer every READ from now on with `FastReads`: it, once done, else why not.
    `extension`: pyfuse3's extension module file. Only from `init()` (requests are
    handled one at a time in this thread, so the slot is never read while written)."""
    try:
        lib = fuseinit.libfuse()
        with fuseinit.session(extension) as (mem, base, session):
            slot, handler = fuseinit.handler_slot(mem, base, session, extension, READ_SYMBOL)
            original = ctypes.PYFUNCTYPE(
                None,
                ctypes.c_void_p,
                ctypes.c_uint64,
                ctypes.c_size_t,
                ctypes.c_int64,
                ctypes.c_void_p,
            )(handler)

            def restore() -> None:
                with open("/proc/self/mem", "r+b", buffering=0) as f:
                    f.seek(slot)
                    f.write(_PTR.pack(handler))

            reads = FastReads(lib, session, original, restore, fd_of, buffer, debug)
            wrapper = _HANDLER(reads.read)
            address = ctypes.cast(wrapper, ctypes.c_void_p).value
            assert address is not None
            _KEPT.extend((original, wrapper, reads))
            os.pwrite(mem, _PTR.pack(address), slot)
    except (fuseinit.NotAsked, OSError, ValueError, IndexError, struct.error) as e:
        return fuseinit.why(e)
    except MemoryError as e:  # libffi found no executable memory for the callback
        return f"no callback: {e}"
    return reads
