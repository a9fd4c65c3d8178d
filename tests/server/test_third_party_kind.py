"""A third-party delta kind, served concurrently and exactly with no edit in ``server/``.

The IA³ kind (``tests/kinds/deltaserve_ia3``) is installed in the session server only
through its ``deltaserve.plugins`` entry point. Its bundle rescales ``k_proj`` and ``v_proj``
outputs (``k_proj`` lives inside vLLM's fused ``qkv_proj``) and the ``down_proj`` input of the
last two decoder layers. The reference is PEFT's own IA³ on the transformers model — an
independent implementation, not the kind's ``apply``.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from helpers import IA3_NAME as NAME
from helpers import PROMPTS, TUNED_TOKENS, image_prompt, png_bytes
from server_process import ADMIN_TOKEN

SERVER = Path(__file__).resolve().parents[2] / "server"
BUILT_IN = ("lora", "sparse", "bottleneck")


def test_server_names_no_built_in_kind():
    """The server drives kinds through their declarations only: no built-in kind name appears in its code."""
    found = []
    for file in sorted(SERVER.glob("*.py")):
        for n, line in enumerate(file.read_text().splitlines(), 1):
            if any(f'"{kind}"' in line or f"'{kind}'" in line or f"plugins.{kind}" in line for kind in BUILT_IN):
                found.append(f"{file.name}:{n}: {line.strip()}")
    assert not found, found


def test_a_third_party_kind_is_served_concurrently_and_exactly(server, ia3, ia3_refs, sample_images):
    from deltaserve.client.aio import AsyncDeltaClient
    from deltaserve.client.sync import DeltaClient

    with DeltaClient(server.grpc, admin_token=ADMIN_TOKEN) as admin:
        info = admin.register(ia3[0])
    try:
        assert (info.kind, info.binding) == ("ia3", "concurrent")
        images = [png_bytes(img) for img in sample_images[: len(PROMPTS)]]

        async def load():
            async with AsyncDeltaClient(server.grpc) as client:

                async def one(task, i):
                    out = await client.generate(
                        image_prompt(PROMPTS[i]),
                        image=images[i],
                        task=server.base_name if task == "base" else task,
                        max_tokens=TUNED_TOKENS,
                        temperature=0,
                    )
                    return task, i, out.token_ids

                jobs = [(task, k % len(PROMPTS)) for k in range(40) for task in ("base", NAME)]
                return await asyncio.gather(*(one(t, i) for t, i in jobs))

        results = asyncio.run(load())
        wrong = [(t, i, got) for t, i, got in results if got != ia3_refs[t][i]]
        assert not wrong, f"{len(wrong)} of {len(results)} differ, e.g. {wrong[:2]}"
    finally:
        with DeltaClient(server.grpc, admin_token=ADMIN_TOKEN) as admin:
            admin.unregister(NAME)
