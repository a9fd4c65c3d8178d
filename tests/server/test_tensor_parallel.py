"""Tensor parallelism: ``deltaserve serve --tensor-parallel-size 2`` serves every delta kind sharded.

Two vLLM workers, one core each (``VLLM_CPU_OMP_THREADS_BIND``, set by the engine on a
one-NUMA-node machine). Each worker applies its own piece of every delta: sparse rows and
columns of the column- and row-parallel layers, fused ``qkv``/``gate_up`` parts, the
projector's two layers; bottleneck adapters on ``o_proj``/``down_proj`` see the all-reduced
output; the IA³ kind's output maps on ``k_proj``/``v_proj`` (sharded columns) and input map
on ``down_proj`` (sharded input) see gathered activations. Concurrent traffic over the base,
the deltas made by ``deltaserve tune`` and the IA³ delta must give the same greedy tokens as
transformers, which the one-worker server gives too (``test_tuned_mixed``, ``test_third_party_kind``).
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest

from helpers import IA3_NAME, PROMPTS, concurrent_greedy, png_bytes
from server_process import ADMIN_TOKEN, ServerProcess


@pytest.fixture(scope="module")
def tp_server(tiny_base, tmp_path_factory, kinds_env):
    srv = ServerProcess(
        tiny_base,
        tmp_path_factory.mktemp("tp") / "store",
        "--tensor-parallel-size",
        "2",
        env=kinds_env,
    )
    yield srv
    srv.stop()


def test_two_workers_serve_every_kind_like_one(tp_server, tuned, tuned_refs, ia3, ia3_refs, sample_images):
    from deltaserve.client.sync import DeltaClient

    bundles = {**tuned, IA3_NAME: ia3[0]}
    refs = {**tuned_refs, IA3_NAME: ia3_refs[IA3_NAME]}
    with DeltaClient(tp_server.grpc, admin_token=ADMIN_TOKEN) as admin:
        infos = {name: admin.register(path) for name, path in bundles.items()}
    assert {n: i.binding for n, i in infos.items()} == dict.fromkeys(bundles, "concurrent")
    images = [png_bytes(img) for img in sample_images[: len(PROMPTS)]]
    tasks = ["base", *bundles]

    results = concurrent_greedy(tp_server, tasks, images, 4 * len(tasks) * 3)
    wrong = [(t, i, got) for t, i, got in results if got != refs[t][i]]
    assert not wrong, f"{len(wrong)} of {len(results)} differ, e.g. {wrong[:3]}"


def test_weight_verification_says_it_needs_one_worker(tp_server):
    """``/v1/engine/verify`` reads whole tensors back from one worker: with two it answers 503 and says why."""
    req = urllib.request.Request(f"{tp_server.http}/v1/engine/verify", method="POST", data=b"")
    req.add_header("Authorization", f"Bearer {ADMIN_TOKEN}")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=60)
    assert err.value.code == 503
    assert "tensor-parallel-size 2" in json.loads(err.value.read())["error"]["message"]
