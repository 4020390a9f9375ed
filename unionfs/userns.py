"""The rootless user namespace: where an ordinary user is root, as in rootless podman.

An ordinary user can neither chown a file nor mount anything on the host. In a
user namespace of their own they are root: the kernel lets them mount FUSE,
proc, tmpfs, devpts and binds there, make mount, pid, uts and ipc namespaces,
and give files any owner the namespace maps. The mapping is podman's:

    uid_map   0  UID      1        the user is root inside
              1  SUBUID   COUNT    their /etc/subuid range(s), as IDs 1..COUNT
    gid_map   the same with the primary GID and /etc/subgid

The ranges are written by the setuid helpers `newuidmap`/`newgidmap` (package
uidmap), which check them against /etc/subuid and /etc/subgid. The mapping
depends on those files only, so an ID on disk means the same owner every time.
Without a range only the user's own IDs are mapped (written by pyunion itself,
with setgroups denied as the kernel then requires): files of other owners
cannot be made, which is said in one line, as podman does.

`enter_rootless()` is what every command that writes owners or needs mounts
calls first; it does nothing for root, or for a process already inside a user
namespace (`pyunion unshare`, `buildah unshare`), where the IDs are what they are.
"""

from __future__ import annotations

import errno
import os
import sys

from . import syscalls
from .digits import number
from .errors import UserError

SUBUID = "/etc/subuid"
SUBGID = "/etc/subgid"
MAX_SUBID_FILE = 1 << 20  # bytes of /etc/subuid read at most
ID_LIMIT = 1 << 32
# (first ID inside, first ID outside, count): one line of /proc/PID/uid_map.
Extent = tuple[int, int, int]


# -- where we are -----------------------------------------------------------------------
def read_map(kind: str = "uid", pid: str = "self") -> list[Extent]:
    """The ID mapping of a process (`kind` "uid" or "gid"); the identity outside any userns."""
    try:
        with open(f"/proc/{pid}/{kind}_map") as f:
            text = f.read(1 << 16)
    except OSError:
        return [(0, 0, ID_LIMIT - 1)]
    out = []
    for line in text.splitlines():
        fields = line.split()
        nums = [n for n in map(number, fields) if n is not None]
        if len(fields) == len(nums) == 3:
            out.append((nums[0], nums[1], nums[2]))
    return out


def in_user_namespace() -> bool:
    """Whether this process runs in a user namespace other than the host's."""
    return read_map("uid") != [(0, 0, ID_LIMIT - 1)]


def overflow_id(kind: str = "uid") -> int:
    """The ID the kernel shows for one this namespace does not map (65534, `nobody`)."""
    try:
        with open(f"/proc/sys/kernel/overflow{kind}") as f:
            return int(f.read(32))
    except (OSError, ValueError):
        return 65534


def to_host(inside: int, kind: str = "uid") -> int | None:
    """The host's ID for an ID of this namespace (None: not mapped)."""
    for first, outside, count in read_map(kind):
        if first <= inside < first + count:
            return outside + inside - first
    return None


def host_uid() -> int:
    """The user's ID on the host (the same as `geteuid()` outside a user namespace)."""
    uid = os.geteuid()
    host = to_host(uid)
    return uid if host is None else host


def setgroups_denied() -> bool:
    """Whether setgroups(2) is refused here (a namespace whose gid_map we wrote ourselves)."""
    try:
        with open("/proc/self/setgroups") as f:
            return f.read(16).strip() == "deny"
    except OSError:
        return False


def unmapped(ids: list[int], kind: str = "uid") -> list[int]:
    """Those of `ids` this namespace does not map (they cannot own a file or a process)."""
    extents = read_map(kind)
    return [i for i in ids if not any(a <= i < a + n for a, _, n in extents)]


def _user_name(uid: int) -> str:
    import pwd

    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def free_range(count: int = 65536) -> str:
    """FIRST-LAST of `count` IDs no user has in /etc/subuid or /etc/subgid (for a hint)."""
    start = 100000
    for path in (SUBUID, SUBGID):
        try:
            with open(path, "rb") as f:
                lines = f.read(MAX_SUBID_FILE).decode("utf-8", "replace").splitlines()
        except OSError:
            continue
        for line in lines:
            fields = line.strip().split(":")
            if len(fields) != 3:
                continue
            first, n = number(fields[1]), number(fields[2])
            if first is not None and n is not None and first + n <= ID_LIMIT:
                start = max(start, first + n)
    return f"{start}-{start + count - 1}"


def add_range_command(name: str) -> str:
    r = free_range()
    return f"usermod --add-subuids {r} --add-subgids {r} {name}"


def outside_hint() -> str:
    """The end of a one-line error about an ID this namespace does not map: "X is " + this.

    Reads the host's /etc/passwd and /etc/subuid: call it before leaving the host's root.
    """
    size = max((a + n for a, _, n in read_map("uid")), default=0)
    name = _user_name(host_uid())
    return (
        f"outside the IDs of the user namespace (0-{size - 1}): give {name} subordinate "
        f"IDs (as root: {add_range_command(name)}), or run as root"
    )


# -- the rootless mapping ------------------------------------------------------------------
def subordinate_ranges(path: str, name: str, uid: int) -> list[tuple[int, int]]:
    """(start, count) of every range `path` (/etc/subuid or /etc/subgid) gives the user,
    named by login name or by number, in file order (as newuidmap and podman read it)."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_SUBID_FILE)
    except OSError:
        return []
    out = []
    for raw in data.decode("utf-8", "replace").splitlines():
        fields = raw.strip().split(":")
        if len(fields) != 3 or fields[0] not in (name, str(uid)):
            continue
        start, count = number(fields[1]), number(fields[2])
        if start is not None and count is not None and count > 0 and start + count <= ID_LIMIT - 1:
            out.append((start, count))
    return out


class Mapping:
    """The rootless mapping of one user: the extents for uid_map and gid_map. Never changed
    once made; equal to another of the same fields."""

    __slots__ = ("gids", "uids", "user")

    def __init__(self, user: str, uids: tuple[Extent, ...], gids: tuple[Extent, ...]) -> None:
        self.user = user
        self.uids = uids
        self.gids = gids

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Mapping):
            return NotImplemented
        return (self.user, self.uids, self.gids) == (other.user, other.uids, other.gids)

    def __hash__(self) -> int:
        return hash((self.user, self.uids, self.gids))

    def __repr__(self) -> str:
        return f"Mapping(user={self.user!r}, uids={self.uids!r}, gids={self.gids!r})"

    @property
    def single(self) -> bool:
        """Only the user's own IDs are mapped (no subordinate range for one of them)."""
        return len(self.uids) == 1 or len(self.gids) == 1


def _extents(own: int, ranges: list[tuple[int, int]]) -> tuple[Extent, ...]:
    out: list[Extent] = [(0, own, 1)]
    nxt = 1
    for start, count in ranges:
        count = min(count, ID_LIMIT - 1 - nxt)
        if count <= 0:
            break
        out.append((nxt, start, count))
        nxt += count
    return tuple(out)


def rootless_mapping(uid: int | None = None, gid: int | None = None) -> Mapping:
    """podman's mapping for the user `uid` (default: this process's real user)."""
    uid = os.getuid() if uid is None else uid
    gid = os.getgid() if gid is None else gid
    name = _user_name(uid)
    return Mapping(
        name,
        _extents(uid, subordinate_ranges(SUBUID, name, uid)),
        _extents(gid, subordinate_ranges(SUBGID, name, uid)),
    )


def single_mapping_notice(m: Mapping) -> str:
    """The one line that says what a namespace without subordinate IDs cannot do."""
    missing = " and ".join(p for p, ext in ((SUBUID, m.uids), (SUBGID, m.gids)) if len(ext) == 1)
    return (
        f"no subordinate IDs for {m.user} in {missing}: only your own user and group are "
        "mapped (as root), so files of other owners in an image cannot be made or used "
        f"(as root: {add_range_command(m.user)})"
    )


# -- entering it ------------------------------------------------------------------------------
def _map_line(extents: tuple[Extent, ...]) -> list[str]:
    return [str(x) for ext in extents for x in ext]


def _helper(pid: int, m: Mapping, tools: list[str], go: int, report: int) -> None:
    """In a child left outside: once `pid` has unshared, run newuidmap and newgidmap on it
    (both at once), and report "OK" or the first error line of the one that failed."""
    msg = b""
    try:
        if os.read(go, 1) == b"U":
            running = []
            for tool, extents in zip(tools, (m.uids, m.gids), strict=True):
                r, w = os.pipe()
                child = os.posix_spawn(
                    tool,
                    [tool, str(pid), *_map_line(extents)],
                    {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
                    file_actions=[(os.POSIX_SPAWN_DUP2, w, 2), (os.POSIX_SPAWN_CLOSE, r)],
                )
                os.close(w)
                running.append((tool, child, r))
            for tool, child, r in running:
                err = syscalls.read_to_eof(r)
                os.close(r)
                _, status = os.waitpid(child, 0)
                if status != 0 and not msg:
                    lines = err.decode(errors="replace").strip().splitlines()
                    why = lines[-1] if lines else f"exit status {os.waitstatus_to_exitcode(status)}"
                    msg = f"{os.path.basename(tool)}: {why}".encode()
    except BaseException as e:  # noqa: BLE001 - reported to the parent, never raised here
        msg = f"{e}".encode(errors="replace") or b"failed"
    try:
        os.write(report, msg or b"OK")
    finally:
        os._exit(0)


def _write(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def _unshare_user() -> None:
    try:
        syscalls.unshare(syscalls.CLONE_NEWUSER)
    except OSError as e:
        if e.errno == errno.EINVAL:
            why = "pyunion is multi-threaded at this point (a bug: please report it)"
        elif e.errno == errno.ENOSPC:
            why = (
                "the limit of user namespaces is reached or zero: raise it as root "
                "(sysctl -w user.max_user_namespaces=15000)"
            )
        else:
            why = (
                "unprivileged user namespaces are disabled: enable them as root "
                "(sysctl -w kernel.unprivileged_userns_clone=1, or on Ubuntu "
                "kernel.apparmor_restrict_unprivileged_userns=0)"
            )
        raise UserError(f"cannot create a user namespace ({e.strerror}): {why}") from None


def enter(m: Mapping) -> None:
    """Move this process into a new user namespace with mapping `m` (it must be
    single-threaded). With subordinate ranges, a child left outside runs the setuid
    helpers on us; without, we write our own single mapping."""
    import shutil

    tools = [shutil.which(t) or "" for t in ("newuidmap", "newgidmap")]
    if m.single or not all(tools):
        if not m.single:
            print(
                "pyunion: warning: newuidmap/newgidmap are missing (install the uidmap "
                "package): only your own user and group are mapped",
                file=sys.stderr,
            )
            m = Mapping(m.user, m.uids[:1], m.gids[:1])
        else:
            print(f"pyunion: warning: {single_mapping_notice(m)}", file=sys.stderr)
        uid, gid = m.uids[0][1], m.gids[0][1]
        _unshare_user()
        try:
            _write("/proc/self/setgroups", "deny")  # the kernel's rule for a map written by us
            _write("/proc/self/uid_map", f"0 {uid} 1\n")
            _write("/proc/self/gid_map", f"0 {gid} 1\n")
        except OSError as e:
            raise UserError(f"cannot map IDs into the user namespace: {e.strerror}") from None
        return
    go_r, go_w = os.pipe()
    rep_r, rep_w = os.pipe()
    me = os.getpid()
    child = os.fork()
    if child == 0:
        os.close(go_w)
        os.close(rep_r)
        _helper(me, m, tools, go_r, rep_w)
    os.close(go_r)
    os.close(rep_w)
    try:
        try:
            _unshare_user()
        except UserError:
            os.close(go_w)  # the helper sees EOF and leaves
            go_w = -1
            raise
        os.write(go_w, b"U")
        os.close(go_w)
        go_w = -1
        msg = syscalls.read_to_eof(rep_r)
    finally:
        if go_w >= 0:
            os.close(go_w)
        os.close(rep_r)
        os.waitpid(child, 0)
    if msg != b"OK":
        text = msg.decode(errors="replace")
        raise UserError(
            f"cannot map IDs into the user namespace: {text} (check the ranges of "
            f"{m.user} in {SUBUID} and {SUBGID})"
        )


def enter_rootless() -> None:
    """Become root in the rootless user namespace, unless root already (see the module)."""
    if os.geteuid() == 0:
        return
    enter(rootless_mapping())
