"""Engine replicas on Ray Serve: throughput of 1 vs N replicas and the delta-affinity hit rate.

    .venv/bin/python bench/replicas.py [--replicas 0,1,2] [--deltas 4] [--requests 96] [--concurrency 16]
                                       [--max-tokens 32] [--rounds 1] [--out docs/replicas-bench.md]

For each replica count: ``deltaserve serve --replicas N`` (``0``: the single-process server, no Ray — the
reference for what the Ray Serve hop costs) as a child process (Ray Serve: one ingress, N vLLM
engines, each with LoRA on, ``max_num_seqs`` 64, KV cache 128 MiB, pinned to its own cores), ``--deltas``
LoRA deltas registered once through the ingress, a warm-up (every delta and the base, twice), then a closed loop
of ``--requests`` requests with ``--concurrency`` in flight over HTTP (``/v1/completions``, a 32×32 PNG and a
question each, greedy, at most ``--max-tokens`` tokens): every other request names the base, the others cycle
over the deltas. Each request has its own image (no prefix- or encoder-cache hits across measurements).

Every measured request's tokens are checked against one single-process server (started after the runs,
untimed, same engine flags) answering the same requests. Reported per replica count: requests/s and generated
tokens/s (the tokens actually returned: EOS may end a request early), latency p50/p95, how the requests spread
over the replicas, the delta loads, and the affinity
hit rate: the share of delta requests (warm-up included) that met a replica already holding their delta (each
response names its replica and whether it held the delta, ``routing.replica``). Replica counts run one after the
other, never at the same time; with ``--rounds 2`` the second round runs them in reverse order.

Writes ``--out`` (Markdown) and the same name with ``.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import PROMPTS, image, machine_facts, percentile, pick_base, png_bytes, prompt_text  # noqa: E402

ADMIN = "bench-admin"


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(
        url, json.dumps(body).encode(), {"content-type": "application/json", "authorization": f"Bearer {ADMIN}"}
    )
    with urllib.request.urlopen(req, timeout=300) as resp:
        return json.loads(resp.read())


async def _drive(http: str, jobs: list[tuple[str, int, int]], concurrency: int, max_tokens: int) -> list[dict]:
    """``jobs``: (model, question index, image salt). Closed loop; one record per request."""
    import httpx

    records: list[dict] = []
    queue = list(reversed(jobs))
    async with httpx.AsyncClient(
        base_url=http, timeout=600, limits=httpx.Limits(max_connections=concurrency)
    ) as client:

        async def worker():
            while queue:
                model, q, salt = queue.pop()
                body = {
                    "model": model,
                    "prompt": prompt_text(PROMPTS[q % len(PROMPTS)]),
                    "image": base64.b64encode(png_bytes(image(q, salt))).decode(),
                    "max_tokens": max_tokens,
                    "temperature": 0,
                    "return_token_ids": True,
                }
                started = time.perf_counter()
                resp = await client.post("/v1/completions", json=body)
                resp.raise_for_status()
                out = resp.json()
                replica = out["routing"].get("replica") or {"replica": "single", "held": None}
                records.append(
                    {
                        "model": model,
                        "job": (model, q, salt),
                        "token_ids": out["choices"][0]["token_ids"],
                        "latency_s": time.perf_counter() - started,
                        "tokens": out["usage"]["completion_tokens"],
                        "replica": replica["replica"],
                        "held": replica["held"],
                    }
                )

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return records


def measure(base: Path, base_name: str, bundles: list[Path], replicas: int, args, salt: int) -> dict:
    from deltaserve.client.process import ServerProcess

    import os

    load_before = round(os.getloadavg()[0], 2)  # other work on the machine (the 1-minute load average)
    store = Path(tempfile.mkdtemp(prefix=f"replicas-{replicas}-")) / "store"
    started = time.perf_counter()
    srv = ServerProcess(
        base, store, "--replicas", str(replicas), "--kv-cache-memory-bytes", str(128 << 20), admin_token=ADMIN
    )
    ready_s = time.perf_counter() - started
    try:
        names = [_post(f"{srv.http}/v1/deltas", {"path": str(b)})["name"] for b in bundles]
        experts = [base_name, *names]
        warm = [(m, q, salt) for m in experts for q in range(2)]
        warm_records = asyncio.run(_drive(srv.http, warm, args.concurrency, args.max_tokens))
        jobs = [
            (base_name if i % 2 == 0 else names[(i // 2) % len(names)], i, salt + 1 + i) for i in range(args.requests)
        ]
        t0 = time.perf_counter()
        records = asyncio.run(_drive(srv.http, jobs, args.concurrency, args.max_tokens))
        elapsed = time.perf_counter() - t0
        with urllib.request.urlopen(f"{srv.http}/v1/engine", timeout=30) as resp:
            statuses = json.loads(resp.read()).get("replicas", [])  # none: the single-process server
    finally:
        srv.stop()
    warm_deltas = [r for r in warm_records if r["model"] != base_name]
    delta_records = [r for r in records if r["model"] != base_name]
    latencies = [r["latency_s"] for r in records]
    per_replica: dict[str, int] = {}
    for r in records:
        per_replica[r["replica"]] = per_replica.get(r["replica"], 0) + 1
    return {
        "_outputs": {r["job"]: r["token_ids"] for r in records},  # checked against the reference, not written out
        "replicas": replicas,
        "loadavg_1min_before": load_before,
        "ready_s": round(ready_s, 1),
        "requests": len(records),
        "elapsed_s": round(elapsed, 2),
        "requests_per_s": round(len(records) / elapsed, 2),
        "tokens_per_s": round(sum(r["tokens"] for r in records) / elapsed, 1),
        "latency_p50_s": round(percentile(latencies, 50), 3),
        "latency_p95_s": round(percentile(latencies, 95), 3),
        "requests_per_replica": sorted(per_replica.values(), reverse=True),
        "warmup_delta_requests": len(warm_deltas),
        "warmup_affinity_hits": sum(bool(r["held"]) for r in warm_deltas) if replicas else None,
        "delta_requests": len(delta_records),
        "affinity_hits": sum(bool(r["held"]) for r in delta_records) if replicas else None,
        "affinity_hit_rate": round(sum(bool(r["held"]) for r in delta_records) / len(delta_records), 3)
        if replicas
        else None,
        "delta_loads": sum(s["loads"] for s in statuses) if replicas else None,
        "deltas_held_per_replica": sorted((len(s["held"]) for s in statuses), reverse=True) if replicas else None,
    }


def reference_outputs(base: Path, bundles: list[Path], jobs: list[tuple[str, int, int]], args) -> dict:
    """What one single-process server (no Ray) answers to ``jobs``, untimed: the outputs every measured
    request must equal (greedy, same engine flags)."""
    from deltaserve.client.process import ServerProcess

    store = Path(tempfile.mkdtemp(prefix="replicas-reference-")) / "store"
    srv = ServerProcess(base, store, "--kv-cache-memory-bytes", str(128 << 20), admin_token=ADMIN)
    try:
        for b in bundles:
            _post(f"{srv.http}/v1/deltas", {"path": str(b)})
        records = asyncio.run(_drive(srv.http, jobs, args.concurrency, args.max_tokens))
    finally:
        srv.stop()
    return {r["job"]: r["token_ids"] for r in records}


def check_outputs(runs: list[dict], reference: dict) -> None:
    """Per run: how many measured requests answered exactly the reference's tokens (``outputs_identical``)."""
    for run in runs:
        outputs = run.pop("_outputs")
        differing = [list(job) for job, ids in outputs.items() if ids != reference[job]]
        run["outputs_identical"] = f"{len(outputs) - len(differing)}/{len(outputs)}"
        run["outputs_differing"] = differing[:10]  # (model, question, image salt) of the first ones


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--replicas",
        default="0,1,2",
        help="Replica counts to compare, comma-separated (0: the single-process server, no Ray).",
    )
    parser.add_argument("--deltas", type=int, default=4)
    parser.add_argument("--requests", type=int, default=96)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("docs/replicas-bench.md"))
    args = parser.parse_args()
    counts = [int(c) for c in args.replicas.split(",")]

    from deltaserve.tuning.synthetic import make_lora_bundle

    work = Path(tempfile.mkdtemp(prefix="bench-replicas-"))
    base, base_desc = pick_base(work)
    bundles = [make_lora_bundle(base, work / f"d{i}", name=f"delta-{i}", seed=100 + i) for i in range(args.deltas)]
    runs = []
    for r in range(args.rounds):
        for n in counts if r % 2 == 0 else list(reversed(counts)):
            result = measure(base, base.name, bundles, n, args, salt=1000 * (len(runs) + 1))
            result["round"] = r
            print(json.dumps({k: v for k, v in result.items() if k != "_outputs"}), flush=True)
            runs.append(result)
    jobs = sorted({job for run in runs for job in run["_outputs"]})
    check_outputs(runs, reference_outputs(base, bundles, jobs, args))
    print("outputs equal to the single-server reference:", [run["outputs_identical"] for run in runs], flush=True)
    summary = {}
    for n in counts:
        mine = [x for x in runs if x["replicas"] == n]
        summary[n] = {
            k: statistics.median(x[k] for x in mine)
            for k in ("requests_per_s", "tokens_per_s", "latency_p50_s", "latency_p95_s")
        }
    command = "python bench/replicas.py " + " ".join(sys.argv[1:])
    data = {"command": command.strip(), "base": base_desc, "machine": machine_facts(), "runs": runs}
    data["args"] = {**vars(args), "out": str(args.out)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(data, indent=2, default=str) + "\n")
    args.out.write_text(_markdown(data, summary, counts))
    print(f"wrote {args.out} and {args.out.with_suffix('.json')}")


def _markdown(data: dict, summary: dict, counts: list[int]) -> str:
    a = data["args"]
    lines = [
        "# Engine replicas on Ray Serve: 1 vs N replicas, delta affinity",
        "",
        f"Command: `.venv/bin/{data['command']}` (raw figures: `{Path(a['out']).with_suffix('.json').name}`).",
        "",
        f"Base: {data['base']}. Machine: {data['machine']['cpu_model']}, {data['machine']['nproc']} cores, "
        f"load average {data['machine']['loadavg_at_start']} at the start. "
        f"Workload: {a['requests']} requests, {a['concurrency']} in flight, "
        f"half to the base, half cycling over {a['deltas']} LoRA deltas; 32×32 image + question, greedy, "
        f"≤ {a['max_tokens']} tokens; {a['rounds']} round(s).",
        "",
        "| replicas | load avg before | ready (s) | requests/s | tokens/s | p50 latency (s) | p95 latency (s) "
        "| requests per replica | delta loads | deltas held per replica | affinity hits, warm-up "
        "| affinity hit rate, measured | outputs = reference |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in data["runs"]:
        lines.append(
            f"| {run['replicas']} | {run['loadavg_1min_before']} | {run['ready_s']} | {run['requests_per_s']} "
            f"| {run['tokens_per_s']} | {run['latency_p50_s']} | {run['latency_p95_s']} "
            f"| {run['requests_per_replica']} | "
            + (
                f"{run['delta_loads']} | {run['deltas_held_per_replica']} "
                f"| {run['warmup_affinity_hits']}/{run['warmup_delta_requests']} "
                f"| {run['affinity_hits']}/{run['delta_requests']} ({run['affinity_hit_rate']:.2f}) |"
                if run["replicas"]
                else "— | — | — | — (one engine holds every delta) |"
            )
            + f" {run['outputs_identical']} |"
        )
    lines += [
        "",
        "Replicas `0`: the single-process server (no Ray). Affinity hit: a delta request that met a replica already "
        "holding its delta (`routing.replica.held`). The warm-up sends each delta's first two requests at once, "
        "so both find it not yet loaded (and, with 2 replicas, the second may go to the other replica before Ray "
        "Serve's router has heard which replica holds it); the measured phase comes after. Outputs = reference: measured "
        "requests whose greedy tokens equal those of one single-process server started after the runs (untimed) "
        "for the same model, question and image.",
    ]
    if data["args"]["rounds"] > 1:
        lines += [
            "",
            "Median over rounds:",
            "",
            "| replicas | requests/s | tokens/s | p50 latency (s) | p95 latency (s) |",
        ]
        lines.append("|---|---|---|---|---|")
        for n in counts:
            m = summary[n]
            lines.append(
                f"| {n} | {m['requests_per_s']:.2f} | {m['tokens_per_s']:.0f} | {m['latency_p50_s']:.2f} "
                f"| {m['latency_p95_s']:.2f} |"
            )
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
