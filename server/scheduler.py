"""Engine-state scheduler: groups requests by the engine state they need and switches states.

Base traffic and concurrent deltas (LoRA, and plan deltas within the policy) share the
:data:`~deltaserve.server.bindings.BASE_STATE` and ride in vLLM's mixed batches. An exclusive
delta (a plan delta the policy gives a state, see :mod:`deltaserve.server.bindings`) needs the
whole engine in its own state, so requests of different states never run together:

- A request for the **current** state is admitted at once — unless the state is
  *closing* (below), in which case it queues like the others.
- Requests for other states queue, one FIFO per state.
- When the oldest queued request has waited ``max_wait_s``, or the current state has
  nothing left to do, the current state *closes*: no more admissions, in-flight
  requests finish (drain), the engine switches to the state whose queued request is
  oldest, and **all** queued requests of that state are admitted together (batching).
- ``min_batch_wait_s``: a switch *into an exclusive state* waits at most this long
  for more requests of that state to arrive, so one switch serves a batch.

The wait of any request is therefore bounded by ``max_wait_s`` + the drain time of
the requests already running (bounded by their ``max_tokens``) + one switch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from deltaserve.server import metrics
from deltaserve.server.bindings import BASE_STATE

log = logging.getLogger(__name__)


@dataclass
class SchedulerConfig:
    """Policy knobs (``deltaserve serve --max-state-wait``, ``--state-batch-wait``)."""

    max_wait_s: float = 2.0
    """Longest a queued request waits before its state gets the engine next (the fairness bound)."""
    min_batch_wait_s: float = 0.05
    """Before switching into an exclusive state, wait this long for more of its requests."""


class _Waiter:
    __slots__ = ("state", "since", "future")

    def __init__(self, state: str):
        self.state = state
        self.since = time.monotonic()
        self.future: asyncio.Future = asyncio.get_running_loop().create_future()


class StateScheduler:
    """Admits requests into engine states; calls ``switch(state)`` to change the engine's state."""

    def __init__(self, switch: Callable[[str], Awaitable[None]], config: SchedulerConfig | None = None):
        self._switch = switch
        self.config = config or SchedulerConfig()
        self.current = BASE_STATE
        self._active = 0
        self._closing = False
        self._queues: dict[str, deque[_Waiter]] = {}
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task | None = None
        self.switches = 0

    # ---- request side -------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def slot(self, state: str):
        """Hold the engine in ``state`` for the body (one request)."""
        await self._admit(state)
        try:
            yield
        finally:
            self._active -= 1
            if self._active == 0:
                self._wakeup.set()

    async def _admit(self, state: str) -> None:
        if state == self.current and not self._closing and not self._queues.get(state):
            self._active += 1
            metrics.STATE_WAIT.labels(_label(state)).observe(0.0)
            return
        waiter = _Waiter(state)
        self._queues.setdefault(state, deque()).append(waiter)
        self._update_depth(state)
        self._ensure_loop()
        self._wakeup.set()
        try:
            await waiter.future  # the loop increments _active before resolving it
        except asyncio.CancelledError:
            if waiter.future.done() and not waiter.future.cancelled():
                self._active -= 1  # admitted and cancelled at once: give the slot back
                if self._active == 0:
                    self._wakeup.set()
            else:
                with contextlib.suppress(ValueError):
                    self._queues[state].remove(waiter)
                self._update_depth(state)
            raise
        metrics.STATE_WAIT.labels(_label(state)).observe(time.monotonic() - waiter.since)

    # ---- the switching loop -------------------------------------------------------

    def _ensure_loop(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="deltaserve-state-scheduler")

    def _oldest(self) -> _Waiter | None:
        heads = [q[0] for q in self._queues.values() if q]
        return min(heads, key=lambda w: w.since) if heads else None

    async def _run(self) -> None:
        while True:
            self._wakeup.clear()
            oldest = self._oldest()
            if oldest is None:
                self._closing = False
                await self._wakeup.wait()
                continue
            if oldest.state == self.current and not self._closing:
                self._admit_all(self.current)  # arrived while closing was being decided
                continue
            overdue = time.monotonic() - oldest.since >= self.config.max_wait_s
            if self._active and not overdue and not self._closing:
                # The current state is busy and nobody waited too long yet: check again later.
                await self._sleep_or_wakeup(self.config.max_wait_s - (time.monotonic() - oldest.since))
                continue
            self._closing = True
            if self._active:
                await self._wakeup.wait()  # drain: woken when the last active request ends
                continue
            target = oldest.state
            if target != BASE_STATE and self.config.min_batch_wait_s > 0:
                await asyncio.sleep(self.config.min_batch_wait_s)
            await self._do_switch(target)
            self._closing = False
            self._admit_all(target)

    async def _sleep_or_wakeup(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wakeup.wait(), max(seconds, 0.001))

    async def _do_switch(self, target: str) -> None:
        if target == self.current:
            return
        started = time.perf_counter()
        try:
            await self._switch(target)
        except Exception as exc:
            # The engine could not enter the state: fail that state's requests, stay where we are.
            log.error("switch %s -> %s failed: %s", self.current, target, exc)
            for waiter in self._queues.pop(target, deque()):
                if not waiter.future.done():
                    waiter.future.set_exception(exc)
            self._update_depth(target)
            return
        elapsed = time.perf_counter() - started
        metrics.STATE_SWITCHES.labels(_label(self.current), _label(target)).inc()
        metrics.STATE_SWITCH_SECONDS.observe(elapsed)
        log.debug("engine state %s -> %s in %.1f ms", self.current, target, elapsed * 1e3)
        self.current = target
        self.switches += 1

    def _admit_all(self, state: str) -> None:
        queue = self._queues.get(state)
        while queue:
            waiter = queue.popleft()
            if not waiter.future.done():
                self._active += 1
                waiter.future.set_result(None)
        self._update_depth(state)

    def _update_depth(self, state: str) -> None:
        metrics.STATE_QUEUE_DEPTH.labels(_label(state)).set(len(self._queues.get(state, ())))

    def state_removed(self, state: str) -> None:
        """A state's delta was unstaged (only ever with none of its requests queued or running:
        they hold leases on the delta). If the engine was left in it, the worker has reverted it."""
        if self.current == state:
            self.current = BASE_STATE

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


def _label(state: str) -> str:
    """Metric label of a state: the task name (bounded), never the version digest."""
    return state.split("@", 1)[0]
