"""What supporting exclusive deltas (sparse, bottleneck) costs, measured on the engine.

    .venv/bin/python bench/exclusive.py [--requests 160] [--concurrency 16] [--max-tokens 32] [--out docs/]

One run, same base and workload for every engine:

1. **Idle machinery tax.** Base-only throughput of an engine with the worker extension
   loaded *and a sparse delta staged but idle* vs the same engine without the extension
   (``--no-exclusive``), for the compiled path (no LoRA: vLLM compiles the decoder) and
   the eager path (LoRA on: vLLM runs eagerly on CPU). Engines run one after another,
   order ``with, without, without, with`` so drift hits both equally; each figure is
   the median of ``--repeats`` measurements.
2. **Switch cost vs decode step** (on the compiled engine): the time of a state switch
   inside the worker and as a round trip from the API process (``collective_rpc``),
   against the per-token decode time of a single stream; and the throughput *in* the
   sparse state (it runs eagerly — see ``server/worker_patches.py``).

Writes ``exclusive-bench.json`` and ``exclusive-bench.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import _common  # bench/_common.py (the script's directory is on sys.path)


async def _throughput(
    engine, requests: int, concurrency: int, max_tokens: int, images, salt: str | None = None
) -> dict:
    from deltaserve.server.engine import GenerationInput, Sampling

    prompts = [engine.tokenizer(_common.prompt_text(q)).input_ids for q in _common.PROMPTS]
    sem = asyncio.Semaphore(concurrency)
    tokens = 0

    async def one(k: int) -> None:
        nonlocal tokens
        async with sem:
            inp = GenerationInput(
                f"b{time.monotonic_ns()}-{k}",
                prompts[k % len(prompts)],
                Sampling(max_tokens=max_tokens, temperature=0.0, ignore_eos=True),
                image=images[k % len(images)],
                cache_salt=salt,
            )
            async for chunk in engine.generate(inp):
                tokens += len(chunk.token_ids)

    started = time.perf_counter()
    await asyncio.gather(*(one(k) for k in range(requests)))
    seconds = time.perf_counter() - started
    return {
        "seconds": seconds,
        "tokens": tokens,
        "tokens_per_s": tokens / seconds,
        "requests_per_s": requests / seconds,
    }


async def _decode_step_s(engine, images, max_tokens: int = 64) -> float:
    """Per-token time of one stream (median gap between consecutive tokens)."""
    from deltaserve.server.engine import GenerationInput, Sampling

    ids = engine.tokenizer(_common.prompt_text(_common.PROMPTS[0])).input_ids
    stamps = []
    async for chunk in engine.generate(
        GenerationInput(
            f"d{time.monotonic_ns()}",
            ids,
            Sampling(max_tokens=max_tokens, temperature=0.0, ignore_eos=True),
            image=images[0],
        )
    ):
        stamps += [time.perf_counter()] * len(chunk.token_ids)
    gaps = [b - a for a, b in zip(stamps[1:], stamps[2:]) if b > a]
    return statistics.median(gaps)


async def _run_engine(base: Path, *, lora: bool, exclusive: bool, args, images, sparse_bundle: Path | None) -> dict:
    from deltaserve.server.config import EngineConfig
    from deltaserve.server.engine import Engine

    started = time.perf_counter()
    engine = await Engine.start(
        EngineConfig(model=str(base), enable_lora=lora, exclusive_deltas=exclusive, kv_cache_memory_bytes=256 << 20)
    )
    out: dict = {"lora": lora, "exclusive": exclusive, "start_s": round(time.perf_counter() - started, 1)}
    try:
        if exclusive and sparse_bundle is not None:
            from deltaserve.plugins.base_spec import BaseSpec
            from deltaserve.plugins.bundle import read_bundle

            bundle = read_bundle(sparse_bundle, BaseSpec.from_dir(base))
            out["staged"] = await engine.worker_call(
                "ds_stage",
                "bench@0",
                "sparse",
                str(sparse_bundle),
                bundle.manifest.config,
                0,  # 0: an exclusive state
            )
        await _throughput(engine, 2 * args.concurrency, args.concurrency, args.max_tokens, images)  # warm-up
        runs = [
            await _throughput(engine, args.requests, args.concurrency, args.max_tokens, images)
            for _ in range(args.repeats)
        ]
        out["base_tokens_per_s"] = statistics.median(r["tokens_per_s"] for r in runs)
        out["runs"] = runs
        if exclusive and sparse_bundle is not None and not lora:
            out["decode_step_ms"] = 1e3 * await _decode_step_s(engine, images)
            worker, rtt = [], []
            for k in range(50):
                t = time.perf_counter()
                worker.append(await engine.worker_call("ds_activate", "bench@0" if k % 2 == 0 else "base"))
                rtt.append(time.perf_counter() - t)
            await engine.worker_call("ds_activate", "base")
            out["switch_worker_ms"] = 1e3 * statistics.median(worker)
            out["switch_round_trip_ms"] = 1e3 * statistics.median(rtt)
            await engine.worker_call("ds_activate", "bench@0")
            await _throughput(engine, args.concurrency, args.concurrency, args.max_tokens, images, salt="bench@0")
            state = await _throughput(engine, args.requests, args.concurrency, args.max_tokens, images, salt="bench@0")
            await engine.worker_call("ds_activate", "base")
            out["sparse_state_tokens_per_s"] = state["tokens_per_s"]
    finally:
        engine.shutdown()
        del engine
        gc.collect()
    print(json.dumps({k: v for k, v in out.items() if k != "runs"}), flush=True)
    return out


def _markdown(result: dict) -> str:
    rows = []
    for path in ("compiled", "eager"):
        r = result["tax"][path]
        rows.append(
            f"| {path} ({'no LoRA' if path == 'compiled' else 'LoRA on'}) | {r['with']:.0f} | {r['without']:.0f} | **{r['ratio']:.3f}** |"
        )
    s = result["switch"]
    return "\n".join(
        [
            "# Exclusive deltas: what they cost",
            "",
            f"Reproduce: `{result['command']}` — {result['machine']}, base: {result['base']}.",
            f"Workload: {result['workload']['requests']} image+text requests, concurrency {result['workload']['concurrency']}, "
            f"max_tokens {result['workload']['max_tokens']}, greedy; median of {result['workload']['repeats']} runs per engine.",
            "",
            "## Base-only throughput with the machinery loaded and idle (a sparse delta staged)",
            "",
            "| engine path | with extension (tok/s) | without, `--no-exclusive` (tok/s) | ratio |",
            "|---|---:|---:|---:|",
            *rows,
            "",
            "Target: ratio ≥ 0.95. Nothing runs per step while the engine is in the base state: no hooks, the",
            "compiled graph and the packed GEMM handles are vLLM's own; a staged delta is only memory.",
            "",
            "## State switch vs decode step (compiled engine)",
            "",
            "| | ms |",
            "|---|---:|",
            f"| switch inside the worker (swap GEMM callables, copy patched tensors) | {s['switch_worker_ms']:.3f} |",
            f"| switch as seen by the API process (`collective_rpc` round trip) | {s['switch_round_trip_ms']:.2f} |",
            f"| one decode step, single stream | {s['decode_step_ms']:.2f} |",
            "",
            f"Throughput inside the sparse state: {s['sparse_state_tokens_per_s']:.0f} tok/s "
            f"({s['sparse_state_tokens_per_s'] / result['tax']['compiled']['with']:.2f}× the compiled base state: exclusive states run eagerly).",
            "",
        ]
    )


async def main_async(args) -> dict:
    from deltaserve.tuning.synthetic import make_sparse_bundle

    work = Path(tempfile.mkdtemp(prefix="ds-bench-excl-"))
    base, base_kind = _common.pick_base(work)
    sparse = make_sparse_bundle(base, work / "sparse", "bench-sparse", seed=1)
    images = [_common.image(i) for i in range(8)]
    engines = {}
    for lora in (False, True):
        for exclusive in (True, False, False, True):
            key = (lora, exclusive)
            r = await _run_engine(base, lora=lora, exclusive=exclusive, args=args, images=images, sparse_bundle=sparse)
            engines.setdefault(key, []).append(r)
    tax = {}
    for lora, path in ((False, "compiled"), (True, "eager")):
        with_ = statistics.median(r["base_tokens_per_s"] for r in engines[(lora, True)])
        without = statistics.median(r["base_tokens_per_s"] for r in engines[(lora, False)])
        tax[path] = {"with": with_, "without": without, "ratio": with_ / without}
    switch_runs = [r for r in engines[(False, True)] if "switch_worker_ms" in r]
    switch = {
        k: statistics.median(r[k] for r in switch_runs)
        for k in ("switch_worker_ms", "switch_round_trip_ms", "decode_step_ms", "sparse_state_tokens_per_s")
    }
    facts = _common.machine_facts()
    return {
        "command": "python bench/exclusive.py " + " ".join(sys.argv[1:]),
        "machine": f"{facts['cpu_model']}, {facts['nproc']} cores, torch {facts['torch']}, vllm {facts['vllm']}",
        "base": f"{base_kind}",
        "workload": {
            "requests": args.requests,
            "concurrency": args.concurrency,
            "max_tokens": args.max_tokens,
            "repeats": args.repeats,
        },
        "tax": tax,
        "switch": switch,
        "engines": {f"lora={k[0]},exclusive={k[1]}": v for k, v in engines.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=160)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("docs"))
    args = parser.parse_args()
    result = asyncio.run(main_async(args))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "exclusive-bench.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "exclusive-bench.md").write_text(_markdown(result))
    print(_markdown(result))


if __name__ == "__main__":
    main()
