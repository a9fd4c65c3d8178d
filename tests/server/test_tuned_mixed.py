"""Deltas made by ``deltaserve tune`` share one batch with base traffic, on every architecture family.

The deltas are what the tuning pipeline writes with its defaults (SPIDER and magnitude
masks over the projector and the last two decoder layers — RMSNorm weights included;
LoRA on every linear of that scope, fused ``qkv``/``gate_up`` in vLLM; bottleneck relu
adapters on ``o_proj`` and ``down_proj``), trained briefly on the tiny world's ``digits``
so that each one's answers differ from the base's. The tuned experts answer a digit and stop,
so every request asks for exactly ``TUNED_TOKENS`` tokens (``min_tokens``; transformers:
``min_new_tokens``) to compare more than one token. Many concurrent requests, equal shares,
each equal token for token to its expert in transformers (PEFT for LoRA; the sparse delta
merged into the weights; the adapters hooked on), so to its expert served alone.

One engine per architecture: LLaVA (the session server: base, two LoRA, two sparse and one
bottleneck delta, 330 requests) and Qwen2-VL (its own server: the sparse deltas also change
the patch merger — its projector — under M-RoPE, fused ``qkv`` with bias; base, one LoRA, two
sparse and one bottleneck delta, 150 requests).
"""

from __future__ import annotations

import pytest

from helpers import IA3_NAME, PROMPTS, concurrent_greedy, png_bytes
from server_process import ADMIN_TOKEN, ServerProcess


@pytest.fixture(scope="module")
def qwen_server(tiny_qwen_base, tmp_path_factory, kinds_env):
    srv = ServerProcess(tiny_qwen_base, tmp_path_factory.mktemp("qwen-server") / "store", env=kinds_env)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def qwen_hub_server(tiny_qwen_hub_base, tmp_path_factory):
    srv = ServerProcess(tiny_qwen_hub_base, tmp_path_factory.mktemp("qwen-hub-server") / "store")
    yield srv
    srv.stop()


ARCHS = {
    # arch: (model type, server, deltas, references, requests)
    "llava": ("llava", "server", "tuned", "tuned_refs", 330),
    "qwen2_vl": ("qwen2_vl", "qwen_server", "qwen_tuned", "qwen_tuned_refs", 150),
    # the tensor names of the published Qwen2-VL checkpoints (`visual.*`, `model.*`): tuned, stored and served in them
    "qwen2_vl-hub-layout": ("qwen2_vl", "qwen_hub_server", "qwen_hub_tuned", "qwen_hub_tuned_refs", 60),
}


@pytest.mark.parametrize("arch", ARCHS)
def test_tuned_deltas_of_every_kind_share_the_batch_exactly(arch, request, sample_images):
    from deltaserve.client.sync import DeltaClient

    model_type, *fixtures, requests = ARCHS[arch]
    tuned, tuned_refs = (request.getfixturevalue(f) for f in fixtures[1:])
    server = request.getfixturevalue(fixtures[0])
    with DeltaClient(server.grpc, admin_token=ADMIN_TOKEN) as admin:
        infos = {name: admin.register(path) for name, path in tuned.items()}
    try:
        assert {n: i.binding for n, i in infos.items()} == dict.fromkeys(tuned, "concurrent")
        images = [png_bytes(img) for img in sample_images[: len(PROMPTS)]]
        tasks = ["base", *tuned]

        results = concurrent_greedy(server, tasks, images, requests, model_type=model_type)
        wrong = [(t, i, got) for t, i, got in results if got != tuned_refs[t][i]]
        assert not wrong, f"{len(wrong)} of {len(results)} differ, e.g. {wrong[:3]}"
    finally:
        with DeltaClient(server.grpc, admin_token=ADMIN_TOKEN) as admin:
            for name in tuned:
                admin.unregister(name)


def test_a_third_party_kind_on_qwen2_vl(qwen_server, qwen_ia3, qwen_ia3_refs, sample_images):
    """The IA³ kind of ``tests/kinds`` (installed through its entry point only) on the second architecture:
    concurrent with the base, token-equal to PEFT's own IA³ on the transformers Qwen2-VL model."""
    from deltaserve.client.sync import DeltaClient

    with DeltaClient(qwen_server.grpc, admin_token=ADMIN_TOKEN) as admin:
        info = admin.register(qwen_ia3[0])
    try:
        assert (info.kind, info.binding) == ("ia3", "concurrent")
        images = [png_bytes(img) for img in sample_images[: len(PROMPTS)]]
        results = concurrent_greedy(qwen_server, ["base", IA3_NAME], images, 40, model_type="qwen2_vl")
        wrong = [(t, i, got) for t, i, got in results if got != qwen_ia3_refs[t][i]]
        assert not wrong, f"{len(wrong)} of {len(results)} differ, e.g. {wrong[:3]}"
    finally:
        with DeltaClient(qwen_server.grpc, admin_token=ADMIN_TOKEN) as admin:
            admin.unregister(IA3_NAME)
