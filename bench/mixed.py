"""Plan deltas (sparse, bottleneck) in the shared batch: what mixed traffic costs, measured on the engine.

    .venv/bin/python bench/mixed.py [--requests 96] [--concurrency 16] [--max-tokens 32] [--rounds 3] [--out docs/]

One run, one base (the cached pretrained one if present), vLLM's ``AsyncLLM`` through
deltaserve's :class:`~deltaserve.server.engine.Engine` (LoRA on, worker extension loaded,
the server's engine flags):

1. **Mixed vs base-only.** Staged: one LoRA, one sparse delta (SPIDER-like scope: the last
   two decoder layers and the projector, 10 % of their entries), one bottleneck delta
   (relu on every ``o_proj``, as ``deltaserve tune`` makes them). ``--rounds`` paired rounds,
   order alternating (base first, then mixed first): ``--requests`` requests at
   ``--concurrency``, either all to the base or in equal shares over base, LoRA, sparse and
   bottleneck. Every request has its own image (a pixel salt per measurement: no prefix- or
   encoder-cache hits across measurements) and generates exactly ``--max-tokens`` tokens
   (``ignore_eos``). Ratio = mixed requests/s ÷ base requests/s of the same round. Each
   round also measures half base, half one kind (LoRA, sparse, bottleneck): where the
   mixed figure goes.
   **Outputs checked**: after the timed rounds, every measured request is served again,
   untimed — base and LoRA requests in batches of their own task, sparse and bottleneck
   requests by an *exclusive engine state* of a second copy of the same delta (the merged
   weights; an independent path) — and must give the same tokens.
2. **16 sparse deltas.** 16 sparse deltas staged; p50 latency of requests spread over all 16
   vs all to one of them, paired alternating rounds.
3. **Register → first token**: staging a fresh delta (worker call; LoRA: ``add_lora``) plus
   the first token of its first request, sparse vs LoRA, median of 5 fresh deltas each.
4. **Idle cost**: base-only requests/s with the machinery loaded (dispatchers and per-step
   hooks installed by a staged concurrent delta) vs an engine started without the worker
   extension. Engines run one at a time (their idle busy-wait would steal the 2 cores),
   in the order with, without, without, with, with, without; each engine warms up with a
   discarded measurement, then measures ``--rounds`` times; ratio of the medians over engines.

Writes ``mixed-bench.json`` and ``mixed-bench.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import _common  # bench/_common.py (the script's directory is on sys.path)

BUDGET = 256 << 20


def _sparse_params(base: Path) -> list[str]:
    from deltaserve.plugins.base_spec import BaseSpec

    names = BaseSpec.from_dir(base).params
    layers = sorted({int(n.split(".layers.")[1].split(".")[0]) for n in names if "language_model.model.layers." in n})
    top = tuple(f"language_model.model.layers.{i}." for i in layers[-2:])
    return [n for n in names if n.startswith(top) or n.startswith("multi_modal_projector.")]


def _bottleneck_bundle(base: Path, out: Path, name: str, seed: int) -> Path:
    """Bottleneck adapters (relu, on every ``o_proj``) with non-zero ``up``: what ``deltaserve tune`` writes."""
    import torch

    from deltaserve.plugins.base_spec import BaseSpec
    from deltaserve.plugins.bottleneck import BottleneckAdapter, write_bottleneck_bundle
    from deltaserve.plugins.manifest import MethodInfo, TaskInfo

    spec = BaseSpec.from_dir(base)
    gen = torch.Generator().manual_seed(seed)
    adapters = {}
    for name_ in spec.params:
        if name_.endswith("self_attn.o_proj.weight"):
            dim = spec.params[name_][0][0]
            adapter = BottleneckAdapter(dim, 16, "relu", scaling=1.0)
            for p in (adapter.down.weight, adapter.up.weight):
                torch.nn.init.normal_(p, std=0.2, generator=gen)
            adapters[name_.removesuffix(".weight")] = adapter
    return write_bottleneck_bundle(
        out, name=name, base=spec, adapters=adapters, task=TaskInfo(f"bench {name}"), method=MethodInfo("bench", {})
    )


class Bench:
    def __init__(self, engine, args):
        self.engine, self.args = engine, args
        self.prompts = [engine.tokenizer(_common.prompt_text(q)).input_ids for q in _common.PROMPTS]
        self.salt = 0
        self.tasks: dict[str, dict] = {"base": {}}
        """task → GenerationInput fields (lora=, delta_tag=, cache_salt=)."""

    async def stage(self, name: str, kind: str, bundle: Path, budget: int = BUDGET) -> dict:
        """Stage in the worker (the bundle's manifest is read beforehand, as the registry validates a
        LoRA bundle too before ``add_lora``; only the engine side is timed in 3.)."""
        config = _config(bundle)
        summary = await self.engine.worker_call("ds_stage", name, kind, str(bundle), config, budget)
        if summary["mode"] == "concurrent":
            self.tasks[name] = {"delta_tag": name, "cache_salt": name}
        else:
            self.tasks[name] = {"state": name, "cache_salt": name}
        return summary

    async def add_lora(self, name: str, bundle: Path, lora_id: int) -> None:
        from vllm.lora.request import LoRARequest

        request = LoRARequest(name, lora_id, str(bundle))
        await self.engine.add_lora(request)
        self.tasks[name] = {"lora": request}

    async def one(self, task: str, k: int, image, max_tokens: int, stamps: dict | None = None) -> list[int]:
        from deltaserve.server.engine import GenerationInput, Sampling

        fields = {f: v for f, v in self.tasks[task].items() if f != "state"}
        inp = GenerationInput(
            f"{task}-{time.monotonic_ns()}-{k}",
            self.prompts[k % len(self.prompts)],
            Sampling(max_tokens=max_tokens, temperature=0.0, ignore_eos=True),
            image=image,
            **fields,
        )
        started, tokens = time.perf_counter(), []
        async for chunk in self.engine.generate(inp):
            if stamps is not None and not tokens and chunk.token_ids:
                stamps["first"] = time.perf_counter() - started
            tokens += chunk.token_ids
        if stamps is not None:
            stamps["latency"] = time.perf_counter() - started
        return tokens

    async def load(self, jobs: list[str]) -> dict:
        """``jobs[k]``: the task of request k. Fresh images. Returns rates, latencies and the measured requests."""
        self.salt += 1
        images = [_common.image(k, self.salt) for k in range(len(jobs))]
        sem = asyncio.Semaphore(self.args.concurrency)
        stamps = [{} for _ in jobs]

        async def run(k: int):
            async with sem:
                return await self.one(jobs[k], k, images[k], self.args.max_tokens, stamps[k])

        started = time.perf_counter()
        outputs = await asyncio.gather(*(run(k) for k in range(len(jobs))))
        seconds = time.perf_counter() - started
        latencies = [s["latency"] for s in stamps]
        return {
            "requests_per_s": len(jobs) / seconds,
            "p50_latency_s": statistics.median(latencies),
            "measured": [(jobs[k], k, images[k], outputs[k]) for k in range(len(jobs))],
        }

    async def check(self, measured, reference_of: dict[str, str]) -> tuple[int, int]:
        """Serve every measured request again, untimed, through its reference task; count equal outputs."""
        sem = asyncio.Semaphore(self.args.concurrency)
        by_task: dict[str, list] = {}
        for task, k, image, tokens in measured:
            by_task.setdefault(reference_of.get(task, task), []).append((k, image, tokens))
        same = total = 0
        for ref_task, items in by_task.items():  # one task per batch: an exclusive state needs the engine alone
            state = self.tasks[ref_task].get("state")
            if state:
                await self.engine.worker_call("ds_activate", state)

            async def run(k, image, ref_task=ref_task):
                async with sem:
                    return await self.one(ref_task, k, image, self.args.max_tokens)

            refs = await asyncio.gather(*(run(k, image) for k, image, _ in items))
            if state:
                await self.engine.worker_call("ds_activate", "base")
            same += sum(ref == tokens for ref, (_, _, tokens) in zip(refs, items))
            total += len(items)
        return same, total


@functools.cache
def _config(bundle: Path) -> dict:
    from deltaserve.plugins.bundle import read_bundle

    return read_bundle(bundle).manifest.config


async def _engine(base: Path, extension: bool):
    from deltaserve.server.config import EngineConfig
    from deltaserve.server.engine import Engine

    return await Engine.start(
        EngineConfig(model=str(base), enable_lora=True, exclusive_deltas=extension, kv_cache_memory_bytes=256 << 20)
    )


def _close(engine) -> None:
    engine.shutdown()
    gc.collect()


async def main_async(args) -> dict:
    from deltaserve.tuning.synthetic import make_lora_bundle, make_sparse_bundle

    work = Path(tempfile.mkdtemp(prefix="ds-bench-mixed-"))
    base, base_kind = _common.pick_base(work)
    params = _sparse_params(base)
    sparse = [make_sparse_bundle(base, work / f"s{i}", f"s{i}", seed=100 + i, params=params) for i in range(22)]
    bottleneck = [_bottleneck_bundle(base, work / f"b{i}", f"b{i}", seed=200 + i) for i in range(2)]
    loras = [make_lora_bundle(base, work / f"l{i}", name=f"l{i}", seed=300 + i) for i in range(6)]
    result: dict = {"idle": {"with": [], "without": []}}
    n = args.requests

    for order, extension in enumerate((True, False, False, True, True, False)):
        engine = await _engine(base, extension)
        try:
            bench = Bench(engine, args)
            if extension:
                await bench.stage("idle-sparse", "sparse", sparse[21])  # installs the dispatchers and hooks
            await bench.load(["base"] * n)  # warm-up (oneDNN kernels for new shapes, allocator): discarded
            rates = [(await bench.load(["base"] * n))["requests_per_s"] for _ in range(args.rounds)]
            result["idle"]["with" if extension else "without"].append(statistics.median(rates))
            print(f"engine {order} extension={extension}: base {statistics.median(rates):.1f} req/s", flush=True)
            if order != 0:
                continue

            # 1. mixed vs base-only
            result["staged"] = {
                "sparse": await bench.stage("sparse", "sparse", sparse[0]),
                "bottleneck": await bench.stage("bottleneck", "bottleneck", bottleneck[0]),
            }
            await bench.add_lora("lora", loras[0], 1)
            await bench.stage("sparse-ref", "sparse", sparse[0], budget=0)  # exclusive copies: the references
            await bench.stage("bottleneck-ref", "bottleneck", bottleneck[0], budget=0)
            mix = ["base", "lora", "sparse", "bottleneck"]
            await bench.load([mix[k % 4] for k in range(n)])  # warm-up, discarded
            rounds, measured = [], []
            loads = {"base": ["base"], "mixed": mix, **{f"half {kind}": ["base", kind] for kind in mix[1:]}}
            for r in range(args.rounds):
                got = {}
                for which in list(loads) if r % 2 == 0 else list(loads)[::-1]:
                    got[which] = await bench.load([loads[which][k % len(loads[which])] for k in range(n)])
                    measured += got[which]["measured"] if which != "base" else []
                rounds.append(
                    {
                        "base_rps": got["base"]["requests_per_s"],
                        "mixed_rps": got["mixed"]["requests_per_s"],
                        "ratio": got["mixed"]["requests_per_s"] / got["base"]["requests_per_s"],
                        **{
                            f"{which} ratio": got[which]["requests_per_s"] / got["base"]["requests_per_s"]
                            for which in loads
                            if which.startswith("half")
                        },
                    }
                )
                print(f"round {r}: {rounds[-1]}", flush=True)
            same, total = await bench.check(measured, {"sparse": "sparse-ref", "bottleneck": "bottleneck-ref"})
            distinct = len({tuple(t) for _, _, _, t in measured})
            result["mixed"] = {"rounds": rounds, "outputs_equal": same, "outputs_checked": total, "distinct": distinct}
            print(f"mixed outputs equal to their references: {same}/{total}", flush=True)

            # 2. 16 sparse deltas vs one
            many = [f"m{i}" for i in range(16)]
            for i, name in enumerate(many):
                await bench.stage(name, "sparse", sparse[1 + i])
            lat = []
            for r in range(args.rounds):
                got = {}
                for which in ("one", "sixteen") if r % 2 == 0 else ("sixteen", "one"):
                    jobs = [many[0]] * n if which == "one" else [many[k % 16] for k in range(n)]
                    got[which] = (await bench.load(jobs))["p50_latency_s"]
                lat.append({**got, "ratio": got["sixteen"] / got["one"]})
                print(f"latency round {r}: {lat[-1]}", flush=True)
            result["sixteen"] = lat

            # 3. register → first token
            firsts: dict[str, list[float]] = {"sparse": [], "lora": []}
            for bundle in sparse[17:21]:
                _config(bundle)  # read ahead, untimed
            for i in range(5):
                for kind in ("sparse", "lora"):
                    name = f"fresh-{kind}-{i}"
                    started = time.perf_counter()
                    if kind == "sparse":
                        await bench.stage(name, "sparse", sparse[17 + i % 4])
                    else:
                        await bench.add_lora(name, loras[1 + i % 5], 10 + i)
                    stamps: dict = {}
                    await bench.one(name, i, _common.image(i, 9000 + i), 1, stamps)
                    firsts[kind].append(time.perf_counter() - started)
            result["register_first_token_s"] = {k: statistics.median(v) for k, v in firsts.items()}
            result["register_first_token_runs"] = firsts
        finally:
            _close(engine)
            del engine
            gc.collect()

    facts = _common.machine_facts()
    result.update(
        command="python bench/mixed.py " + " ".join(sys.argv[1:]),
        machine=f"{facts['cpu_model']}, {facts['nproc']} cores, torch {facts['torch']}, vllm {facts['vllm']}",
        base=base_kind,
        workload={
            "requests": args.requests,
            "concurrency": args.concurrency,
            "max_tokens": args.max_tokens,
            "rounds": args.rounds,
        },
    )
    result["idle"]["ratio"] = statistics.median(result["idle"]["with"]) / statistics.median(result["idle"]["without"])
    return result


def _spread(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} ({min(values):.3f}–{max(values):.3f})"


def _list(values) -> str:
    return ", ".join(f"{v:.1f}" for v in values)


def _markdown(r: dict) -> str:
    mixed, staged = r["mixed"], r["staged"]
    rounds = mixed["rounds"]
    first = r["register_first_token_s"]
    return "\n".join(
        [
            "# Plan deltas in the shared batch: what mixed traffic costs",
            "",
            f"Reproduce: `{r['command']}` — {r['machine']}, base: {r['base']}.",
            f"Workload: {r['workload']['requests']} image+text requests per measurement, concurrency "
            f"{r['workload']['concurrency']}, exactly {r['workload']['max_tokens']} tokens each (greedy, ignore_eos), "
            f"fresh images per measurement; {r['workload']['rounds']} paired rounds, order alternating.",
            "",
            "| measure | median (min–max over rounds) | target |",
            "|---|---:|---:|",
            f"| mixed (¼ base, ¼ LoRA, ¼ sparse, ¼ bottleneck) ÷ base-only, requests/s | **{_spread([x['ratio'] for x in rounds])}** | ≥ 0.85 |",
            *(
                f"| {which.removesuffix(' ratio')} (½ base) ÷ base-only, requests/s | {_spread([x[which] for x in rounds])} | |"
                for which in rounds[0]
                if which.startswith("half")
            ),
            f"| p50 latency, requests over 16 sparse deltas ÷ all to one | {_spread([x['ratio'] for x in r['sixteen']])} | ≤ 1.2 |",
            f"| register → first token, sparse ÷ LoRA (medians {first['sparse'] * 1e3:.0f} / {first['lora'] * 1e3:.0f} ms) | {first['sparse'] / first['lora']:.2f} | ≤ 2 |",
            f"| idle cost: base-only with the machinery loaded ÷ without the extension | {r['idle']['ratio']:.3f} | ≥ 0.95 |",
            "",
            f"Base-only requests/s per round: {_list(x['base_rps'] for x in rounds)}; "
            f"mixed: {_list(x['mixed_rps'] for x in rounds)}. "
            f"Idle-cost engines (req/s): with {_list(r['idle']['with'])}; without {_list(r['idle']['without'])}.",
            "",
            f"Outputs: {mixed['outputs_equal']}/{mixed['outputs_checked']} measured requests with a delta equal to their "
            "reference (base and LoRA: served again in batches of their own task; sparse and bottleneck: served "
            f"again by an exclusive engine state of the same delta). {mixed['distinct']} distinct outputs.",
            "",
            "Resident memory per delta in the engine (updated weights of the layers it touches; adapters):",
            "",
            "| delta | layers changed | resident |",
            "|---|---:|---:|",
            *(f"| {k} | {len(v['layers'])} | {v['resident_bytes'] / 2**20:.2f} MiB |" for k, v in staged.items()),
            "",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=96)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("docs"))
    args = parser.parse_args()
    result = asyncio.run(main_async(args))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "mixed-bench.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "mixed-bench.md").write_text(_markdown(result))
    print(_markdown(result))


if __name__ == "__main__":
    main()
