"""vLLM's engine processes leave signals to the server, and still die with it.

Registered as a vLLM *general plugin* (entry point ``deltaserve_engine_process`` in ``pyproject.toml``): vLLM
calls :func:`apply` in every process it runs, and in its engine core process it does so in
``EngineCore.__init__``, after vLLM installed that process's SIGTERM/SIGINT handlers and before the executor
starts the worker processes. It acts only in an engine core started by :class:`deltaserve.server.engine.Engine`
(``DELTASERVE_ENGINE_OWN_GROUP`` in the environment the engine core inherits, see ``plugins/env.py``).

Why: SIGTERM or SIGINT to the server's whole process group (Ctrl-C in a terminal, ``kill -- -PGID``, many
supervisors) also reached the engine core, whose handler aborts every in-flight request (vLLM 0.32
``EngineCoreProc.run_engine_core``; ``shutdown_timeout`` 0): the server's own drain never got the chance, and
streams broke with "EngineCore encountered an issue". The server owns the engine's shutdown (it drains, then
``Engine.shutdown`` stops the engine core with a SIGTERM of its own, which vLLM's handler still answers), so the
engine core moves to a process group of its own (``setpgid``; its workers, started later, follow it) where signals
to the server's group do not reach it.

Not a session of its own (``setsid``): with the kernel's scheduler autogroups (on here), a session is also a CPU
share, and an engine in its own session outran the server's event loop (measured: 10 HTTP streams of 400
tokens all finished before the client could read their first chunks, where in the server's session the
engine had made 11 tokens). A process group keeps the engine in the server's share, as before.

Choices not taken: ignoring or blocking SIGTERM in the engine core would also ignore vLLM's own SIGTERM at
shutdown (a 5 s wait, then SIGKILL, at every stop); vLLM's ``shutdown_timeout`` makes the engine core drain on a
signal by itself, but then it stops taking utility calls and exits on its own schedule, racing the server's drain
and ignoring a second signal.

Leaving the group costs the guarantee that a group kill takes the engine too; a thread here restores it: when the
server process dies (its end of multiprocessing's parent sentinel closes, however it died), the engine core
SIGKILLs its own new process group, itself and its workers included.

**Spinning** (``DELTASERVE_ENGINE_SPIN_MS``, set by the server from ``EngineConfig.engine_spin_ms``): the engine
core and its worker talk through vLLM's shared-memory queues (``shm_broadcast.MessageQueue``), whose readers
busy-wait (``sched_yield`` in a loop) for ``busy_loop_s`` = 1 s after each message before sleeping on a zmq
notification. Under traffic both engine processes therefore spin without pause: on a 2-core machine they hold
both cores, and the server's event loop (request handling, gRPC/HTTP, output processing) waits for the scheduler
between every step. :func:`_limit_spin` shortens the window in the engine core and its workers (they inherit the
variable); the writer notifies on every message, so a sleeping reader wakes on the next one. The idle wait is
also bounded (:data:`IDLE_POLL_MS`, then the reader checks the queue again): with no spin at all
(``busy_loop_s`` = 0) an engine here stopped making progress in its first measurement (vLLM 0.32, seen once; a
notification lost before the reader's subscription took effect is the likely cause), so a lost notification now
costs at most that long, never a hang.
"""

from __future__ import annotations

import functools
import inspect
import logging
import multiprocessing
import os
import signal
import threading
from multiprocessing.connection import wait

from deltaserve.plugins import env

log = logging.getLogger(__name__)

_applied = False


IDLE_POLL_MS = 50
"""Longest sleep of a shared-memory queue reader between two checks of its queue (with :func:`_limit_spin`)."""


def apply() -> None:
    """The ``vllm.general_plugins`` entry point (called once per vLLM process)."""
    spin_ms = env.engine_spin_ms()
    if spin_ms is not None:
        _limit_spin(spin_ms / 1e3)
    _leave_server_group()


def _limit_spin(busy_loop_s: float) -> None:
    from vllm.distributed.device_communicators import shm_broadcast

    cls = shm_broadcast.SpinCondition
    if getattr(cls, "_deltaserve_spin", None) is not None:
        return
    init, wait = cls.__init__, cls.wait
    if (
        "busy_loop_s" not in inspect.signature(init).parameters
        or "timeout_ms" not in inspect.signature(wait).parameters
    ):
        raise RuntimeError("vLLM's SpinCondition changed (busy_loop_s, wait(timeout_ms)): review _limit_spin")

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        kwargs["busy_loop_s"] = busy_loop_s
        init(self, *args, **kwargs)

    @functools.wraps(wait)
    def bounded_wait(self, timeout_ms=None):
        wait(self, IDLE_POLL_MS if timeout_ms is None else min(timeout_ms, IDLE_POLL_MS))

    cls.__init__, cls.wait, cls._deltaserve_spin = __init__, bounded_wait, busy_loop_s
    log.info("vLLM shared-memory queues spin %.1f ms before sleeping (pid %d)", busy_loop_s * 1e3, os.getpid())


def _leave_server_group() -> None:
    global _applied
    if _applied or not env.engine_own_group() or not multiprocessing.current_process().name.startswith("EngineCore"):
        return
    parent = multiprocessing.parent_process()
    if parent is None:  # not a multiprocessing child: nothing could watch the server, so stay in its group
        return
    _applied = True
    os.setpgid(0, 0)
    threading.Thread(target=_die_with, args=(parent.sentinel,), name="deltaserve-server-watch", daemon=True).start()
    log.info("engine core in its own process group (pid %d): the server owns shutdown", os.getpid())


def _die_with(server_sentinel: int) -> None:
    wait([server_sentinel])  # readable once the server process is gone
    os.killpg(0, signal.SIGKILL)
