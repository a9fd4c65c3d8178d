"""The engine-state scheduler without vLLM: cancellation while queued or admitted, a failing
switch, the fairness bound, batching.

The scheduler is real; the engine is a small recorder (:class:`Engine`) that checks the
scheduler's contract from the engine's side — ``switch`` is only called while no request runs,
and requests of two states never run together.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest

from deltaserve.server.bindings import BASE_STATE
from deltaserve.server.scheduler import SchedulerConfig, StateScheduler

X, Y = "x@000000000001", "y@000000000002"


class Engine:
    """What the scheduler drives: a state, switches into it, requests running in it."""

    def __init__(self, failing: tuple[str, ...] = ()):
        self.state = BASE_STATE
        self.running: dict[str, int] = {}
        self.switches: list[str] = []
        self.violations: list[str] = []
        self.failing = failing

    async def switch(self, state: str) -> None:
        if any(self.running.values()):
            self.violations.append(f"switch to {state} while {self.running} run")
        if state in self.failing:
            raise RuntimeError(f"the worker could not enter {state}")
        await asyncio.sleep(0.001)
        self.switches.append(state)
        self.state = state

    async def request(self, scheduler: StateScheduler, state: str, seconds: float = 0.0) -> float:
        """One request: returns when it was admitted (monotonic seconds)."""
        async with scheduler.slot(state):
            admitted = time.monotonic()
            if self.state != state:
                self.violations.append(f"{state} request admitted in {self.state}")
            if any(n for s, n in self.running.items() if s != state):
                self.violations.append(f"{state} request runs beside {self.running}")
            self.running[state] = self.running.get(state, 0) + 1
            try:
                await asyncio.sleep(seconds)
            finally:
                self.running[state] -= 1
        return admitted


@contextlib.asynccontextmanager
async def scheduled(engine: Engine, **config):
    scheduler = StateScheduler(engine.switch, SchedulerConfig(**{"min_batch_wait_s": 0.0, **config}))
    try:
        yield scheduler
    finally:
        await scheduler.close()
    assert not engine.violations, engine.violations


async def until(condition, timeout: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.002)


async def test_requests_of_the_current_state_are_admitted_without_a_switch():
    engine = Engine()
    async with scheduled(engine) as scheduler:
        await asyncio.gather(*(engine.request(scheduler, BASE_STATE, 0.01) for _ in range(5)))
    assert engine.switches == []


async def test_queued_requests_of_one_state_are_served_by_one_switch():
    engine = Engine()
    async with scheduled(engine) as scheduler:
        base = asyncio.create_task(engine.request(scheduler, BASE_STATE, 0.05))
        await until(lambda: engine.running.get(BASE_STATE))
        await asyncio.gather(base, *(engine.request(scheduler, X, 0.01) for _ in range(4)))
        await engine.request(scheduler, BASE_STATE)
    assert engine.switches == [X, BASE_STATE]


async def test_a_request_cancelled_while_queued_leaves_no_trace():
    engine = Engine()
    async with scheduled(engine, max_wait_s=0.05) as scheduler:
        base = asyncio.create_task(engine.request(scheduler, BASE_STATE, 0.2))
        await until(lambda: engine.running.get(BASE_STATE))
        queued = asyncio.create_task(engine.request(scheduler, X))
        await asyncio.sleep(0.01)
        queued.cancel()
        with pytest.raises(asyncio.CancelledError):
            await queued
        await base
        await engine.request(scheduler, BASE_STATE)  # nothing is waiting: admitted in place
    assert engine.switches == []  # the cancelled request's state was never entered


async def test_a_request_cancelled_as_it_is_admitted_gives_its_slot_back():
    """The scheduler resolves the waiter and the caller is cancelled before it resumes
    (a client that leaves at that moment): the slot must not stay taken, or the engine
    could never leave the state again."""
    engine = Engine()
    waiter: asyncio.Task | None = None
    switch = engine.switch

    async def switch_then_cancel(state: str) -> None:
        await switch(state)
        if state == X:  # runs before the waiter's wake-up, which the admission schedules
            asyncio.get_running_loop().call_soon(waiter.cancel)

    engine.switch = switch_then_cancel
    async with scheduled(engine) as scheduler:
        base = asyncio.create_task(engine.request(scheduler, BASE_STATE, 0.05))
        await until(lambda: engine.running.get(BASE_STATE))
        waiter = asyncio.create_task(engine.request(scheduler, X))
        await base
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert engine.switches == [X]
        await asyncio.wait_for(engine.request(scheduler, Y), 2.0)
    assert engine.switches == [X, Y]


async def test_a_request_cancelled_while_running_releases_the_state():
    engine = Engine()
    async with scheduled(engine) as scheduler:
        running = asyncio.create_task(engine.request(scheduler, X, 60.0))
        await until(lambda: engine.running.get(X))
        running.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await running
        await asyncio.wait_for(engine.request(scheduler, BASE_STATE), 2.0)
    assert engine.switches == [X, BASE_STATE]


async def test_a_failing_switch_fails_that_state_only():
    engine = Engine(failing=(X,))
    async with scheduled(engine) as scheduler:
        base = asyncio.create_task(engine.request(scheduler, BASE_STATE, 0.05))
        await until(lambda: engine.running.get(BASE_STATE))
        doomed = [asyncio.create_task(engine.request(scheduler, X)) for _ in range(3)]
        await base
        for task in doomed:
            with pytest.raises(RuntimeError, match="could not enter"):
                await asyncio.wait_for(task, 2.0)
        assert scheduler.current == BASE_STATE and engine.state == BASE_STATE
        await asyncio.wait_for(engine.request(scheduler, BASE_STATE), 2.0)  # admitted in place
        await asyncio.wait_for(engine.request(scheduler, Y), 2.0)  # other states still switch
    assert engine.switches == [Y]


async def test_a_queued_state_gets_the_engine_within_the_bound_under_steady_traffic():
    """Base requests keep arriving and overlapping, so the base state never runs dry; the
    queued request must still be admitted within ``max_wait_s`` + the drain of the requests
    already running (one base request here) + one switch."""
    max_wait, base_s = 0.2, 0.05
    engine = Engine()
    async with scheduled(engine, max_wait_s=max_wait) as scheduler:
        stop = asyncio.Event()
        traffic: list[asyncio.Task] = []

        async def steady_base():
            while not stop.is_set():
                traffic.append(asyncio.create_task(engine.request(scheduler, BASE_STATE, base_s)))
                await asyncio.sleep(base_s / 5)

        producer = asyncio.create_task(steady_base())
        await until(lambda: engine.running.get(BASE_STATE))
        queued_at = time.monotonic()
        admitted = await asyncio.wait_for(engine.request(scheduler, X), 5.0)
        stop.set()
        await producer
        await asyncio.gather(*traffic)
    waited = admitted - queued_at
    assert max_wait <= waited <= max_wait + base_s + 0.15, waited
    assert engine.switches[0] == X
