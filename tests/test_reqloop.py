"""The request loop's adaptive spin (reqloop.py), on a pipe standing for /dev/fuse."""

from __future__ import annotations

import os

import trio

from unionfs import reqloop


async def _wait_with_late_writer(low: reqloop._Lowlevel, r: int, w: int, delay: float) -> None:
    async with trio.open_nursery() as nursery:

        async def writer() -> None:
            await trio.sleep(delay)
            os.write(w, b"x")

        nursery.start_soon(writer)
        await low.wait_readable(r)
    os.read(r, 1)


async def test_spin_backs_off_when_requests_come_seldom_and_resumes_when_they_come_fast() -> None:
    r, w = os.pipe()
    try:
        low = reqloop._Lowlevel(30e-6)
        # A request waiting already: taken by the spin.
        os.write(w, b"x")
        await low.wait_readable(r)
        os.read(r, 1)
        assert (low.hits, low.spins, low.spinning) == (1, 1, True)
        # Requests 20 ms apart: every spin misses; its credit spent, no more spinning.
        for _ in range(reqloop.CREDIT_START + reqloop.HIT_CREDIT):
            assert low.spinning
            await _wait_with_late_writer(low, r, w, 0.02)
        assert not low.spinning
        spins = low.spins
        await _wait_with_late_writer(low, r, w, 0.02)
        assert low.spins == spins and not low.spinning  # slept at once, stays backed off
        # A request right away (a spin would have caught it): spinning again.
        os.write(w, b"x")
        await low.wait_readable(r)
        os.read(r, 1)
        assert low.spinning
        os.write(w, b"x")
        await low.wait_readable(r)
        os.read(r, 1)
        assert low.spins == spins + 1 and low.hits == 2
        # One hit in three keeps it spinning.
        for _ in range(20):
            await _wait_with_late_writer(low, r, w, 0.005)
            await _wait_with_late_writer(low, r, w, 0.005)
            os.write(w, b"x")
            await low.wait_readable(r)
            os.read(r, 1)
            assert low.spinning
    finally:
        os.close(r)
        os.close(w)
