"""Deltas made by ``deltaserve tune`` share one batch: base, two LoRA, two sparse and one bottleneck delta.

The deltas are what the tuning pipeline writes with its defaults (SPIDER and magnitude
masks over the projector and the last two decoder layers — RMSNorm weights included;
LoRA on every linear of that scope, fused ``qkv``/``gate_up`` in vLLM; bottleneck relu
adapters on ``o_proj`` and ``down_proj``), trained briefly on the tiny world's ``digits``
so that each one's answers differ from the base's. The tuned experts answer a digit and stop,
so every request asks for exactly ``TUNED_TOKENS`` tokens (``min_tokens``; transformers:
``min_new_tokens``) to compare more than one token. 330 concurrent requests, equal shares,
each equal token for token to its expert in transformers (PEFT for LoRA; the sparse delta
merged into the weights; the adapters hooked on), so to its expert served alone.
"""

from __future__ import annotations

from helpers import concurrent_greedy, PROMPTS, png_bytes
from server_process import ADMIN_TOKEN


def test_tuned_deltas_of_every_kind_share_the_batch_exactly(server, tuned, tuned_refs, sample_images):
    from deltaserve.client.sync import DeltaClient

    with DeltaClient(server.grpc, admin_token=ADMIN_TOKEN) as admin:
        infos = {name: admin.register(path) for name, path in tuned.items()}
    try:
        assert {n: i.binding for n, i in infos.items()} == dict.fromkeys(tuned, "concurrent")
        images = [png_bytes(img) for img in sample_images[: len(PROMPTS)]]
        tasks = ["base", *tuned]

        results = concurrent_greedy(server, tasks, images, 330)
        wrong = [(t, i, got) for t, i, got in results if got != tuned_refs[t][i]]
        assert not wrong, f"{len(wrong)} of {len(results)} differ, e.g. {wrong[:3]}"
    finally:
        with DeltaClient(server.grpc, admin_token=ADMIN_TOKEN) as admin:
            for name in tuned:
                admin.unregister(name)
