"""The request loop's adaptive spin (reqloop.py), on a pipe standing for /dev/fuse."""

from __future__ import annotations

import os

import trio
import trio.testing

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
        # A request right away (a spin would have caught it): spinning again. Its
        # wake-up through trio must come within the spin window and WAKE_S, which a
        # loaded machine can miss now and then: a few tries (never resuming fails all).
        for _ in range(50):
            os.write(w, b"x")
            await low.wait_readable(r)
            os.read(r, 1)
            if low.spinning:
                break
        assert low.spinning
        assert low.spins == spins  # backed off until then: no spin
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


async def test_read_lock_taken_again_without_yielding_waiter_gets_it_when_holder_sleeps() -> None:
    lock = reqloop._Trio(0).Lock()
    order: list[str] = []

    async def other() -> None:
        async with lock:
            order.append("other")

    async with trio.open_nursery() as nursery:
        async with lock:
            nursery.start_soon(other)
            await trio.testing.wait_all_tasks_blocked()  # `other` waits for the lock
            order.append("held")
        # Released and taken again many times over without a checkpoint: `other`,
        # woken, has not run in between (trio's Lock would have handed it over).
        for i in range(100):
            async with lock:
                order.append(f"again{i}")
        assert "other" not in order
        # The holder sleeps (as the loop does in wait_readable) holding the lock:
        # the waiter stays out; once it is free, the waiter gets it.
        async with lock:
            await trio.testing.wait_all_tasks_blocked()
            assert "other" not in order
        await trio.testing.wait_all_tasks_blocked()
    assert order[-1] == "other" and order.count("other") == 1
