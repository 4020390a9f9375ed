"""How big a run is: file sizes, counts, repetitions, modes, time limits.

`FULL` is the issue's benchmark; `QUICK` keeps the same shape but small enough
to run in under three minutes; `TINY` is for the smoke test.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30


@dataclass(frozen=True)
class Sizes:
    name: str
    big: int  # W3, W9: the big file, read sequentially and at random
    mid: int  # W4: the file appended to (copy-up)
    n_small: int  # a few more data files of `small` bytes in the bottom layer
    small: int
    w5_files: int  # W5: files created, then deleted
    w6_true: int  # W6: runs of /bin/true in a chroot
    w6_python: int  # W6: runs of python3 -c 'import json,email,http.client'
    w7_files: int  # W7: lower files renamed (and as many others deleted)
    w8_bytes: int  # W8: size of the tarball's contents
    w9_bytes: int  # W9: bytes read in random 4 KiB reads
    stack_files: int  # the stack whose mount time is measured
    generated_files: int  # size of the generated root filesystem (when there is no debootstrap)
    reps: int
    modes: tuple[str, ...]
    timeout: float  # seconds for one workload run

    def key(self) -> str:
        """What distinguishes one cached image from another."""
        return (
            f"big{self.big}-mid{self.mid}-s{self.n_small}x{self.small}-w7{self.w7_files}"
            f"-w8{self.w8_bytes}"
        )

    def with_(self, **kw: object) -> Sizes:
        return replace(self, **kw)  # type: ignore[arg-type]


FULL = Sizes(
    name="full",
    big=GiB,
    mid=200 * MiB,
    n_small=4,
    small=50 * MiB,
    w5_files=10_000,
    w6_true=200,
    w6_python=20,
    w7_files=2_000,
    w8_bytes=100 * MiB,
    w9_bytes=64 * MiB,
    stack_files=100_000,
    generated_files=7_000,
    reps=3,
    modes=("cold", "warm"),
    timeout=900.0,
)

QUICK = Sizes(
    name="quick",
    big=64 * MiB,
    mid=16 * MiB,
    n_small=2,
    small=4 * MiB,
    w5_files=1_000,
    w6_true=20,
    w6_python=2,
    w7_files=200,
    w8_bytes=10 * MiB,
    w9_bytes=16 * MiB,
    stack_files=10_000,
    generated_files=3_000,
    reps=1,
    modes=("warm",),
    timeout=120.0,
)

TINY = Sizes(
    name="tiny",
    big=1 * MiB,
    mid=256 * KiB,
    n_small=1,
    small=64 * KiB,
    w5_files=20,
    w6_true=2,
    w6_python=1,
    w7_files=10,
    w8_bytes=256 * KiB,
    w9_bytes=64 * KiB,
    stack_files=300,
    generated_files=150,
    reps=1,
    modes=("warm",),
    timeout=30.0,
)

PRESETS = {s.name: s for s in (FULL, QUICK, TINY)}
