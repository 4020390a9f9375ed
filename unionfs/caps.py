"""Linux capabilities of a `pyunion run` container: names, podman's default set, and applying it.

The container gets podman's default capabilities (containers.conf's
`default_capabilities`), changed by `--cap-add`/`--cap-drop`/`--privileged`
the way podman merges them. What the command ends up with is podman's too:
the bounding set is the container's set; a root command has it as its
effective and permitted sets; a command run as another user has empty
effective and permitted sets (a setuid-root program it runs gets the bounding
set back, as in podman, unless no_new_privs is set); the inheritable and
ambient sets are always empty (podman's fix for CVE-2022-27649).
"""

from __future__ import annotations

from . import syscalls
from .errors import UserError

# linux/capability.h: the kernel's numbers, which never change.
NAMES = (
    "CHOWN",
    "DAC_OVERRIDE",
    "DAC_READ_SEARCH",
    "FOWNER",
    "FSETID",
    "KILL",
    "SETGID",
    "SETUID",
    "SETPCAP",
    "LINUX_IMMUTABLE",
    "NET_BIND_SERVICE",
    "NET_BROADCAST",
    "NET_ADMIN",
    "NET_RAW",
    "IPC_LOCK",
    "IPC_OWNER",
    "SYS_MODULE",
    "SYS_RAWIO",
    "SYS_CHROOT",
    "SYS_PTRACE",
    "SYS_PACCT",
    "SYS_ADMIN",
    "SYS_BOOT",
    "SYS_NICE",
    "SYS_RESOURCE",
    "SYS_TIME",
    "SYS_TTY_CONFIG",
    "MKNOD",
    "LEASE",
    "AUDIT_WRITE",
    "AUDIT_CONTROL",
    "SETFCAP",
    "MAC_OVERRIDE",
    "MAC_ADMIN",
    "SYSLOG",
    "WAKE_ALARM",
    "BLOCK_SUSPEND",
    "AUDIT_READ",
    "PERFMON",
    "BPF",
    "CHECKPOINT_RESTORE",
)
NUMBERS = {name: i for i, name in enumerate(NAMES)}

# podman's default_capabilities (containers.conf).
DEFAULT = frozenset(
    NUMBERS[n]
    for n in (
        "CHOWN",
        "DAC_OVERRIDE",
        "FOWNER",
        "FSETID",
        "KILL",
        "NET_BIND_SERVICE",
        "SETFCAP",
        "SETGID",
        "SETPCAP",
        "SETUID",
        "SYS_CHROOT",
    )
)


def name(cap: int) -> str:
    """CAP_X as the kernel and podman spell it (CAP_41 for one newer than this table)."""
    return "CAP_" + (NAMES[cap] if cap < len(NAMES) else str(cap))


def mask(caps: frozenset[int] | set[int]) -> int:
    out = 0
    for c in caps:
        out |= 1 << c
    return out


def last_cap() -> int:
    """The highest capability this kernel knows."""
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            return int(f.read())
    except (OSError, ValueError):
        return len(NAMES) - 1


def bounding_set() -> frozenset[int]:
    """The capabilities this process may still hand out (its bounding set)."""
    return frozenset(c for c in range(last_cap() + 1) if syscalls.capbset_read(c))


def parse(items: list[str], option: str) -> set[str]:
    """`--cap-add`/`--cap-drop` values (repeated or comma-separated; CAP_ optional; ALL)."""
    out: set[str] = set()
    for item in items:
        for word in item.split(","):
            w = word.strip().upper()
            w = w.removeprefix("CAP_")
            if w != "ALL" and w not in NUMBERS:
                raise UserError(f"{option}: unknown capability {word.strip()!r}", 125)
            out.add(w)
    return out


def merge(
    base: frozenset[int], adds: set[str], drops: set[str], available: frozenset[int]
) -> frozenset[int]:
    """podman's MergeCapabilities: `ALL` in drops keeps only the adds; `ALL` in adds means
    every capability pyunion itself has; the same capability added and dropped is an error."""
    if "ALL" in drops:
        if "ALL" in adds:
            raise UserError("--cap-add ALL and --cap-drop ALL cannot be used together", 125)
        return frozenset(NUMBERS[a] for a in adds) & available
    if "ALL" in adds:
        base, adds = available, set()
    for cap in adds & drops:
        raise UserError(f"capability CAP_{cap} cannot be both added and dropped", 125)
    caps = (set(base) | {NUMBERS[a] for a in adds}) - {NUMBERS[d] for d in drops}
    return frozenset(caps) & available


def apply_bounding(keep: frozenset[int], last: int) -> None:
    """Drop every capability not in `keep` from the bounding set (needs CAP_SETPCAP)."""
    for cap in range(last + 1):
        if cap not in keep:
            syscalls.capbset_drop(cap)


def apply_sets(keep: frozenset[int], root: bool) -> None:
    """Effective and permitted = `keep` for root, empty otherwise; inheritable, ambient empty.

    Called after the switch to the command's user (with keepcaps on, so that the
    permitted set survived it).
    """
    _, permitted, _ = syscalls.capget()
    wanted = mask(keep) & permitted if root else 0
    syscalls.capset(wanted, wanted, 0)
    syscalls.clear_ambient_caps()
