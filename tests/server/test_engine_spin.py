"""The engine's processes stop busy-waiting soon after traffic ends (``EngineConfig.engine_spin_ms``).

vLLM's shared-memory queues spin for 1 s after every message; on these 2-core machines that left the server's
event loop waiting for a core between engine steps (``deltaserve.server.engine_process``). The server test
measures the behaviour from outside: the CPU time of the engine core and its worker in the half second after an
answer, which under vLLM's own 1 s spin is about a core-second (both processes spinning) and with deltaserve's
1 ms close to nothing.
"""

from __future__ import annotations

import time

import psutil
import zmq
from helpers import PROMPTS, image_prompt, png_bytes

from deltaserve.server import engine_process

WINDOW_S = 0.5


def _engine_cpu_s(processes: list[psutil.Process]) -> float:
    total = 0.0
    for p in processes:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def test_engine_processes_sleep_right_after_an_answer(server, sample_images):
    from deltaserve.client.sync import DeltaClient

    engine = psutil.Process(server.pid).children(recursive=True)
    assert any("EngineCore" in " ".join(p.cmdline()) or "EngineCore" in p.name() for p in engine), engine
    with DeltaClient(server.grpc) as client:
        spent = []
        for image in sample_images[:3]:
            out = client.generate(
                image_prompt(PROMPTS[0]), image=png_bytes(image), task=server.base_name, max_tokens=4, temperature=0
            )
            assert out.token_ids
            before = _engine_cpu_s(engine)
            time.sleep(WINDOW_S)
            spent.append(_engine_cpu_s(engine) - before)
    # vLLM's 1 s spin: the engine core and the worker each burn (up to) the whole window here.
    assert min(spent) < 0.25 * WINDOW_S, f"engine processes used {spent} CPU-seconds in {WINDOW_S} s after answers"


def test_limit_spin_shortens_the_busy_wait_and_bounds_the_idle_sleep(monkeypatch):
    from vllm.distributed.device_communicators import shm_broadcast
    from vllm.utils.network_utils import get_open_zmq_ipc_path

    cls = shm_broadcast.SpinCondition
    for name in ("__init__", "wait"):
        monkeypatch.setattr(cls, name, getattr(cls, name))  # restored after the test
    monkeypatch.setattr(cls, "_deltaserve_spin", None, raising=False)
    engine_process._limit_spin(0.001)

    context = zmq.Context()
    address = get_open_zmq_ipc_path()
    writer = cls(is_reader=False, context=context, notify_address=address)
    reader = cls(is_reader=True, context=context, notify_address=address)
    try:
        assert reader.busy_loop_s == 0.001
        time.sleep(0.01)  # past the spin window: the reader now sleeps on its socket
        started = time.monotonic()
        reader.wait()  # no notification ever comes: vLLM's own wait would block forever
        waited = time.monotonic() - started
        assert engine_process.IDLE_POLL_MS / 2e3 <= waited < 1.0, waited
        writer.notify()
        started = time.monotonic()
        reader.wait(timeout_ms=10_000)
        assert time.monotonic() - started < 0.5  # a notification wakes it at once
    finally:
        for c in (reader, writer):
            c.local_notify_socket.close(linger=0)
            if c.is_reader:
                c.read_cancel_socket.close(linger=0)
                c.write_cancel_socket.close(linger=0)
        context.term()
