"""The request loop's wait for /dev/fuse: poll briefly before going to sleep.

pyfuse3 waits for each request with trio's `wait_readable`: the daemon sleeps
in `epoll_wait`, and the kernel has to wake it when the next request comes.
On the 2-core VMs we measure on, that sleep and wake-up cost about 40 µs per
request, more than most of our handlers take. A program working on the mount
(`find`, `tar`, a compiler, dpkg) sends its next request a few µs after our
reply, so polling the fd for a short while (`spin` µs) before sleeping catches
most requests without the sleep: a getxattr round trip drops from ~65 µs to
~34 µs (fuse-overlayfs, C and threaded: ~48 µs). The price is at most `spin`
µs of CPU after each request, and none while the mount is idle.

The spin adapts, so that it never takes the CPU from the program it serves (on
two cores, a program that computes between its requests — a compiler, an exec
storm — would otherwise share its core with a daemon polling for nothing).
Spinning runs on credit: a spin that catches a request earns `HIT_CREDIT`, one
that finds nothing costs 1, and at no credit the loop sleeps at once, so it
keeps spinning while at least one spin in `HIT_CREDIT + 1` pays and stops
after a few fruitless ones. (Measured here: with one in three, `find` on a warm
cache was ~10% slower than with a fixed spin; with one in five, no slower.) It spins again
as soon as a request comes within the spin window after it went to sleep,
that is as soon as a spin would have paid off. A mount that is idle, or whose
requests come seldom, costs no spin at all.

pyfuse3 has no hook for this, but its loop reaches trio through its module
global `trio` (pyfuse3.asyncio swaps it the same way), so we hand it a proxy
whose `lowlevel.wait_readable` polls first. pyfuse3 calls `wait_readable` with
its read lock held and reads right after it returns, with no await in
between, so the poll answers the same question for the same single reader.

The proxy's `Lock` is that read lock (`_ReadLock`): trio's own yields to the
scheduler on every acquire and hands itself to the worker task queued behind,
so pyfuse3's two worker tasks took turns through trio's scheduler on every
request (~10 µs each here). It is installed with spin=0 too.
"""

from __future__ import annotations

import select
import time
from typing import Any

import trio

# After this many requests in a row taken without sleeping, wait through trio
# once, so that the scheduler runs (thread completions, signals) under load.
STREAK_MAX = 64
# Spin credit: a hit earns HIT_CREDIT (up to CREDIT_MAX), a miss costs 1; none left:
# sleep at once until a spin would have paid again, then start over with CREDIT_START.
HIT_CREDIT = 4
CREDIT_MAX = 32
CREDIT_START = 8
# A sleep is measured with its wake-up (~40 µs here): a request this much past the
# spin window had come within it.
WAKE_S = 100e-6


class _Lowlevel:
    def __init__(self, spin_s: float) -> None:
        self._spin = spin_s
        self._streak = 0
        self._credit = CREDIT_START
        self.spinning = True  # False: backed off, requests come too seldom
        self.hits = self.spins = 0  # counters, for tests and debugging
        self._polls: dict[int, Any] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(trio.lowlevel, name)

    async def wait_readable(self, fd: Any) -> None:
        if not self._spin:
            await trio.lowlevel.wait_readable(fd)
            return
        if self.spinning and self._streak < STREAK_MAX and isinstance(fd, int):
            poll = self._polls.get(fd)
            if poll is None:
                p = select.poll()
                p.register(fd, select.POLLIN)
                poll = self._polls[fd] = p.poll
            self.spins += 1
            # Most requests are queued already (the program sent the next one while we
            # answered): one poll, and no clock read, before the spin proper.
            if poll(0) or self._spun(poll):  # readable, or an error the read will report
                self._streak += 1
                credit = self._credit + HIT_CREDIT
                self._credit = credit if credit < CREDIT_MAX else CREDIT_MAX
                self.hits += 1
                return
            self._credit -= 1
            if self._credit <= 0:
                self.spinning = False
        self._streak = 0
        if self.spinning:
            await trio.lowlevel.wait_readable(fd)
            return
        clock = time.perf_counter
        slept = clock()
        await trio.lowlevel.wait_readable(fd)
        if clock() - slept <= self._spin + WAKE_S:  # a spin would have caught this one
            self.spinning = True
            self._credit = CREDIT_START

    def _spun(self, poll: Any) -> bool:
        """Poll until a request comes (True) or the spin window has passed (False)."""
        clock = time.perf_counter
        deadline = clock() + self._spin
        while clock() < deadline:
            if poll(0):
                return True
        return bool(poll(0))


class _ReadLock:
    """pyfuse3's read lock, taken without a trip through trio's scheduler.

    pyfuse3 holds it only around its wait for /dev/fuse. trio's `Lock` yields
    to the scheduler on every acquire and hands the lock over to the task
    queued behind it, so its two worker tasks took turns through the scheduler
    on every request. This one is free as soon as it is released: the task
    that has just answered a request takes it again and reads the next one
    without yielding, and a waiting task is woken to try again when it next
    runs (the loop yields at least every `STREAK_MAX` requests, and whenever it
    sleeps or a handler awaits something, as a copy-up in a worker thread).
    """

    def __init__(self) -> None:
        self._held = False
        self._lot = trio.lowlevel.ParkingLot()

    async def __aenter__(self) -> None:
        while self._held:
            await self._lot.park()
        self._held = True

    async def __aexit__(self, *exc: object) -> None:
        self._held = False
        if self._lot:
            self._lot.unpark()


class _Trio:
    def __init__(self, spin_s: float) -> None:
        self.lowlevel = _Lowlevel(spin_s)

    @staticmethod
    def Lock() -> _ReadLock:  # trio's name: pyfuse3 calls trio.Lock()
        return _ReadLock()

    def __getattr__(self, name: str) -> Any:
        return getattr(trio, name)


def install(pyfuse3: Any, spin_us: int) -> bool:
    """Hook pyfuse3's request loop: its read lock (`_ReadLock`) and, unless
    `spin_us` is 0, a poll of /dev/fuse for `spin_us` µs before sleeping.

    Returns False (and changes nothing) when this pyfuse3 is not built the way
    this relies on.
    """
    if getattr(pyfuse3, "trio", None) is not trio or not hasattr(pyfuse3, "_wait_fuse_readable"):
        return False
    pyfuse3.trio = _Trio(spin_us / 1e6)
    return True
