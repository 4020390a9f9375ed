"""The supervisor: what `pyunion run` is while its container runs, and its teardown.

Once the container goes, the run process only supervises: it forwards signals to
pid 1, relays the stdio (and the pty of `-t`), waits for pid 1,
then tears down (the daemon, the temporary upper, the janitor). Everything it
needs is a `Supervisor` of plain values. The run process itself holds every
module its set-up imported (~4 MiB private per container), so `pyunion run`
re-executes itself into a fresh `python -I -S` that imports only this module,
`procfs` and `tree` (`Supervisor.exec_self`), and carries on from the state
handed over on an inherited memfd (`resume`). docs/architecture.md: the supervisor.

The fresh interpreter lives as long as the container: only the lightest modules
here. `signal` imports enum (~0.8 MiB), `contextlib` and `typing` more; `_signal`
is the same functions, with plain ints for the signal numbers.
"""

from __future__ import annotations

import errno
import marshal
import os
import select
import stat
import sys
import time

from . import cgroups, procfs, tree

TYPE_CHECKING = False
if TYPE_CHECKING:
    import signal as _signal
    from collections.abc import Callable
    from types import FrameType
    from typing import Any, NoReturn
else:
    import _signal

TOOL_ERROR = 125

# Signals pyunion forwards to the command (the list).
FORWARDED = (
    _signal.SIGINT,
    _signal.SIGTERM,
    _signal.SIGHUP,
    _signal.SIGQUIT,
    _signal.SIGUSR1,
    _signal.SIGUSR2,
)
# What the supervisor handles: the forwarded signals, the terminal's size, pid 1's end.
HANDLED = (*FORWARDED, _signal.SIGCHLD, _signal.SIGWINCH)

# The fresh interpreter's program: the package is found after the standard library
# (-I -S: nothing from the caller's working directory, environment or site-packages).
# An import that fails (pyunion upgraded or removed while the container ran) is one line
# and exit 125; the container goes with this process (pid 1's parent-death signal) and
# the janitor cleans up.
_RESUME = (
    "import sys\n"
    "sys.path.append(sys.argv[1])\n"
    "try:\n"
    "    from unionfs.supervise import resume\n"
    "except Exception as e:\n"
    "    sys.stderr.write(f'pyunion: cannot go on supervising the container: {e}\\n')\n"
    "    sys.exit(125)\n"
    "resume(int(sys.argv[2]))\n"
)


def exit_code(status: int) -> int:
    """A wait status as a shell says it: the exit code, or 128+N for signal N."""
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code


def flush_stdio() -> None:
    """Write out what Python holds for stdout and stderr before a fork or an exec (a fork
    would write it twice, an exec lose it); a stream Python started without is skipped."""
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:
            try:
                stream.flush()
            except Exception:  # noqa: BLE001 - nothing to say it on
                pass


def _close(fd: int | None) -> None:
    if fd is not None and fd >= 0:
        try:
            os.close(fd)
        except OSError:
            pass


class Supervisor:
    """The running container and what tears it down, as plain values: they cross the
    exec into the fresh interpreter as a marshal of this object's attributes (`state`)."""

    def __init__(self) -> None:
        self.init: int | None = None  # pid 1 once it goes on (signals are forwarded to it)
        # init's "E" asks to hold signals until catatonit has blocked them
        # (`sandbox._take_signals`), answered "K" on this socket; EOF: it exec'd catatonit.
        self.go = -1
        self.holding = False
        self.held: list[int] = []
        self.forwarded: dict[int, int] = {}  # signal -> times forwarded (twice: SIGKILL)
        self.stopping = False  # told to stop (SIGINT, SIGTERM, SIGHUP): blocked output may go
        # stdio reaches the container through pipes of ours
        self.out_pipes: dict[int, int] = {}  # our read end -> our fd 1 or 2
        self.stdin_pipe: int | None = None  # our write end, for fd 0 (-i)
        self.master: int | None = None  # the container's pty (-t)
        self.relay_master = True  # until the pty's output ends
        self.saved_tty: list[Any] | None = None  # our terminal's mode before raw (-it)
        self.interactive = False
        self.to_sink = b""  # read from our stdin, not yet written to the container
        self.read_stdin: bool | None = None  # None: decided when supervision starts
        self.eof_sent = False
        self.report_fd = -1  # init's list of the mount points it created
        self.janitor: int | None = None
        self.janitor_fd: int | None = None
        self.tmp: str | None = None
        self.upper: str | None = None
        self.merged: str | None = None
        self.daemon: bytes | None = None  # `procfs.process_id`
        self.cgroups: list[str] = []  # the container's, one a hierarchy (`cgroups`)
        self.keep = False
        self.quiet = False
        self.layers: list[str] = []
        self.wake_r = self.wake_w = -1  # the signals' wakeup pipe (this process's own)

    # signals ---------------------------------------------------------------------------
    def on_signal(self, signo: int) -> None:
        """Forward SIGNO to pid 1 (a second SIGINT or SIGTERM: SIGKILL)."""
        if signo == _signal.SIGCHLD:
            return  # only wakes the loop (the wakeup fd)
        if signo == _signal.SIGWINCH:
            self.copy_winsize()
            return
        if self.init is None:
            return
        n = self.forwarded.get(signo, 0) + 1
        self.forwarded[signo] = n
        if signo in (_signal.SIGINT, _signal.SIGTERM, _signal.SIGHUP):
            self.stopping = True
        sig = _signal.SIGKILL if n > 1 and signo in (_signal.SIGINT, _signal.SIGTERM) else signo
        if self.holding and sig != _signal.SIGKILL:
            self.held.append(sig)
            return
        self._kill(self.init, sig)

    def _handler(self, signo: int, frame: FrameType | None) -> None:
        self.on_signal(signo)

    @staticmethod
    def _kill(pid: int, sig: int) -> None:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass

    def open_wake_pipe(self) -> None:
        """The pipe the interpreter writes to on a signal: it wakes the loop's select."""
        self.wake_r, self.wake_w = os.pipe()
        for fd in (self.wake_r, self.wake_w):
            os.set_blocking(fd, False)
        _signal.set_wakeup_fd(self.wake_w, warn_on_full_buffer=False)

    def _hand_over(self) -> float:
        """Follow init's exec of catatonit; the select timeout while signals are held."""
        if self.go >= 0:
            try:
                data = os.read(self.go, 1)
            except BlockingIOError:
                return 1.0
            except OSError:
                data = b""
            if data == b"E":
                self.holding = True
                try:
                    os.write(self.go, b"K")
                except OSError:
                    pass
                return 1.0
            _close(self.go)  # EOF: exec'd (or init is gone)
            self.go = -1
        if not self.holding:
            return 1.0
        assert self.init is not None
        if not _blocks(self.init, FORWARDED):
            return 0.001  # catatonit is starting: a few hundred microseconds
        self.holding = False
        held, self.held = self.held, []
        for sig in held:
            self._kill(self.init, sig)
        return 1.0

    def copy_winsize(self) -> None:
        if self.master is None or not os.isatty(0):
            return
        import fcntl
        import termios

        try:
            size = fcntl.ioctl(0, termios.TIOCGWINSZ, b"\0" * 8)
            fcntl.ioctl(self.master, termios.TIOCSWINSZ, size)
        except OSError:
            pass

    # the container's life --------------------------------------------------------------
    def supervise(self, until: float | None = None) -> int | None:
        """Wait for init; meanwhile relay the pty (-t) or the stdio pipes, and let handlers
        forward signals. The container's exit code; None once `until` (monotonic) has
        passed and it still runs."""
        assert self.init is not None
        outputs = self._outputs()
        if self.read_stdin is None:
            self.read_stdin = self._sink() is not None and self.interactive
        for fd in (*outputs, *([self._sink()] if self._sink() is not None else [])):
            os.set_blocking(fd, False)  # type: ignore[arg-type]
        while True:
            pid, status = os.waitpid(self.init, os.WNOHANG)
            if pid == self.init:
                self.init = None
                break
            timeout = self._hand_over()
            if until is not None:
                left = until - time.monotonic()
                if left <= 0:
                    return None
                timeout = min(timeout, left)
            sink = self._sink()
            rlist = [self.wake_r, *outputs]
            if self.go >= 0:
                rlist.append(self.go)
            wlist = [sink] if sink is not None and self.to_sink else []
            if self.read_stdin and not self.to_sink:
                rlist.append(0)
            try:
                readable, writable, _ = select.select(rlist, wlist, [], timeout)
            except InterruptedError:
                continue
            if self.wake_r in readable:
                try:
                    os.read(self.wake_r, 4096)
                except BlockingIOError:
                    pass
            for fd in [fd for fd in outputs if fd in readable]:
                if not _pump(fd, outputs[fd], self._giving_up):
                    self._output_ended(fd, outputs)
            if 0 in readable:
                self._read_stdin(sink)
            sink = self._sink()
            if sink is not None and sink in writable and self.to_sink:
                try:
                    n = os.write(sink, self.to_sink)
                    self.to_sink = self.to_sink[n:]
                except BlockingIOError:
                    pass
                except OSError:  # the command closed its stdin
                    self.to_sink = b""
                    self.read_stdin = False
        self._drain(outputs)  # what the command wrote just before exiting
        return exit_code(status)

    def _sink(self) -> int | None:
        """Where our stdin goes: the pty, or the pipe that stands for a non-pipe stdin (-i)."""
        return self.master if self.master is not None else self.stdin_pipe

    def _read_stdin(self, sink: int | None) -> None:
        try:
            data = os.read(0, 65536)
        except OSError:  # EIO: our terminal hung up; SIGHUP is on its way
            data = b""
        if data:
            self.to_sink += data
            return
        self.read_stdin = False
        if sink is not None and sink == self.master:
            if not self.eof_sent:
                self.to_sink += b"\x04"  # stdin ended: ^D to the terminal
                self.eof_sent = True
        elif sink is not None:
            self._close_stdin_pipe()  # the command reads its end of file

    def _outputs(self) -> dict[int, _Dest]:
        """Our read end of each output pipe (and the pty's) -> where it is copied to."""
        out = {src: _Dest(fd) for src, fd in self.out_pipes.items()}
        if self.master is not None and self.relay_master:
            out[self.master] = _Dest(1, from_pipe=False)  # its EIO is its end
        return out

    def _drain(self, outputs: dict[int, _Dest]) -> None:
        """Copy what is left in the output pipes (and pty) until their end: every writer
        is in the container, which is gone or going (2 s without anything to read: one
        lives on outside, and is left)."""
        deadline = time.monotonic() + 2.0
        while outputs and time.monotonic() < deadline:
            r, _, _ = select.select(list(outputs), [], [], 0.1)
            if not r and all(fd not in self.out_pipes for fd in outputs):
                break  # only the pty, and quiet
            if r:
                deadline = time.monotonic() + 2.0
            for fd in r:
                if not _pump(fd, outputs[fd], self._giving_up):
                    self._output_ended(fd, outputs)

    def _output_ended(self, fd: int, outputs: dict[int, _Dest]) -> None:
        """SRC ended, or its destination failed: close our end, so the command's writes fail
        (EPIPE) instead of vanishing."""
        del outputs[fd]
        if fd in self.out_pipes:
            del self.out_pipes[fd]
            _close(fd)
        elif fd == self.master:
            self.relay_master = False

    def _giving_up(self) -> bool:
        """Output that cannot be written may be dropped: we are told to stop."""
        return self.stopping

    def _close_stdin_pipe(self) -> None:
        _close(self.stdin_pipe)
        self.stdin_pipe = None

    # the exec into a fresh interpreter -------------------------------------------------
    def _fds(self) -> list[int]:
        """Every fd of ours the state names (they cross the exec)."""
        fds = [*self.out_pipes, self.go, self.report_fd]
        for fd in (self.stdin_pipe, self.master, self.janitor_fd):
            if fd is not None:
                fds.append(fd)
        return [fd for fd in fds if fd >= 0]

    def state(self) -> bytes:
        data = {k: v for k, v in vars(self).items() if k not in ("wake_r", "wake_w")}
        return marshal.dumps(data)

    def exec_self(self) -> None:
        """Become a fresh interpreter that runs `resume` on this state; returns only if that
        failed, with nothing changed (supervision goes on here).

        The handled signals are blocked across the exec: one that comes meanwhile stays
        pending, and the new handlers get it (a handler of ours that was due has run:
        `pthread_sigmask` runs them). The state goes on a memfd only this process holds
        (no path another user could write), and no other fd of ours crosses: Python's
        are close-on-exec. The new process starts in / with -I -S: nothing is imported
        from the caller's working directory, environment or site-packages (it is root
        for a rootful run)."""
        if not sys.executable:
            return
        old = _signal.pthread_sigmask(_signal.SIG_BLOCK, HANDLED)
        fds = self._fds()
        cwd = -1
        state = -1
        try:
            cwd = os.open(".", os.O_PATH | os.O_CLOEXEC)
            state = os.memfd_create("pyunion-supervisor", os.MFD_CLOEXEC)
            data = memoryview(self.state())
            while data:
                data = data[os.write(state, data) :]
            os.lseek(state, 0, os.SEEK_SET)
            for fd in (*fds, state):
                os.set_inheritable(fd, True)
            os.chdir("/")
            flush_stdio()
            package_parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
            # Paths cross as str: decoded back to the same bytes only under the same file
            # system encoding, which -I would otherwise take from the locale alone
            # (PYTHONUTF8 ignored): a UTF-8 TMPDIR encoded as latin-1 was never removed.
            flags = ["-I", "-S", "-X", f"utf8={sys.flags.utf8_mode}"]
            flags += ["-B"] if sys.dont_write_bytecode else []
            # pyunion's own command line last (unread): `ps` still tells which container.
            argv = [sys.executable, *flags, "-c", _RESUME, package_parent, str(state)]
            argv += ["pyunion", *sys.argv[1:]]
            os.execv(sys.executable, argv)
        except (OSError, ValueError):
            pass  # no memfd, no interpreter, a value marshal cannot take: go on as we are
        for fd in fds:
            os.set_inheritable(fd, False)
        if cwd >= 0:
            os.fchdir(cwd)
        _close(cwd)
        _close(state)
        _signal.pthread_sigmask(_signal.SIG_SETMASK, old)

    # teardown ----------------------------------------------------------------------------
    def teardown(self) -> None:
        """Undo everything, in order, whatever state the container reached."""
        if self.saved_tty is not None:
            import termios

            try:
                termios.tcsetattr(0, termios.TCSADRAIN, self.saved_tty)
            except termios.error:
                pass
            self.saved_tty = None
        _close(self.go)
        self.go = -1
        if self.init is not None:
            self._kill(self.init, _signal.SIGKILL)  # pid 1 dies: the kernel kills the rest
            try:
                os.waitpid(self.init, 0)
            except ChildProcessError:
                pass
            self.init = None
        if self.out_pipes:  # init's own last words, when it failed before supervising
            self._drain({src: _Dest(fd) for src, fd in self.out_pipes.items()})
            for fd in self.out_pipes:
                _close(fd)
            self.out_pipes = {}
        self._close_stdin_pipe()
        _close(self.master)
        self.master = None
        # The wakeup fd is unset before its pipe is closed: a signal in between (the
        # daemon's SIGCHLD) would have the interpreter write to a closed fd and print
        # "Exception ignored ... Bad file descriptor" on the user's terminal.
        try:
            _signal.set_wakeup_fd(-1)
        except (ValueError, OSError):
            pass
        for fd in (self.wake_r, self.wake_w):
            _close(fd)
        self.wake_r = self.wake_w = -1
        created = self._created_mount_points()  # init is gone: its report is complete
        for group in self.cgroups:  # init is gone
            try:
                cgroups.remove(group)
            except OSError as e:
                print(f"pyunion: cannot remove the cgroup {group}: {e.strerror}", file=sys.stderr)
        self.cgroups = []
        release(self.merged, self.daemon, self.tmp, self.upper, self.keep, self.quiet)
        if self.keep and self.upper is not None and os.path.isdir(self.upper):
            _drop_placeholders(self.upper, self.layers, created)
        self.tell_janitor("DONE")
        _close(self.janitor_fd)
        self.janitor_fd = None
        if self.janitor is not None:
            try:
                os.waitpid(self.janitor, 0)  # it exits at once on DONE
            except ChildProcessError:
                pass
            self.janitor = None

    def tell_janitor(self, kind: str, value: bytes = b"") -> None:
        """One line to the janitor (`janitor_cleanup` reads them): "D PID START" (the
        daemon, `procfs.process_id`), "U DIR" (--upper), "K" (keep the upper), "T DIR"
        (the temporary tree), "C DIR" (a cgroup, one a hierarchy), "I PID START" (init), "DONE". The
        value goes in hex: a path may hold any byte but NUL, and a newline in it (--upper,
        TMPDIR) made lines the janitor obeyed ("I PID": SIGKILL)."""
        if self.janitor_fd is not None:
            line = kind.encode() + (b" " + value.hex().encode() if value else b"") + b"\n"
            try:
                os.write(self.janitor_fd, line)
            except OSError:
                pass

    def _created_mount_points(self) -> list[str]:
        if self.report_fd < 0:
            return []
        data = b""
        try:
            os.set_blocking(self.report_fd, False)
            while chunk := os.read(self.report_fd, 65536):
                data += chunk
        except OSError:
            pass
        _close(self.report_fd)
        self.report_fd = -1
        return data.decode(errors="surrogateescape").split()


def resume(state_fd: int) -> NoReturn:
    """The fresh interpreter's whole program (`Supervisor.exec_self`): take the state, the
    handlers and the wakeup pipe, unblock the signals (what came meanwhile is handled
    now), supervise to the end, tear down, exit with the container's code. Never a
    traceback: one line, and 125."""
    code = TOOL_ERROR
    sup = None
    try:
        data = b""
        while chunk := os.read(state_fd, 1 << 20):
            data += chunk
        os.close(state_fd)
        try:  # `ps -o comm`, `pgrep pyunion`: still pyunion
            with open("/proc/self/comm", "w") as f:
                f.write("pyunion")
        except OSError:
            pass
        sup = Supervisor()
        vars(sup).update(marshal.loads(data))
        for fd in sup._fds():
            os.set_inheritable(fd, False)
        sup.open_wake_pipe()
        for sig in HANDLED:
            _signal.signal(sig, sup._handler)
        _signal.pthread_sigmask(_signal.SIG_UNBLOCK, HANDLED)
        result = sup.supervise()
        code = TOOL_ERROR if result is None else result
    except BaseException as e:  # noqa: BLE001 - never a traceback: the run process's own exit
        print(f"pyunion: supervising the container failed: {e!r}", file=sys.stderr)
    finally:
        if sup is not None:
            try:
                sup.teardown()
            except BaseException as e:  # noqa: BLE001
                print(f"pyunion: teardown failed: {e!r}", file=sys.stderr)
                code = TOOL_ERROR
    try:
        for stream in (sys.stdout, sys.stderr):
            if stream is not None:
                stream.flush()
    except BrokenPipeError:
        code = code or 141
    os._exit(code)


# -- relaying output -------------------------------------------------------------------------
class _Dest:
    """Where relayed output goes, looked at once: a regular file or a pipe takes splice(2)
    from our pipe until it refuses (O_APPEND); anything else (and what the pty says) gets
    pieces it can take at once."""

    __slots__ = ("fd", "fifo", "piece", "regular", "splice")

    def __init__(self, fd: int, from_pipe: bool = True) -> None:
        self.fd = fd
        mode = os.fstat(fd).st_mode
        self.regular = stat.S_ISREG(mode)
        self.fifo = stat.S_ISFIFO(mode)
        self.piece = 256 if os.isatty(fd) else 4096  # bytes per write to a terminal, FIFO...
        self.splice = from_pipe and (self.regular or self.fifo)


def _pump(src: int, dst: _Dest, giving_up: Callable[[], bool]) -> bool:
    """Copy what SRC has to DST; False at SRC's end (EOF, or EIO: every pty slave closed)
    or when DST failed, which is said in one line (but EPIPE: the reader left). The
    caller then closes SRC, so that the command's next write fails as it would have
    on DST itself (EPIPE, SIGPIPE) rather than its output vanishing.

    A regular file or a pipe takes it by splice(2), without a copy through us (a pipe
    never blocking: SPLICE_F_NONBLOCK). A pipe, terminal or device is waited for
    (select) and written in pieces it can take at once, so a reader that stops (a
    terminal nobody reads) never blocks pyunion past a signal to stop: once
    `giving_up()` and DST still takes nothing for 0.2 s, the rest is dropped.
    """
    writable = False
    while dst.splice:
        try:
            flags = os.SPLICE_F_NONBLOCK if dst.fifo else 0
            return os.splice(src, dst.fd, 1 << 20, flags=flags) > 0
        except BlockingIOError:  # SRC is empty, or DST (a pipe) is full
            if not dst.fifo or writable:
                return True  # DST had room: SRC is empty
        except OSError as e:
            if e.errno != errno.EINVAL:
                return _output_failed(e)
            dst.splice = False  # O_APPEND: read and write below
            break
        _, ready, _ = select.select([], [dst.fd], [], 0.2)
        writable = bool(ready)
        if not writable and giving_up():
            break  # read below, and dropped there once DST still takes nothing
    try:
        data = os.read(src, 65536)
    except BlockingIOError:
        return True
    except OSError:
        return False
    if not data:
        return False
    view = memoryview(data)
    piece = len(view) if dst.regular else dst.piece
    while view:
        if not dst.regular:
            _, ready, _ = select.select([], [dst.fd], [], 0.2)
            if not ready:
                if giving_up():
                    break
                continue
        try:
            n = os.write(dst.fd, view[:piece])
        except BlockingIOError:
            continue
        except OSError as e:
            return _output_failed(e)
        view = view[n:]
    return True


def _output_failed(e: OSError) -> bool:
    if e.errno != errno.EPIPE:
        try:
            os.write(2, f"pyunion: cannot write the container's output: {e.strerror}\n".encode())
        except OSError:
            pass
    return False


def _blocks(pid: int, sigs: tuple[int, ...]) -> bool:
    """Whether process PID blocks all of SIGS (its /proc status; gone: nothing to wait for)."""
    try:
        blocked = procfs.status(pid, (b"SigBlk",)).get(b"SigBlk")
    except OSError:
        return True
    if blocked is None:
        return True
    mask = int(blocked, 16)
    return all(mask >> (sig - 1) & 1 for sig in sigs)


# -- what is left: the daemon, the temporary tree --------------------------------------------
def release(
    merged: str | None,
    daemon: bytes | None,
    tmp: str | None,
    upper: str | None,
    keep: bool,
    quiet: bool = False,
) -> None:
    """Make sure the daemon is gone, remove the temporary tree (minus a kept upper).

    Nothing to unmount: the union is a detached mount, attached only in the container's
    namespace, and it ends with that namespace (and every fd of it)."""
    if daemon is not None:
        procfs.stop(daemon, 5)
    if tmp is None:
        return
    if merged is not None and procfs.is_mountpoint(merged):
        print(f"pyunion: {merged} is still mounted; leaving {tmp}", file=sys.stderr)
        return
    # The container wrote what is in the upper: however deep, whatever its symlinks, it is
    # removed through fds (tree.py), never by following a path it could have changed.
    try:
        if keep and upper is not None and upper == os.path.join(tmp, "upper"):
            fd = os.open(tmp, tree.DIR_FLAGS)
            try:
                for name in os.listdir(fd):
                    if name != "upper":
                        tree.rmtree_at(fd, name)
            finally:
                os.close(fd)
        else:
            tree.rmtree(tmp)
    except FileNotFoundError:
        pass  # killed between telling the janitor its name and making it (`Runner._make_tmp`)
    except OSError as e:
        print(f"pyunion: cannot remove {tmp}: {e.strerror}", file=sys.stderr)
    if keep and upper is not None and not quiet:
        print(f"pyunion: the writable layer is kept in {upper}", file=sys.stderr)


def _drop_placeholders(upper: str, lowers: list[str], created: list[str]) -> None:
    """Remove from a kept upper the empty mount points init created (deepest first).

    Only what is still an empty file or directory and exists in no lower layer, so
    removing it from the upper cannot change what the layers below show. The
    container may have replaced any directory on the way with a symlink to the
    host's tree: every path is walked from the upper's fd one name at a time,
    never following a symlink.
    """
    try:  # its path is the caller's, resolved as the daemon did; inside: the container's
        ufd = tree.open_trusted(upper, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    lfds: list[int] = []
    try:
        for low in lowers:
            try:
                lfds.append(os.open(low, tree.DIR_FLAGS))
            except OSError:
                pass
        for path in sorted(set(created), key=lambda p: p.count("/"), reverse=True):
            rel = os.fsencode(os.path.normpath(path.strip("/")))
            if (
                not rel
                or rel == b"."
                or rel.startswith(b"..")
                or any(_in_layer(fd, rel) for fd in lfds)
            ):
                continue
            parent, name = os.path.split(rel)
            try:
                pfd = tree.open_rel(ufd, parent)
            except OSError:  # a symlink or a file on the way: not ours any more
                continue
            try:
                st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
                if stat.S_ISDIR(st.st_mode):
                    os.rmdir(name, dir_fd=pfd)  # only when empty
                elif stat.S_ISREG(st.st_mode) and st.st_size == 0:
                    os.unlink(name, dir_fd=pfd)
            except OSError:
                pass
            finally:
                os.close(pfd)
    finally:
        for fd in (ufd, *lfds):
            os.close(fd)


def _in_layer(layer_fd: int, rel: bytes) -> bool:
    """Whether a lower layer has `rel` (a symlink or a file on the way counts as yes: be
    conservative, the path is then not a plain placeholder)."""
    parent, name = os.path.split(rel)
    try:
        pfd = tree.open_rel(layer_fd, parent)
    except FileNotFoundError:
        return False
    except OSError:
        return True
    try:
        os.stat(name, dir_fd=pfd, follow_symlinks=False)
        return True
    except FileNotFoundError:
        return False
    except OSError:
        return True
    finally:
        os.close(pfd)


def janitor_cleanup(told: str) -> None:
    """Undo what pyunion made and told the janitor of (`Supervisor.tell_janitor`) but could
    not undo itself: it died (SIGKILL, OOM) before DONE."""
    daemon: bytes | None = None
    tmp = upper = None
    groups: list[str] = []
    keep = False
    init: list[bytes] = []
    for line in os.fsencode(told).split(b"\n"):
        kind, _, hexed = line.partition(b" ")
        if kind == b"DONE":
            return
        try:
            value = bytes.fromhex(hexed.decode("ascii"))
        except ValueError:  # not a line `Supervisor.tell_janitor` wrote
            continue
        if kind == b"I":  # "PID START" (`procfs.process_id`)
            init.append(value)
        elif kind == b"D":
            daemon = value
        elif kind == b"T" and value:  # the last one wins (`Runner._make_tmp`)
            tmp = os.fsdecode(value)
        elif kind == b"U" and value:
            upper = os.fsdecode(value)
        elif kind == b"C" and value:
            groups.append(os.fsdecode(value))
        elif kind == b"K":
            keep = True
    for told_init in init:
        pidfd = procfs.open_process(told_init)  # that very process, not its pid (`_stop`)
        if pidfd is not None:
            procfs.kill_and_wait(pidfd, _signal.SIGKILL, 10)
            os.close(pidfd)
    for group in groups:
        try:
            cgroups.remove(group)
        except OSError:
            pass
    merged = None
    if tmp is not None:
        merged = os.path.join(tmp, "merged")
        upper = upper or os.path.join(tmp, "upper")
    release(merged, daemon, tmp, upper, keep)
