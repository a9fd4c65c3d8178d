"""Crash consistency, restart, graceful shutdown: each step a real server process on one store."""

from __future__ import annotations

import json
import threading
import time

import grpc
import pytest

from helpers import image_prompt, make_lora_bundle, make_sparse_bundle, png_bytes
from server_process import ADMIN_TOKEN, ServerProcess

QUESTION = "What colour is the circle?"


def _outputs(server, tasks, image) -> dict[str, list[int]]:
    from deltaserve.client.sync import DeltaClient

    with DeltaClient(server.grpc) as client:
        return {
            t: client.generate(image_prompt(QUESTION), image=image, task=t, max_tokens=8, temperature=0).token_ids
            for t in tasks
        }


def _wait_for(predicate, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError
        time.sleep(0.05)


def _register_in_background(server, bundle) -> threading.Thread:
    from deltaserve.client.sync import DeltaClient

    def run():
        try:
            with DeltaClient(server.grpc, admin_token=ADMIN_TOKEN) as client:
                client.register(bundle)
        except Exception:
            pass  # the server is killed under it

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def _store_entries(store) -> set[str]:
    return {p.name.rsplit("-", 1)[0] for p in (store / "deltas").iterdir()}


def test_kill_during_registration_then_restart(tiny_base, tmp_path, sample_images):
    """SIGKILL mid-registration leaves the delta fully there or absent; restarts restore every delta."""
    from deltaserve.client.common import DeltaClientError
    from deltaserve.client.sync import DeltaClient

    store = tmp_path / "store"
    image = png_bytes(sample_images[0])
    bundles = {n: make_lora_bundle(tiny_base, tmp_path / n, name=n, seed=200 + i) for i, n in enumerate(("x", "z"))}
    bundles["y"] = make_sparse_bundle(tiny_base, tmp_path / "y", "y", seed=201)  # an exclusive delta is restored too

    # 1. x (lora), y (sparse) registered; z (lora) killed while stored but not yet indexed.
    s1 = ServerProcess(tiny_base, store, env={"DELTASERVE_FAULT_PAUSE": "stored:120:z"})
    try:
        with DeltaClient(s1.grpc, admin_token=ADMIN_TOKEN) as client:
            client.register(bundles["x"])
            client.register(bundles["y"])
        before = _outputs(s1, ["x", "y", s1.base_name], image)
        _register_in_background(s1, bundles["z"])
        _wait_for(lambda: "z" in _store_entries(store))
    finally:
        s1.kill()

    # 2. After the crash: x and y are back with the same outputs, z is absent and its copy is gone.
    s2 = ServerProcess(tiny_base, store, env={"DELTASERVE_FAULT_PAUSE": "indexed:120:z"})
    try:
        with DeltaClient(s2.grpc) as client:
            assert sorted(d.name for d in client.list().deltas) == ["x", "y"]
        assert _store_entries(store) == {"x", "y"}, "an unindexed store entry must be cleaned up at start"
        assert _outputs(s2, ["x", "y", s2.base_name], image) == before
        # z killed after the index names it, before the call returned.
        _register_in_background(s2, bundles["z"])
        _wait_for(lambda: "z" in json.loads((store / "index.json").read_text())["deltas"])
    finally:
        s2.kill()

    # 3. z is fully there; everything serves as before.
    s3 = ServerProcess(tiny_base, store)
    try:
        with DeltaClient(s3.grpc) as client:
            assert sorted(d.name for d in client.list().deltas) == ["x", "y", "z"]
        after = _outputs(s3, ["x", "y", "z", s3.base_name], image)
        assert {k: after[k] for k in before} == before
        assert after["z"] not in before.values()
        assert _store_entries(store) == {"x", "y", "z"}

        # 4. Graceful shutdown: an in-flight stream finishes, new requests are refused, exit code 0.
        results = {}
        streaming = threading.Event()

        def long_stream():
            with DeltaClient(s3.grpc) as client:
                chunks = []
                # ignore_eos: the stream must outlive the SIGTERM below, whatever the sampled tokens.
                for chunk in client.generate_stream(
                    image_prompt(QUESTION),
                    image=image,
                    task="z",
                    max_tokens=400,
                    ignore_eos=True,
                    temperature=1.0,
                    seed=1,
                ):
                    chunks.append(chunk)
                    results["last_chunk_at"] = time.monotonic()
                    streaming.set()
                results["tokens"] = sum(len(c.token_ids) for c in chunks)
                results["finish"] = chunks[-1].finish_reason

        thread = threading.Thread(target=long_stream)
        thread.start()
        assert streaming.wait(60), "the stream never started"
        sigterm_at = time.monotonic()
        s3.proc.send_signal(15)  # SIGTERM
        time.sleep(0.2)
        with DeltaClient(s3.grpc) as client, pytest.raises(DeltaClientError) as err:
            client.generate("Hi", task=s3.base_name, max_tokens=2)
        assert err.value.code == grpc.StatusCode.UNAVAILABLE
        thread.join(120)
        assert s3.wait(120) == 0
        assert results.get("finish") in ("length", "stop") and results["tokens"] >= 1, results
        assert results["last_chunk_at"] > sigterm_at, "the stream should still have been running at SIGTERM"
        assert "deltaserve: stopped" in s3.stdout
    finally:
        s3.stop()
