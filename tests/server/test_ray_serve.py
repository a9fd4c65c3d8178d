"""Engine replicas on Ray Serve (``deltaserve serve --replicas 2``): real Ray, two real vLLM engines, 127.0.0.1.

One delta registered once through the ingress; its traffic and the base's (HTTP and gRPC) checked token for token against
transformers (the reference the single server is held to in ``test_serving.py`` / ``test_hot_swap.py``); the
delta loaded on demand by one replica and every later request for it served there (multiplexing); an
unregistration that lets a running request finish and then shows on both replicas; a replica killed (its running
request answered 503), the requests that follow still served, the delta loaded again on demand by the survivor,
and evicted (least recently used) by another delta there.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from helpers import (
    PROMPTS,
    hf_greedy,
    image_prompt,
    make_lora_bundle,
    make_sparse_bundle,
    peft_model,
    plugin_model,
    png_bytes,
)
from server_process import ADMIN_TOKEN, ServerProcess

from deltaserve.client.sync import DeltaClient

MAX_TOKENS = 8
ROUNDS = 3
TASK = "fleet-a"
OTHER = "fleet-b"
SPARSE = "fleet-sparse"
KV_CACHE_BYTES = 64 * 1024 * 1024


@pytest.fixture(scope="module")
def bundles(tiny_base, tmp_path_factory):
    root = tmp_path_factory.mktemp("fleet")
    return {
        name: make_lora_bundle(tiny_base, root / name, name=name, seed=11 + i) for i, name in enumerate((TASK, OTHER))
    }


@pytest.fixture(scope="module")
def refs(tiny_base, hf_processor, sample_images, bundles):
    """transformers' greedy tokens per expert (``base``, the deltas) and prompt; checked to differ."""
    from transformers import LlavaForConditionalGeneration

    import torch

    base = LlavaForConditionalGeneration.from_pretrained(str(tiny_base), dtype=torch.float32).eval()
    models = {"base": base, **{name: peft_model(tiny_base, path) for name, path in bundles.items()}}
    out = {
        name: [hf_greedy(m, hf_processor, image_prompt(q), sample_images[i], MAX_TOKENS) for i, q in enumerate(PROMPTS)]
        for name, m in models.items()
    }
    assert len({tuple(o) for outs in out.values() for o in outs}) == len(models) * len(PROMPTS), out
    return out


def _call(url: str, method: str = "GET", body: dict | None = None, token: str | None = None, timeout: float = 120):
    headers = {"content-type": "application/json"}
    if token:
        headers["authorization"] = f"Bearer {token}"
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data, headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _complete(srv, model: str, i: int, images: list) -> tuple[int, dict]:
    body = {
        "model": model,
        "prompt": image_prompt(PROMPTS[i]),
        "image": base64.b64encode(images[i]).decode(),
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "return_token_ids": True,
    }
    return _call(f"{srv.http}/v1/completions", "POST", body)


def _replicas(srv) -> list[dict]:
    status, body = _call(f"{srv.http}/v1/engine")
    assert status == 200, body
    return body["replicas"]


def _fleet_metrics(srv, answered: int) -> dict | None:
    """The ingress's ``/metrics`` parsed (family name → samples) once the replicas' ``vllm:request_success``
    counters add up to ``answered``; None before. Every family appears once (Prometheus refuses repeats)."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"{srv.http}/metrics", timeout=30) as resp:
        families = list(text_string_to_metric_families(resp.read().decode()))
    names = [f.name for f in families]
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)
    scrape = {f.name: f.samples for f in families}
    done = sum(s.value for s in scrape.get("vllm:request_success", []) if s.name.endswith("_total"))
    return scrape if done >= answered else None


def _wait_for(what: str, check, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.25)


def test_two_replicas_share_one_registry_with_delta_affinity(tiny_base, tmp_path, bundles, refs, sample_images):
    images = [png_bytes(img) for img in sample_images]
    bundle = bundles[TASK]
    started = time.monotonic()
    srv = ServerProcess(
        tiny_base, tmp_path / "store", "--replicas", "2", "--enforce-eager",
        "--kv-cache-memory-bytes", str(KV_CACHE_BYTES), "--max-num-seqs", "16", "--max-deltas-per-replica", "1",
    )  # fmt: skip
    print(f"\n2 replicas ready in {time.monotonic() - started:.0f} s")
    try:
        replicas = _wait_for("two replica statuses", lambda: len(_replicas(srv)) == 2 and _replicas(srv))
        assert all(r["held"] == [] for r in replicas)
        if len(os.sched_getaffinity(0)) >= 2:  # each engine pinned to cores of its own
            bindings = [set(r["cpu_binding"].split(",")) for r in replicas]
            assert "nobind" not in bindings[0] | bindings[1] and not bindings[0] & bindings[1], bindings

        # Registered once, through the ingress: nothing loaded yet.
        status, body = _call(f"{srv.http}/v1/deltas", "POST", {"path": str(bundle)}, token=ADMIN_TOKEN)
        assert status == 201, body
        assert body["binding"] == "on_demand"
        assert all(r["held"] == [] and r["loads"] == 0 for r in _replicas(srv))
        status, body = _call(f"{srv.http}/v1/deltas", "POST", {"path": str(tmp_path / "nothing")}, token=ADMIN_TOKEN)
        assert status == 400, body

        # The first request for the delta loads it on one replica, on demand.
        status, first = _complete(srv, TASK, 0, images)
        assert status == 200, first
        assert first["choices"][0]["token_ids"] == refs[TASK][0]
        assert first["routing"]["replica"]["held"] is False
        holder = first["routing"]["replica"]["replica"]
        time.sleep(5.0)  # the replica reports its ids to Ray Serve's controller, which tells the ingress's router

        # Mixed traffic, concurrent: every answer token-equal to the reference; every delta request on the holder.
        jobs = [(model, i) for _ in range(ROUNDS) for i in range(len(PROMPTS)) for model in (TASK, "base")]
        with ThreadPoolExecutor(8) as pool:
            answers = list(
                pool.map(
                    lambda job: _complete(srv, tiny_base.name if job[0] == "base" else job[0], job[1], images), jobs
                )
            )
        delta_served = []
        base_replicas = set()
        for (model, i), (status, body) in zip(jobs, answers):
            assert status == 200, body
            assert body["choices"][0]["token_ids"] == refs[model][i], (model, i)
            replica = body["routing"]["replica"]
            if model == TASK:
                delta_served.append(replica)
            else:
                assert replica["held"] is None
                base_replicas.add(replica["replica"])
        hits = sum(r["held"] for r in delta_served)
        print(
            f"affinity: {hits}/{len(delta_served)} delta requests found the delta already bound "
            f"(hit rate {hits / len(delta_served):.2f}); base requests on {len(base_replicas)} replica(s)"
        )
        assert {r["replica"] for r in delta_served} == {holder}
        assert hits == len(delta_served)

        # gRPC at the ingress: the same experts, the same tokens (its delta request goes to the holder: no new load).
        with DeltaClient(srv.grpc) as client:
            for model, i in ((TASK, 1), ("base", 2)):
                out = client.generate(
                    image_prompt(PROMPTS[i]), image=images[i], task=tiny_base.name if model == "base" else model,
                    max_tokens=MAX_TOKENS, temperature=0,
                )  # fmt: skip
                assert out.token_ids == refs[model][i], (model, i)
                assert out.routing.expert == (tiny_base.name if model == "base" else model)

        # One scrape for the fleet: the ingress's /metrics holds its own series and each replica's (vLLM's),
        # labelled by replica, every family once; the replicas' vLLM counters add up to the requests answered.
        replica_ids = {r["replica"] for r in _replicas(srv)}
        answered = 1 + len(jobs) + 2
        scrape = _wait_for("the replicas' request counts on /metrics", lambda: _fleet_metrics(srv, answered))
        assert {s.labels.get("replica") for s in scrape["vllm:num_requests_running"]} == replica_ids, scrape
        assert any("replica" not in s.labels for s in scrape["deltaserve_requests"]), "the ingress's own series"
        statuses = _replicas(srv)
        assert sum(r["loads"] for r in statuses) == 1, statuses
        assert [r["replica"] for r in statuses if r["held"]] == [holder]

        # Chat, streamed, and automatic routing (at the ingress) reach the replicas too.
        req = urllib.request.Request(
            f"{srv.http}/v1/chat/completions",
            json.dumps(
                {"model": TASK, "messages": [{"role": "user", "content": "Hello"}], "stream": True, "max_tokens": 8}
            ).encode(),
            {"content-type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=120) as resp:
            assert resp.headers["x-deltaserve-replica"] == holder
            events = [line for line in resp.read().decode().splitlines() if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]" and json.loads(events[0][6:])["routing"]["replica"]["held"] is True
        status, body = _call(
            f"{srv.http}/v1/chat/completions",
            "POST",
            {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4},
        )
        assert status == 200 and body["routing"]["router"] == "auto", body

        # Unregistration: a running request finishes; then no replica holds the delta and requests get 404.
        long_answer: dict = {}

        def long_request():
            long_answer["result"] = _call(
                f"{srv.http}/v1/completions",
                "POST",
                {"model": TASK, "prompt": "Count:", "max_tokens": 400, "ignore_eos": True, "temperature": 0},
            )

        runner = threading.Thread(target=long_request)
        runner.start()
        time.sleep(0.3)
        status, body = _call(f"{srv.http}/v1/deltas/{TASK}", "DELETE", token=ADMIN_TOKEN)
        assert status == 200, body
        assert _complete(srv, TASK, 1, images)[0] == 404
        runner.join(120)
        status, body = long_answer["result"]
        assert status == 200 and body["usage"]["completion_tokens"] == 400, body
        released = _wait_for(
            "both replicas to release the delta",
            lambda: (s := _replicas(srv)) and all(r["held"] == [] and r["lora_adapter_ids"] == [] for r in s) and s,
        )
        assert len(released) == 2

        # Registered again (the store survives everything), then its holder is killed: requests are still served.
        status, body = _call(f"{srv.http}/v1/deltas", "POST", {"path": str(bundle)}, token=ADMIN_TOKEN)
        assert status == 201, body
        status, body = _complete(srv, TASK, 2, images)
        assert status == 200 and body["choices"][0]["token_ids"] == refs[TASK][2], body
        victim = body["routing"]["replica"]
        cut_short: dict = {}
        runner = threading.Thread(  # a request running on the victim when it dies: a clear 503, never a 500
            target=lambda: cut_short.update(
                result=_call(
                    f"{srv.http}/v1/completions",
                    "POST",
                    {"model": TASK, "prompt": "Count:", "max_tokens": 480, "ignore_eos": True, "temperature": 0},
                )
            )
        )
        runner.start()
        time.sleep(0.5)  # under way on the victim (it holds the delta); 480 tokens take seconds here
        os.kill(victim["pid"], signal.SIGKILL)
        killed_at = time.monotonic()
        runner.join(120)
        status, body = cut_short["result"]
        print(f"request running on the killed replica: {status} {body.get('error', {}).get('message')}")
        assert status == 503, body
        served_by = set()
        for i in range(len(PROMPTS)):
            for model in (TASK, "base"):
                status, body = _complete(srv, tiny_base.name if model == "base" else model, i, images)
                assert status == 200, (model, i, body)
                assert body["choices"][0]["token_ids"] == refs[model][i], (model, i)
                served_by.add(body["routing"]["replica"]["pid"])
        print(f"after killing replica pid {victim['pid']}: 8 requests served by pid(s) {sorted(served_by)} "
              f"in {time.monotonic() - killed_at:.1f} s")  # fmt: skip
        assert victim["pid"] not in served_by

        # The survivor keeps one delta (--max-deltas-per-replica 1): a second one evicts the first (least recently
        # used), which is detached from its engine, and loaded again on demand when asked for.
        survivor = served_by.pop()
        status, body = _call(f"{srv.http}/v1/deltas", "POST", {"path": str(bundles[OTHER])}, token=ADMIN_TOKEN)
        assert status == 201, body
        for model in (OTHER, TASK):
            status, body = _complete(srv, model, 3, images)
            assert status == 200 and body["choices"][0]["token_ids"] == refs[model][3], (model, body)
            assert body["routing"]["replica"] == {
                "replica": body["routing"]["replica"]["replica"],
                "pid": survivor,
                "held": False,
            }
            mine = _wait_for(
                "the survivor to hold one delta",
                lambda: [r for r in _replicas(srv) if r["pid"] == survivor and len(r["lora_adapter_ids"]) == 1],
            )
            assert [h.rsplit("-", 1)[0] for h in mine[0]["held"]] == [model]
        status, body = _call(f"{srv.http}/v1/deltas/{TASK}")
        assert status == 200 and body["name"] == TASK
    finally:
        srv.stop()
    print(f"test wall time {time.monotonic() - started:.0f} s")


def test_replicas_read_the_store_from_a_bucket(tiny_base, tmp_path, bundles, refs, sample_images, hf_processor, s3_url):
    """``--store-url``: the ingress publishes the store to an S3-compatible bucket and the replicas read it from there
    (each into a cache of its own), their statuses and metrics going through the bucket too. With
    ``--concurrent-delta-budget 0`` a sparse delta is served by an exclusive engine state on its replica."""
    from deltaserve.server.deploy_ray import STATUS_DIR, StatusBoard
    from deltaserve.server.object_store import ObjectStore

    images = [png_bytes(img) for img in sample_images]
    sparse = make_sparse_bundle(tiny_base, tmp_path / "sparse", SPARSE, seed=41)
    sparse_refs = [
        hf_greedy(plugin_model(tiny_base, sparse), hf_processor, image_prompt(PROMPTS[i]), sample_images[i], MAX_TOKENS)
        for i in range(2)
    ]
    assert sparse_refs != refs["base"][:2]
    refs = {**refs, SPARSE: sparse_refs}
    remote = ObjectStore(s3_url)
    srv = ServerProcess(
        tiny_base, tmp_path / "store", "--replicas", "2", "--enforce-eager", "--store-url", s3_url,
        "--kv-cache-memory-bytes", str(KV_CACHE_BYTES), "--max-num-seqs", "16", "--concurrent-delta-budget", "0",
    )  # fmt: skip
    try:
        replicas = _wait_for("two replica statuses", lambda: len(_replicas(srv)) == 2 and _replicas(srv))
        in_bucket = StatusBoard(tmp_path / "unused", remote).statuses()
        assert sorted(s["replica"] for s in in_bucket) == sorted(r["replica"] for r in replicas)
        assert not (tmp_path / "store" / "replicas").exists()  # nothing of the replicas in the ingress's store

        for bundle in (bundles[TASK], sparse):
            status, body = _call(f"{srv.http}/v1/deltas", "POST", {"path": str(bundle)}, token=ADMIN_TOKEN)
            assert status == 201, body
        assert len(remote.versions()) == 2
        for i in range(2):
            for model in (TASK, SPARSE, "base"):
                status, body = _complete(srv, tiny_base.name if model == "base" else model, i, images)
                assert status == 200 and body["choices"][0]["token_ids"] == refs[model][i], (model, i, body)
        held = sorted(k.rsplit("-", 1)[0] for r in _replicas(srv) for k in r["held"])
        assert held == sorted([TASK, SPARSE]), held
        scrape = _wait_for("the replicas' request counts on /metrics", lambda: _fleet_metrics(srv, 6))
        assert len({s.labels.get("replica") for s in scrape["vllm:num_requests_running"]}) == 2
        switched = {
            s.labels["to_state"]
            for s in scrape.get("deltaserve_state_switches", [])
            if s.name.endswith("_total") and s.value > 0 and "replica" in s.labels
        }
        assert switched - {"base"}, f"no replica switched to the sparse delta's exclusive state: {switched}"

        for name in (TASK, SPARSE):
            status, body = _call(f"{srv.http}/v1/deltas/{name}", "DELETE", token=ADMIN_TOKEN)
            assert status == 200, body
        _wait_for("both replicas to release the deltas", lambda: all(r["held"] == [] for r in _replicas(srv)))
        _wait_for("the versions' files to leave the bucket", lambda: not remote.versions())
    finally:
        srv.stop()
    assert remote.names(STATUS_DIR) == []  # each replica removed its status and snapshot on the way out


def test_replicas_on_one_machine_pin_disjoint_cores(monkeypatch):
    from deltaserve.server import deploy_ray

    monkeypatch.setattr(deploy_ray.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    assert [deploy_ray.cpu_binding(r, 2) for r in range(2)] == ["0,1", "2,3"]
    assert [deploy_ray.cpu_binding(r, 2, tensor_parallel_size=2) for r in range(2)] == ["0|1", "2|3"]
    assert deploy_ray.cpu_binding(0, 1) == "0,1,2,3"
    assert deploy_ray.cpu_binding(None, 2) == deploy_ray.cpu_binding(0, 5) == "nobind"  # unknown rank, too few cores
