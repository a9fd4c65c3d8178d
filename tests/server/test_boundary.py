"""Bad uploads and requests over the wire: a clear 4xx / INVALID_ARGUMENT, nothing left behind, the server keeps serving.

On the suite's shared server (``server`` fixture). Each case here was a 500 / INTERNAL, a
silent acceptance or a leftover staging directory before (the boundary issue's table).
"""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request

import grpc
import pytest
from server_process import ADMIN_TOKEN

MANIFEST = b'{"format_version": 1}'
BAD_UPLOADS = {
    "NUL in a name": [("delta.json", MANIFEST), ("a\x00b.safetensors", b"x")],
    "a `.` path": [("delta.json", MANIFEST), (".", b"x")],
    "300-character name": [("delta.json", MANIFEST), ("a" * 300, b"x")],
    "path deeper than the limit": [("delta.json", MANIFEST), ("/".join(["d"] * 40) + "/f", b"x")],
    "path longer than PATH_MAX": [("delta.json", MANIFEST), ("/".join(["d" * 100] * 50), b"x")],
    "a file that is also a folder": [("delta.json", MANIFEST), ("a.md", b"x"), ("a.md/b.md", b"y")],
    "control character": [("delta.json", MANIFEST), ("a\nb", b"x")],
}


def _staging(server) -> list:
    return sorted((server.store / "staging").iterdir())


def _http(url: str, data: bytes, token: str | None = ADMIN_TOKEN) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data, headers=headers), timeout=120) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _still_serves(server) -> None:
    status, body = _http(
        f"{server.http}/v1/completions",
        json.dumps({"model": server.base_name, "prompt": "Hi", "max_tokens": 2}).encode(),
    )
    assert status == 200, body


@pytest.mark.parametrize("case", sorted(BAD_UPLOADS))
def test_bad_upload_names_are_refused_over_grpc_and_http_and_leave_nothing(server, case):
    from deltaserve.v1 import deltaserve_pb2 as pb
    from deltaserve.v1 import deltaserve_pb2_grpc as pb_grpc

    files = BAD_UPLOADS[case]
    before = _staging(server)
    with grpc.insecure_channel(server.grpc) as channel:
        stub = pb_grpc.RegistryStub(channel)
        request = pb.RegisterRequest(files=[pb.BundleFile(path=p, data=d) for p, d in files], name="bad-upload")
        with pytest.raises(grpc.RpcError) as err:
            stub.Register(request, metadata=[("authorization", f"Bearer {ADMIN_TOKEN}")], timeout=60)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
        assert str(server.store) not in err.value.details()
        pieces = [pb.RegisterChunk(path=p, data=d, name="bad-upload") for p, d in [*files, ("delta.json", b"{}")]]
        with pytest.raises(grpc.RpcError) as err:  # the streamed upload; delta.json again: a duplicate as well
            stub.RegisterStream(iter(pieces), metadata=[("authorization", f"Bearer {ADMIN_TOKEN}")], timeout=60)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
        assert str(server.store) not in err.value.details()
    body = json.dumps({"name": "bad-upload", "files": {p: base64.b64encode(d).decode() for p, d in files}}).encode()
    status, payload = _http(f"{server.http}/v1/deltas", body)
    assert status == 400 and payload["error"]["message"], payload
    assert _staging(server) == before
    _still_serves(server)


def test_http_upload_with_a_path_given_twice_is_refused(server):
    entry = base64.b64encode(b"{}").decode()
    body = ('{"name": "twice", "files": {"delta.json": "%s", "delta.json": "%s"}}' % (entry, entry)).encode()
    status, payload = _http(f"{server.http}/v1/deltas", body)
    assert status == 400 and "more than once" in payload["error"]["message"], payload


def test_http_upload_with_an_empty_name_is_refused(server):
    body = json.dumps({"name": "", "files": {"delta.json": base64.b64encode(MANIFEST).decode()}}).encode()
    status, payload = _http(f"{server.http}/v1/deltas", body)
    assert status == 400 and "`name` must not be empty" in payload["error"]["message"], payload


@pytest.mark.parametrize(
    "body, needle",
    [
        ({"prompt": "Hi", "seed": 2**70}, "seed"),
        ({"prompt": "Hi \ud800 there"}, "surrogate"),
        ({"prompt": "Hi", "stop": ["\udfff"]}, "surrogate"),
    ],
    ids=["seed beyond 64 bits", "lone surrogate in the prompt", "lone surrogate in a stop string"],
)
def test_out_of_range_and_undecodable_fields_are_400(server, body, needle):
    data = json.dumps(
        {"model": server.base_name, "max_tokens": 2, **body}
    ).encode()  # ensure_ascii: "\ud800" stays an escape
    status, payload = _http(f"{server.http}/v1/completions", data, token=None)
    assert status == 400 and needle in payload["error"]["message"], payload
    chat = {
        "model": server.base_name,
        "max_tokens": 2,
        "messages": [{"role": "user", "content": body["prompt"]}],
        **{k: v for k, v in body.items() if k != "prompt"},
    }
    status, payload = _http(f"{server.http}/v1/chat/completions", json.dumps(chat).encode(), token=None)
    assert status == 400 and needle in payload["error"]["message"], payload
    _still_serves(server)


def test_path_registration_of_a_directory_with_a_symlink_is_refused(server, tiny_base, tmp_path):
    from helpers import make_lora_bundle

    bundle = make_lora_bundle(tiny_base, tmp_path / "bundle", name="linked", seed=5)
    (bundle / "notes.md").symlink_to("/etc/hostname")
    before = _staging(server)
    status, payload = _http(f"{server.http}/v1/deltas", json.dumps({"path": str(bundle)}).encode())
    assert status == 400 and "`notes.md`" in payload["error"]["message"] and "symlink" in payload["error"]["message"], (
        payload
    )
    assert _staging(server) == before
    with urllib.request.urlopen(f"{server.http}/v1/deltas", timeout=60) as resp:
        assert "linked" not in [d["name"] for d in json.loads(resp.read())["deltas"]]


@pytest.mark.parametrize(
    "data, path",
    [
        (b'{"model": "x", "prompt": "\xff\xfe"}', "/v1/completions"),
        (b"[" * 100_000 + b"]" * 100_000, "/v1/chat/completions"),
        (b"{}", "/v1/no-such-endpoint"),
    ],
    ids=["invalid UTF-8 body", "100000-deep JSON", "unknown path"],
)
def test_malformed_bodies_get_the_openai_error_shape(server, data, path):
    status, payload = _http(f"{server.http}{path}", data, token=None)
    assert 400 <= status < 500 and set(payload) == {"error"} and payload["error"]["message"], payload
    _still_serves(server)


def test_non_utf8_bytes_in_a_grpc_string_field_are_invalid_argument(server):
    from deltaserve.v1 import deltaserve_pb2 as pb

    # GenerateRequest.prompt (field 1, length-delimited) holding bytes that are not UTF-8.
    raw = b"\x0a\x03\xff\xfe\xfd" + pb.GenerateRequest(task=server.base_name).SerializeToString()
    with grpc.insecure_channel(server.grpc) as channel:
        call = channel.unary_unary(
            "/deltaserve.v1.Inference/Generate", request_serializer=None, response_deserializer=None
        )
        with pytest.raises(grpc.RpcError) as err:
            call(raw, timeout=60)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "protobuf" in err.value.details()
    _still_serves(server)


def _vllm_generated_tokens(server) -> float:
    with urllib.request.urlopen(f"{server.http}/metrics", timeout=60) as resp:
        text = resp.read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("vllm:generation_tokens_total")
    )


STREAMS, LONG_ANSWER = 10, 400


def _abandon_once(server, *, stream: bool) -> tuple[float, float]:
    """Send ``STREAMS`` requests for ``LONG_ANSWER`` tokens (ignore_eos), let generation start, close every
    connection (a streamed one right after its first chunk). Returns (tokens generated before the last
    close was seen, tokens generated in the 3 s after it)."""
    import http.client
    import time
    from urllib.parse import urlparse

    url = urlparse(server.http)
    before = _vllm_generated_tokens(server)
    conns = []
    for i in range(STREAMS):
        conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
        body = {
            "model": server.base_name,
            "prompt": f"Tell me a long story number {i}.",
            "max_tokens": LONG_ANSWER,
            "ignore_eos": True,
            "stream": stream,
            "temperature": 0,
        }
        conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        conns.append(conn)
    if stream:
        for conn in conns:
            resp = conn.getresponse()
            assert resp.status == 200
            assert resp.read1(64).startswith(b"data: ")  # the first chunk arrived: generation runs
            conn.sock.close()  # this user goes away
            conn.close()
    else:
        deadline = time.monotonic() + 60
        while _vllm_generated_tokens(server) - before < STREAMS and time.monotonic() < deadline:
            time.sleep(0.05)  # until generation runs
        for conn in conns:
            conn.sock.close()  # the users go away
            conn.close()
        time.sleep(0.5)  # the server notices the closed sockets (no chunk to write meanwhile)
    at_close = _vllm_generated_tokens(server)
    time.sleep(3.0)
    after = _vllm_generated_tokens(server)
    print(
        f"{after - before:.0f} tokens for {STREAMS} abandoned requests of {LONG_ANSWER} (stream={stream}), {after - at_close:.0f} after the disconnects"
    )
    return at_close - before, after - at_close


def _abandon(server, *, stream: bool) -> None:
    """Abandoned requests stop: at most a few tokens per request after the disconnects (400 tokens take
    longer than the 3 s watched). A trial is only conclusive when the answers were not already complete
    when the client left: the tiny model can generate all 4,000 tokens while a loaded machine's client
    reads its first chunks (seen once in CI: 4,000 before the closes, 0 after). Such a trial says nothing
    either way and is repeated, at most three times."""
    trials = []
    for _ in range(3):
        before_close, after_close = _abandon_once(server, stream=stream)
        trials.append((before_close, after_close))
        assert after_close <= STREAMS * 10, (
            f"{after_close} tokens generated after {STREAMS} disconnects (all answers: {STREAMS * LONG_ANSWER})"
        )
        if before_close < STREAMS * LONG_ANSWER * 0.9:
            break
    assert trials[-1][0] < STREAMS * LONG_ANSWER * 0.9, f"every trial was complete before the disconnects: {trials}"
    _still_serves(server)


def test_abandoned_non_streaming_requests_stop_generating(server):
    """A non-streamed answer arrives whole, so only the server's disconnect watcher can notice the client left.
    Without the wait-or-disconnect race: 1,909 tokens after 10 disconnects."""
    _abandon(server, stream=False)


def test_abandoned_http_streams_stop_generating(server):
    """Streams dropped after their first chunk. Before the fix: 1,161 and 1,340 tokens in two runs (Starlette
    noticed the closed sockets only on a failed write); with the engine's iterator left to the garbage
    collector, 4,000 (all) in a run after other tests. Counted from the disconnects: what was generated while
    the client read its first chunks depends on the machine."""
    _abandon(server, stream=True)


def test_a_dead_engine_is_unhealthy_on_both_front_ends(tiny_base, tmp_path):
    """SIGKILL the engine core: gRPC health says NOT_SERVING and HTTP /health 503 (one health definition)."""
    import os
    import signal
    import time

    import psutil
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from server_process import ServerProcess

    srv = ServerProcess(tiny_base, tmp_path / "store")
    try:
        engines = [
            p
            for p in psutil.Process(srv.pid).children(recursive=True)
            if "EngineCore" in " ".join(p.cmdline()) or "EngineCore" in p.name()
        ]
        assert engines, [(p.pid, p.name(), p.cmdline()) for p in psutil.Process(srv.pid).children(recursive=True)]
        for p in engines:
            os.kill(p.pid, signal.SIGKILL)
        deadline, grpc_status, http_status = time.time() + 60, None, None
        with grpc.insecure_channel(srv.grpc) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.time() < deadline:
                grpc_status = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status
                try:
                    with urllib.request.urlopen(f"{srv.http}/health", timeout=10) as resp:
                        http_status = resp.status
                except urllib.error.HTTPError as exc:
                    http_status = exc.code
                if grpc_status == health_pb2.HealthCheckResponse.NOT_SERVING and http_status == 503:
                    break
                time.sleep(0.5)
        assert (grpc_status, http_status) == (health_pb2.HealthCheckResponse.NOT_SERVING, 503)
    finally:
        srv.kill()


def test_http_request_id_from_body_or_header_is_echoed_and_validated(server):
    body = {"model": server.base_name, "prompt": "Hi", "max_tokens": 2}
    req = urllib.request.Request(
        f"{server.http}/v1/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "X-Request-Id": "trace-42"},
    )
    with urllib.request.urlopen(req, timeout=60) as resp:
        assert resp.headers["x-request-id"] == "trace-42" and json.loads(resp.read())["id"] == "cmpl-trace-42"
    chat = {
        "model": server.base_name,
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 2,
        "request_id": "mine.1",
    }
    status, payload = _http(f"{server.http}/v1/chat/completions", json.dumps(chat).encode(), token=None)
    assert status == 200 and payload["id"] == "chatcmpl-mine.1", payload
    status, payload = _http(
        f"{server.http}/v1/completions", json.dumps({**body, "request_id": "bad id/with slash"}).encode(), token=None
    )
    assert status == 400 and "request_id" in payload["error"]["message"], payload


def test_grpc_multi_turn_chat_equals_http_chat(server):
    from deltaserve.client.sync import DeltaClient

    messages = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "What is two plus two?"},
        {"role": "assistant", "content": "four"},
        {"role": "user", "content": "And three plus three?"},
    ]
    with DeltaClient(server.grpc) as client:
        out = client.generate(
            "", messages=messages, task=server.base_name, max_tokens=6, temperature=0, request_id="grpc-chat-1"
        )
    assert out.request_id == "grpc-chat-1"
    body = {
        "model": server.base_name,
        "messages": messages,
        "max_tokens": 6,
        "temperature": 0,
        "return_token_ids": True,
    }
    status, payload = _http(f"{server.http}/v1/chat/completions", json.dumps(body).encode(), token=None)
    assert status == 200 and payload["usage"]["prompt_tokens"] == out.prompt_tokens, (payload, out)
    assert payload["choices"][0]["message"]["content"] == out.text


REFUSED_BUNDLES = {
    "manifest without fields": ([("delta.json", MANIFEST)], "`kind`"),
    "manifest that is not JSON": ([("delta.json", b"{nope")], "`delta.json` is not valid JSON"),
    "PEFT adapter without weights": ([("adapter_config.json", b"{}")], "`adapter_model.safetensors`"),
}


@pytest.mark.parametrize("case", sorted(REFUSED_BUNDLES))
def test_refused_bundles_name_the_file_never_a_server_path(server, case):
    """Before: "invalid delta bundle <store>/staging/<hex>: …" (and the PEFT check named the staging directory twice)."""
    from deltaserve.v1 import deltaserve_pb2 as pb
    from deltaserve.v1 import deltaserve_pb2_grpc as pb_grpc

    files, needle = REFUSED_BUNDLES[case]
    with grpc.insecure_channel(server.grpc) as channel:
        request = pb.RegisterRequest(files=[pb.BundleFile(path=p, data=d) for p, d in files], name="refused")
        with pytest.raises(grpc.RpcError) as err:
            pb_grpc.RegistryStub(channel).Register(
                request, metadata=[("authorization", f"Bearer {ADMIN_TOKEN}")], timeout=60
            )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and needle in err.value.details(), err.value.details()
    body = json.dumps({"name": "refused", "files": {p: base64.b64encode(d).decode() for p, d in files}}).encode()
    status, payload = _http(f"{server.http}/v1/deltas", body)
    assert status == 400 and needle in payload["error"]["message"], payload
    for message in (err.value.details(), payload["error"]["message"]):
        assert str(server.store) not in message and "staging" not in message, message


@pytest.mark.parametrize(
    "path, needle",
    [
        (lambda store: store, "store"),
        (lambda store: store / "staging", "store"),
        (lambda store: store.parent, "store"),
        (lambda store: "/" + "a" * 5000, "`path` cannot be used"),
    ],
    ids=["the store", "inside the store", "a folder holding the store", "a name too long for the file system"],
)
def test_path_registration_of_the_store_or_an_unusable_path_is_400_on_a_kept_connection(server, path, needle):
    """Before: registering the store copied it into its own staging folder until the name grew too long, and a
    5000-character path failed in the file system: HTTP 500, connection dropped, server paths in the log only."""
    import http.client
    from urllib.parse import urlparse

    url = urlparse(server.http)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=120)
    before = _staging(server)
    body = json.dumps({"path": str(path(server.store))})
    conn.request(
        "POST", "/v1/deltas", body, {"Content-Type": "application/json", "Authorization": f"Bearer {ADMIN_TOKEN}"}
    )
    resp = conn.getresponse()
    payload = json.loads(resp.read())
    assert resp.status == 400 and needle in payload["error"]["message"], payload
    assert str(server.store) not in payload["error"]["message"]
    conn.request("GET", "/health")  # the same connection still answers
    assert conn.getresponse().status == 200
    conn.close()
    assert _staging(server) == before


def test_health_answers_quickly_while_a_large_upload_and_a_long_prompt_are_processed(server):
    """Item 2 of the boundary issue: /health answers within 100 ms (9 probes in 10; none past 500 ms) while large uploads (HTTP, gRPC's streamed
    upload) are decoded, written and refused and a 2 MB prompt is tokenized. gRPC's unary ``Register`` is not
    covered: grpc itself holds the event loop ≈ 0.2 s while it receives a 96 MiB message (clients use
    ``RegisterStream``). A 96 MiB bundle here (the shared server's limit is 512 MiB: the
    machine is small and shared); the issue measured 7.9 s for a 684 MiB HTTP body before d1ea8b7."""
    import os
    import threading
    import time

    upload = json.dumps(
        {
            "name": "big",
            "files": {
                "delta.json": base64.b64encode(MANIFEST).decode(),
                "w.safetensors": base64.b64encode(os.urandom(96 << 20)).decode(),
            },
        }
    ).encode()
    prompt = json.dumps({"model": server.base_name, "prompt": "word " * 400_000, "max_tokens": 1}).encode()
    from deltaserve.v1 import deltaserve_pb2 as pb
    from deltaserve.v1 import deltaserve_pb2_grpc as pb_grpc

    # The same size through gRPC's streamed upload, in 1 MiB pieces as the clients send it (built here: copying
    # 96 MiB in the test's own thread would hold this process's GIL and delay its probes).
    weights = os.urandom(96 << 20)
    pieces = [pb.RegisterChunk(path="delta.json", data=MANIFEST, name="big")]
    pieces += [
        pb.RegisterChunk(path="w.safetensors", data=weights[i : i + (1 << 20)]) for i in range(0, len(weights), 1 << 20)
    ]

    def grpc_upload():
        with grpc.insecure_channel(server.grpc) as channel:
            try:
                pb_grpc.RegistryStub(channel).RegisterStream(
                    iter(pieces), metadata=[("authorization", f"Bearer {ADMIN_TOKEN}")], timeout=120
                )
            except grpc.RpcError as exc:
                results["grpc"] = exc.code().name

    results = {}
    threads = [
        threading.Thread(target=grpc_upload),
        threading.Thread(target=lambda: results.update(upload=_http(f"{server.http}/v1/deltas", upload)[0])),
        threading.Thread(
            target=lambda: results.update(prompt=_http(f"{server.http}/v1/completions", prompt, token=None)[0])
        ),
    ]
    latencies = []
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        started = time.perf_counter()
        with urllib.request.urlopen(f"{server.http}/health", timeout=30) as resp:
            assert resp.status == 200
        latencies.append(time.perf_counter() - started)
        time.sleep(0.02)
    print(f"/health: {len(latencies)} probes, max {max(latencies) * 1000:.0f} ms; {results}")
    assert results == {"upload": 400, "prompt": 400, "grpc": "INVALID_ARGUMENT"}, results
    # 9 of 10 probes within 100 ms, none past 500 ms: on 2 cores shared by the server, its engine worker and
    # this client, the OS alone delays an odd probe by ~150 ms (seen in CI); a blocked event loop (the
    # decode/tokenize work on the loop, before d1ea8b7) holds every probe for seconds.
    latencies.sort()
    assert len(latencies) >= 5, latencies
    assert latencies[int(0.9 * len(latencies)) - 1] < 0.1 and latencies[-1] < 0.5, latencies[-5:]


def test_an_upload_body_past_the_limit_is_refused_before_it_is_read(server):
    """A declared Content-Length beyond what the bundle limit allows is answered at once: nothing is read or kept
    (before, the whole body was read into memory and parsed first)."""
    import http.client
    from urllib.parse import urlparse

    url = urlparse(server.http)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    conn.putrequest("POST", "/v1/deltas")
    for key, value in (
        ("Content-Type", "application/json"),
        ("Authorization", f"Bearer {ADMIN_TOKEN}"),
        ("Content-Length", str(10 << 30)),  # 10 GiB announced, a few bytes sent
    ):
        conn.putheader(key, value)
    conn.endheaders(b'{"files": {')
    resp = conn.getresponse()
    payload = json.loads(resp.read())
    conn.close()
    assert resp.status == 429 and "the server takes at most" in payload["error"]["message"], payload
    _still_serves(server)
