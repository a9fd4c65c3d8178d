"""The real server (gRPC + HTTP) against the transformers/PEFT references, on one session server."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import urllib.error
import urllib.request

import grpc
import pytest

from helpers import PROMPTS, hf_greedy, image_prompt, make_lora_bundle, peft_model, png_bytes
from server_process import ADMIN_TOKEN

MAX_TOKENS = 10


def http_json(
    url: str, body: dict | None = None, token: str | None = None, method: str | None = None
) -> tuple[int, dict]:
    data = json.dumps(body).encode() if body is not None else None
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "deltaserve.client.cli", *args], capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def lora_task(server, tiny_base, tmp_path_factory):
    """Task `lora-a` registered with the CLI; returns (name, bundle dir)."""
    bundle = make_lora_bundle(tiny_base, tmp_path_factory.mktemp("lora-a") / "bundle", name="lora-a", seed=11)
    done = cli("register", str(bundle), "--server", server.grpc, "--admin-token", ADMIN_TOKEN)
    assert done.returncode == 0, done.stderr
    assert "registered lora-a (lora, concurrent)" in done.stdout
    return "lora-a", bundle


@pytest.fixture(scope="module")
def references(tiny_base, hf_processor, sample_images, lora_task):
    """Greedy token ids of the plain base and of base + PEFT adapter, per prompt (with image)."""
    from transformers import LlavaForConditionalGeneration
    import torch

    base = LlavaForConditionalGeneration.from_pretrained(str(tiny_base), dtype=torch.float32).eval()
    lora = peft_model(tiny_base, lora_task[1])
    prompts = [image_prompt(q) for q in PROMPTS]
    refs = {
        "base": [hf_greedy(base, hf_processor, p, img, MAX_TOKENS) for p, img in zip(prompts, sample_images)],
        "lora": [hf_greedy(lora, hf_processor, p, img, MAX_TOKENS) for p, img in zip(prompts, sample_images)],
    }
    for name, outs in refs.items():
        assert len({tuple(o) for o in outs}) == len(outs), f"{name} outputs do not vary across prompts: {outs}"
    assert all(a != b for a, b in zip(refs["base"], refs["lora"])), "the LoRA delta does not change the outputs"
    return prompts, refs


def test_lora_and_base_through_grpc_match_references(server, lora_task, references, sample_images):
    from deltaserve.client.sync import DeltaClient

    prompts, refs = references
    with DeltaClient(server.grpc) as client:
        for i, (prompt, image) in enumerate(zip(prompts, sample_images)):
            out = client.generate(
                prompt, image=png_bytes(image), task=lora_task[0], max_tokens=MAX_TOKENS, temperature=0
            )
            assert out.token_ids == refs["lora"][i]
            assert out.routing.expert == "lora-a" and out.routing.router == "explicit"
            base = client.generate(
                prompt, image=png_bytes(image), task=server.base_name, max_tokens=MAX_TOKENS, temperature=0
            )
            assert base.token_ids == refs["base"][i]
            assert base.routing.expert == server.base_name


def test_lora_and_base_through_http_match_references(server, lora_task, references, sample_images):
    prompts, refs = references
    for i, (prompt, image) in enumerate(zip(prompts, sample_images)):
        data_url = "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode()
        for model, ref in ((lora_task[0], refs["lora"][i]), (server.base_name, refs["base"][i])):
            status, body = http_json(
                f"{server.http}/v1/completions",
                {
                    "model": model,
                    "prompt": prompt,
                    "image": data_url,
                    "max_tokens": MAX_TOKENS,
                    "temperature": 0,
                    "return_token_ids": True,
                },
            )
            assert status == 200, body
            assert body["choices"][0]["token_ids"] == ref
            assert body["model"] == model and body["routing"]["expert"] == model


def test_grpc_stream_equals_unary(server, lora_task, references, sample_images):
    from deltaserve.client.sync import DeltaClient

    prompts, refs = references
    with DeltaClient(server.grpc) as client:
        chunks = list(
            client.generate_stream(
                prompts[1], image=png_bytes(sample_images[1]), task="lora-a", max_tokens=MAX_TOKENS, temperature=0
            )
        )
    assert chunks[0].routing.expert == "lora-a"
    assert [t for c in chunks for t in c.token_ids] == refs["lora"][1]
    assert chunks[-1].finish_reason in ("stop", "length") and chunks[-1].usage.completion_tokens == len(refs["lora"][1])


def test_official_openai_client(server, lora_task, references, sample_images, hf_processor):
    import openai

    prompts, refs = references
    client = openai.OpenAI(base_url=f"{server.http}/v1", api_key="unused")
    models = {m.id for m in client.models.list()}
    assert {server.base_name, "lora-a", "auto"} <= models

    completion = client.completions.create(
        model=server.base_name, prompt="What is the opposite of big?\nAnswer:", max_tokens=MAX_TOKENS, temperature=0
    )
    assert completion.choices[0].text and completion.model == server.base_name

    decode = hf_processor.tokenizer.decode
    data_url = "data:image/png;base64," + base64.b64encode(png_bytes(sample_images[0])).decode()
    messages = [
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": data_url}}, {"type": "text", "text": PROMPTS[0]}],
        }
    ]
    chat = client.chat.completions.create(model="lora-a", messages=messages, max_tokens=MAX_TOKENS, temperature=0)
    # The chat template renders exactly the reference prompt, so the text is the reference's.
    assert chat.choices[0].message.content == decode(refs["lora"][0], skip_special_tokens=True)
    assert chat.model == "lora-a"

    stream = client.chat.completions.create(
        model="lora-a", messages=messages, max_tokens=MAX_TOKENS, temperature=0, stream=True
    )
    pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert "".join(pieces) == chat.choices[0].message.content


def test_client_built_only_from_reflection_calls_generate(server):
    from google.protobuf import descriptor_pool, message_factory
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    with grpc.insecure_channel(server.grpc) as channel:
        db = ProtoReflectionDescriptorDatabase(channel)
        assert "deltaserve.v1.Inference" in db.get_services()
        pool = descriptor_pool.DescriptorPool(db)  # not the default pool: no generated stubs involved
        method = pool.FindServiceByName("deltaserve.v1.Inference").FindMethodByName("Generate")
        request_cls = message_factory.GetMessageClass(method.input_type)
        response_cls = message_factory.GetMessageClass(method.output_type)
        call = channel.unary_unary(
            "/deltaserve.v1.Inference/Generate",
            request_serializer=request_cls.SerializeToString,
            response_deserializer=response_cls.FromString,
        )
        request = request_cls(prompt="What is the opposite of big?\nAnswer:", task=server.base_name)
        request.sampling.max_tokens = 4
        request.sampling.temperature = 0.0
        response = call(request, timeout=60)
    assert len(response.token_ids) >= 1 and response.routing.expert == server.base_name


def test_health_checks(server):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(server.grpc) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "deltaserve.v1.Inference", "deltaserve.v1.Registry"):
            assert (
                stub.Check(health_pb2.HealthCheckRequest(service=service)).status
                == health_pb2.HealthCheckResponse.SERVING
            )
    status, body = http_json(f"{server.http}/health")
    assert status == 200 and body["status"] == "ok"


def _scrape(server) -> dict[tuple[str, tuple], float]:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"{server.http}/metrics", timeout=30) as resp:
        text = resp.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }


def test_metrics_move_after_requests(server, lora_task):
    from deltaserve.client.sync import DeltaClient

    before = _scrape(server)
    ok_key = ("deltaserve_requests_total", (("api", "grpc"), ("outcome", "ok"), ("task", "lora-a")))
    with DeltaClient(server.grpc) as client:
        for _ in range(3):
            client.generate("Describe the image.\nAnswer:", task="lora-a", max_tokens=4, temperature=0)
    after = _scrape(server)
    assert after[ok_key] - before.get(ok_key, 0) == 3
    tokens = ("deltaserve_generated_tokens_total", (("task", "lora-a"),))
    assert after[tokens] > before.get(tokens, 0)
    assert after[("deltaserve_request_latency_seconds_count", (("task", "lora-a"),))] >= 3
    assert after[("deltaserve_registered_deltas", (("kind", "lora"),))] >= 1
    assert after[("deltaserve_registry_operations_total", (("op", "register"), ("result", "ok")))] >= 1
    # vLLM's own engine metrics are on the same endpoint.
    assert any(name.startswith("vllm:generation_tokens") for name, _ in after)


def test_cli_list_generate_metrics(server, lora_task):
    listing = cli("list", "--server", server.grpc, "--json")
    assert listing.returncode == 0, listing.stderr
    assert "lora-a" in {d["name"] for d in json.loads(listing.stdout)["deltas"]}
    gen = cli(
        "generate", "--server", server.grpc, "--task", "lora-a", "--max-tokens", "4", "What colour is the circle?"
    )
    assert gen.returncode == 0, gen.stderr
    assert "[lora-a via explicit" in gen.stderr and "[finish:" in gen.stderr
    summary = cli("metrics", "--http", server.http)
    assert summary.returncode == 0, summary.stderr
    assert "lora-a" in summary.stdout and "registered deltas:" in summary.stdout


def test_cli_route_shows_the_decision_without_generating(server, lora_task):
    before = _scrape(server)
    auto = cli("route", "--server", server.grpc, "--json", "Tell me a joke.")
    assert auto.returncode == 0, auto.stderr
    decision = json.loads(auto.stdout)
    assert decision["router"] == "auto" and decision["expert"] == server.base_name and decision["reason"]
    assert decision["scores"].get("base", 0) > 0.5 or "no task" in decision["reason"]
    named = cli("route", "--server", server.grpc, "--task", "lora-a", "What colour is the circle?")
    assert named.returncode == 0 and "[lora-a via explicit" in named.stdout, named.stderr
    unknown = cli("route", "--server", server.grpc, "--task", "no-such-task", "Hi")
    assert unknown.returncode != 0 and "no-such-task" in unknown.stderr
    after = _scrape(server)
    generated = [k for k in after if k[0] == "deltaserve_generated_tokens_total"]
    assert all(after[k] == before.get(k) for k in generated), "route must not generate"


# ---- bad input: a clear error, nothing changes, the server keeps serving ------------------


def _huge_png() -> bytes:
    from PIL import Image

    return png_bytes(Image.new("1", (10_000, 10_000)))  # 100 megapixels, a small file


BAD_REQUESTS = {
    "empty prompt": (dict(prompt=""), "prompt"),
    "prompt longer than the model": (dict(prompt="word " * 2000), "context"),
    "max_tokens zero": (dict(max_tokens=0), "max_tokens"),
    "max_tokens negative": (dict(max_tokens=-5), "max_tokens"),
    "max_tokens too large": (dict(max_tokens=100_000), "max_tokens"),
    "negative temperature": (dict(temperature=-0.5), "temperature"),
    "undecodable image": (dict(image=b"this is not an image"), "image"),
    "10000x10000 image": (dict(image="huge"), "pixels"),
}


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_generate_requests_are_refused_and_server_keeps_serving(server, case):
    from deltaserve.client.common import DeltaClientError
    from deltaserve.client.sync import DeltaClient

    fields, needle = BAD_REQUESTS[case]
    fields = dict(fields)
    if fields.get("image") == "huge":
        fields["image"] = _huge_png()
    request = {"prompt": "What colour is the circle?", "task": server.base_name, "max_tokens": 4, **fields}
    prompt = request.pop("prompt")
    with DeltaClient(server.grpc) as client:
        with pytest.raises(DeltaClientError) as err:
            client.generate(prompt, **request)
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert needle in err.value.message
        assert client.generate("What colour is the circle?", task=server.base_name, max_tokens=2).completion_tokens >= 1

    body = {
        "model": server.base_name,
        "prompt": prompt,
        "max_tokens": request.get("max_tokens"),
        "temperature": request.get("temperature"),
    }
    if "image" in request:
        body["image"] = base64.b64encode(request["image"]).decode()
    status, payload = http_json(f"{server.http}/v1/completions", {k: v for k, v in body.items() if v is not None})
    assert status == 400 and needle in payload["error"]["message"], payload
    status, _ = http_json(f"{server.http}/v1/completions", {"model": server.base_name, "prompt": "Hi", "max_tokens": 2})
    assert status == 200


def test_unknown_task_is_not_found_and_lists_tasks(server, lora_task):
    from deltaserve.client.common import DeltaClientError
    from deltaserve.client.sync import DeltaClient

    with DeltaClient(server.grpc) as client:
        with pytest.raises(DeltaClientError) as err:
            client.generate("Hi", task="no-such-task", max_tokens=2)
    assert err.value.code == grpc.StatusCode.NOT_FOUND
    assert "lora-a" in err.value.message and server.base_name in err.value.message
    status, body = http_json(
        f"{server.http}/v1/chat/completions", {"model": "no-such-task", "messages": [{"role": "user", "content": "Hi"}]}
    )
    assert status == 404 and "lora-a" in body["error"]["message"]


def test_invalid_bundle_is_refused_and_registry_unchanged(server, lora_task, tmp_path):
    from deltaserve.client.common import DeltaClientError
    from deltaserve.client.sync import DeltaClient

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "delta.json").write_text("{not json")
    with DeltaClient(server.grpc, admin_token=ADMIN_TOKEN) as client:
        before = [d.name for d in client.list().deltas]
        with pytest.raises(DeltaClientError) as err:
            client.register(bad)
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and "not valid JSON" in err.value.message
        assert [d.name for d in client.list().deltas] == before
    files = {"delta.json": base64.b64encode(b"{not json").decode()}
    status, body = http_json(f"{server.http}/v1/deltas", {"files": files}, token=ADMIN_TOKEN)
    assert status == 400 and "not valid JSON" in body["error"]["message"]


def test_registry_mutations_need_the_admin_token(server, lora_task):
    from deltaserve.client.common import DeltaClientError
    from deltaserve.client.sync import DeltaClient

    with DeltaClient(server.grpc) as client:  # no token
        with pytest.raises(DeltaClientError) as err:
            client.register(lora_task[1], name="sneaky")
        assert err.value.code == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(DeltaClientError) as err:
            client.unregister("lora-a")
        assert err.value.code == grpc.StatusCode.UNAUTHENTICATED
        assert "lora-a" in [d.name for d in client.list().deltas]
    with DeltaClient(server.grpc, admin_token="wrong") as client:
        with pytest.raises(DeltaClientError) as err:
            client.unregister("lora-a")
        assert err.value.code == grpc.StatusCode.UNAUTHENTICATED
    status, _ = http_json(f"{server.http}/v1/deltas/lora-a", method="DELETE")
    assert status == 401
    status, body = http_json(f"{server.http}/v1/deltas/lora-a")
    assert status == 200 and body["kind"] == "lora"
