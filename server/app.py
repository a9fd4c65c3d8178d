"""``deltaserve serve``: one engine, the registry, both front ends, in one process.

Start-up: engine → registry restore → gRPC → HTTP → ``<store>/server.json`` and a
``deltaserve: ready …`` line on stdout. SIGTERM/SIGINT: refuse new requests
(UNAVAILABLE / 503, health NOT_SERVING), let in-flight requests finish for up to
``grace_period_s``, then stop the front ends and the engine. A second signal ends the
wait at once (the remaining requests are aborted). This process alone handles the
signals: the engine's processes run in a process group of their own (``engine_process``), so
a signal to the whole process group (Ctrl-C) drains exactly like one to the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import time
from pathlib import Path

import uvicorn

from deltaserve.server.config import ServeConfig
from deltaserve.server.engine import Engine
from deltaserve.server.bindings import WorkerDeltas
from deltaserve.server.grpc_api import GrpcFrontEnd
from deltaserve.server.http_api import create_app
from deltaserve.server.registry import DeltaRegistry, _write_atomic
from deltaserve.server.service import DeltaService

log = logging.getLogger("deltaserve.server")

SERVER_FILE = "server.json"
HTTP_FLUSH_S = 1
"""After the drain, how long uvicorn may take to send what finished requests still have to write."""


def announce_ready(store: Path, info: dict, **line) -> None:
    """Write ``<store>/server.json`` (``info``) and print the ready line
    (``deltaserve: ready grpc=… http=… base=… …``, ``line`` in order) that launchers wait for."""
    _write_atomic(store / SERVER_FILE, json.dumps(info, indent=2).encode())
    print("deltaserve: ready " + " ".join(f"{k}={v}" for k, v in line.items()), flush=True)


class _HttpServer(uvicorn.Server):
    """uvicorn without its own signal handlers: :func:`serve` handles SIGTERM/SIGINT for both front ends
    (uvicorn's would stop HTTP alone, wait for its connections, then raise the signal again)."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


def _bind_socket(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(512)
    sock.setblocking(False)
    return sock


async def serve(config: ServeConfig, stop: asyncio.Event | None = None) -> None:
    """Run until ``stop`` is set (or SIGTERM/SIGINT); a second signal skips the drain."""
    stop = stop or asyncio.Event()
    at_once = asyncio.Event()

    def on_signal() -> None:
        if stop.is_set():
            at_once.set()
        stop.set()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, on_signal)
        except (NotImplementedError, RuntimeError):  # not the main thread (tests)
            pass

    started = time.perf_counter()
    config.store.mkdir(parents=True, exist_ok=True)
    engine = await Engine.start(config.engine)
    engine_seconds = time.perf_counter() - started
    worker = (
        WorkerDeltas(engine, config.engine.concurrent_delta_budget_bytes) if config.engine.exclusive_deltas else None
    )
    registry = DeltaRegistry(
        config.store, config.engine.model, engine, max_bundle_bytes=config.max_bundle_bytes, worker=worker
    )
    service = DeltaService(config, engine, registry, worker)
    problems = await service.start()
    for problem in problems:
        log.error("not restored: %s", problem)

    grpc_front = GrpcFrontEnd(service, max_message_bytes=config.max_bundle_bytes + (4 << 20))
    grpc_port = await grpc_front.start(config.host, config.grpc_port)
    sock = _bind_socket(config.host, config.http_port)
    http_port = sock.getsockname()[1]
    http = _HttpServer(
        uvicorn.Config(create_app(service), log_level="warning", lifespan="off", timeout_graceful_shutdown=HTTP_FLUSH_S)
    )
    http_task = asyncio.create_task(http.serve(sockets=[sock]))
    info = {
        "pid": os.getpid(),
        "grpc": f"{config.host}:{grpc_port}",
        "http": f"http://{config.host}:{http_port}",
        "base_model": engine.model_name,
        "deltas": registry.names(),
        "engine_start_seconds": round(engine_seconds, 2),
        "ready_seconds": round(time.perf_counter() - started, 2),
    }
    announce_ready(
        config.store,
        info,
        grpc=info["grpc"],
        http=info["http"],
        base=info["base_model"],
        deltas=len(info["deltas"]),
        engine_start=f"{info['engine_start_seconds']}s",
    )

    try:
        await stop.wait()
    finally:
        log.info("shutting down: draining in-flight requests (grace %.0fs)", config.grace_period_s)
        await grpc_front.stop_accepting()
        drain = asyncio.ensure_future(service.drain(config.grace_period_s))
        interrupt = asyncio.ensure_future(at_once.wait())
        await asyncio.wait({drain, interrupt}, return_when=asyncio.FIRST_COMPLETED)
        interrupt.cancel()
        drained = drain.done() and drain.result()
        if not drain.done():
            drain.cancel()
            log.warning("second signal: aborting the remaining requests")
        elif not drained:
            log.warning("grace period over: aborting the remaining requests")
        # Drained: a short grace lets the last answers flush. Not drained: cancel the remaining calls now (a
        # cancelled call aborts its request in the engine); a grace here let streams run on and finish.
        await grpc_front.stop(grace=0.5 if drained else 0)
        if not drained:
            http.config.timeout_graceful_shutdown = 0
        http.should_exit = True
        await http_task
        await service.close()
        engine.shutdown()
        (config.store / SERVER_FILE).unlink(missing_ok=True)
        print("deltaserve: stopped", flush=True)
