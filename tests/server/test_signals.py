"""Signals to the server's whole process group (Ctrl-C, many supervisors): in-flight requests drain as
after a SIGTERM to the server alone, a second signal stops at once, and no engine process outlives the server.

Each test starts its own server (it ends it). Before the fix, a SIGTERM or SIGINT to the group reached vLLM's
engine core too, which aborted every request: streams broke with INTERNAL "EngineCore encountered an issue".
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import threading
import time
from urllib.parse import urlparse

import psutil
import pytest
from server_process import ServerProcess

from deltaserve.client.sync import DeltaClient

MAX_TOKENS = 480  # the tiny base's context is 512 tokens
PROMPT = "Tell me a long story."


def _grpc_stream(srv, out: dict, go: threading.Barrier) -> None:
    out.update(tokens=0, finish=None)
    with DeltaClient(srv.grpc) as client:
        go.wait()
        for chunk in client.generate_stream(
            PROMPT, task=srv.base_name, max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True
        ):
            out["tokens"] += len(chunk.token_ids)
            out["finish"] = chunk.finish_reason or None
            out["last_at"] = time.monotonic()


def _http_stream(srv, out: dict, go: threading.Barrier) -> None:
    url = urlparse(srv.http)
    out.update(tokens=0, finish=None, done=False)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=120)
    body = {
        "model": srv.base_name,
        "prompt": PROMPT,
        "max_tokens": MAX_TOKENS,
        "ignore_eos": True,
        "temperature": 0,
        "stream": True,
    }
    conn.connect()
    go.wait()
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200, resp.read()
    for line in resp:
        if line.strip() == b"data: [DONE]":
            out["done"] = True
        elif line.startswith(b"data: "):
            choice = json.loads(line[6:])["choices"][0]
            out["tokens"] += 1  # one chunk per engine step: a token each, for one sequence
            out["finish"] = choice.get("finish_reason")
            out["last_at"] = time.monotonic()
    conn.close()


def _start_streams(srv, streams) -> list[threading.Thread]:
    """Run each ``(function, out)`` in a thread; return once every stream has its first token.

    The requests leave together (a barrier after each client's set-up): a stream that started a second before
    another could finish before that one's first token (480 tokens take about 2 s on the tiny base)."""
    go = threading.Barrier(len(streams), timeout=60)

    def run(fn, out):
        try:
            fn(srv, out, go)
        except Exception as exc:  # recorded: the assertions name what broke
            out["error"] = repr(exc)

    threads = [threading.Thread(target=run, args=pair, daemon=True) for pair in streams]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 120
    while not all(out.get("tokens") or "error" in out for _, out in streams):
        assert time.monotonic() < deadline, [out for _, out in streams]
        time.sleep(0.02)
    return threads


def _engine_processes(srv) -> list[psutil.Process]:
    children = psutil.Process(srv.pid).children(recursive=True)
    assert any("EngineCore" in p.name() or "EngineCore" in " ".join(p.cmdline()) for p in children), children
    return children


def _running(p: psutil.Process) -> bool:
    try:
        return p.status() != psutil.STATUS_ZOMBIE  # exited; its new parent (this machine's init) may never reap it
    except psutil.NoSuchProcess:
        return False


def _assert_none_left(children: list[psutil.Process]) -> None:
    """Every process the server had started is gone (killed here if not, so that nothing leaks past the test)."""
    deadline = time.monotonic() + 15
    while (alive := [p for p in children if _running(p)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = [(p.pid, p.name(), p.cmdline()[-1:]) for p in alive]
    for p in alive:
        p.kill()
    assert not left, left


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_to_the_process_group_drains_in_flight_streams(tiny_base, tmp_path, sig):
    srv = ServerProcess(tiny_base, tmp_path / "store")
    try:
        children = _engine_processes(srv)
        grpc_out, http_out = {}, {}
        threads = _start_streams(srv, [(_grpc_stream, grpc_out), (_http_stream, http_out)])
        signalled_at = time.monotonic()
        os.killpg(srv.pid, sig)
        for t in threads:
            t.join(120)
        assert srv.wait(120) == 0, srv.tail()
        assert "error" not in grpc_out and grpc_out["finish"] == "length" and grpc_out["tokens"] == MAX_TOKENS, grpc_out
        assert "error" not in http_out and http_out["finish"] == "length" and http_out["done"], http_out
        assert min(grpc_out["last_at"], http_out["last_at"]) > signalled_at, (
            "the streams should still have been running at the signal"
        )
        assert "deltaserve: stopped" in srv.stdout
        _assert_none_left(children)
    finally:
        srv.stop()


def test_a_second_signal_stops_at_once(tiny_base, tmp_path):
    srv = ServerProcess(tiny_base, tmp_path / "store", "--grace-period", "300")
    try:
        children = _engine_processes(srv)
        outs = [{} for _ in range(16)]
        streams = [(_grpc_stream if i % 4 else _http_stream, out) for i, out in enumerate(outs)]
        threads = _start_streams(srv, streams)
        os.killpg(srv.pid, signal.SIGTERM)
        time.sleep(0.5)
        assert any(out["finish"] is None and "error" not in out for out in outs), (
            f"every stream ended before the second signal: {outs}"
        )
        second_at = time.monotonic()
        os.killpg(srv.pid, signal.SIGINT)
        srv.wait(60)
        stopped_in = time.monotonic() - second_at
        for t in threads:
            t.join(30)
        assert stopped_in < 15, f"the server took {stopped_in:.1f} s to stop after the second signal"
        for kind in (_grpc_stream, _http_stream):  # both front ends abort what is left, at once
            kind_outs = [out for fn, out in streams if fn is kind]
            assert any(out["finish"] != "length" for out in kind_outs), (
                f"every {kind.__name__[1:]} finished: the server drained instead of stopping: {kind_outs}"
            )
            # Measured: the last tokens arrive 0.15 s after the second signal at most; with a 0.5 s gRPC grace
            # and uvicorn's 1 s flush the streams ran on for 0.5 s and 1.66 s.
            late = max(out["last_at"] - second_at for out in kind_outs)
            assert late < 0.4, f"{kind.__name__[1:]}s ran on for {late:.2f} s after the second signal"
        _assert_none_left(children)
    finally:
        srv.stop()


def test_the_engine_processes_die_with_the_server(tiny_base, tmp_path):
    """The engine leaves the server's process group (so that group signals pass it by); it must still not
    outlive a server that is killed outright. The store it starts on holds what a killed registration leaves
    behind (a staging folder); the start sweeps it (already so before this test)."""
    leftover = tmp_path / "store" / "staging" / "0123abcd"
    leftover.mkdir(parents=True)
    (leftover / "delta.json").write_bytes(b"{}")
    srv = ServerProcess(tiny_base, tmp_path / "store")
    try:
        assert not leftover.exists()
        children = _engine_processes(srv)
        os.kill(
            srv.pid, signal.SIGKILL
        )  # the server alone; not ServerProcess.kill, whose group kill would hide orphans
        srv.proc.wait(60)
        _assert_none_left(children)
    finally:
        srv.stop()
