"""Soak: minutes of mixed traffic over every delta kind while deltas come and go.

    .venv/bin/python bench/soak.py --minutes 10 --out docs

Starts ``deltaserve serve`` (child process) on the cached pretrained base, or a random-init tiny base,
registers one LoRA, one sparse and one bottleneck delta (synthetic, ``tuning/synthetic.py``) and records
each expert's greedy reference answer to a fixed set of image prompts while the server is quiet. Then, for
``--minutes``:

- ``--workers`` gRPC clients send requests to the base or a delta (greedy, 8 tokens) and compare every
  answer with its expert's reference (a wrong output is any difference);
- one in ``--abandon-every`` requests is a stream the client drops after its first token;
- one in ``--bad-every`` is a bad request (temperature -1) that must be refused with INVALID_ARGUMENT;
- a churn thread every ``--churn-s`` seconds unregisters one delta and registers it again (same bundle:
  same reference).

Reports requests, failures by cause (NOT_FOUND for a delta between its unregistration and re-registration
is the documented outcome, everything else is a failure), wrong outputs, latency percentiles, the RSS of the
server and each of its child processes at start and end, and the sizes of the store and its staging folder.
Targets: 0 wrong outputs, 0 failures besides the documented NOT_FOUND, memory flat.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import PROMPTS, image, machine_facts, percentile, pick_base, png_bytes  # noqa: E402

MAX_TOKENS = 8


def tree_rss(pid: int) -> dict[str, float]:
    """RSS in MiB of the process and each descendant, keyed by ``pid:name``."""
    import psutil

    out = {}
    proc = psutil.Process(pid)
    for p in [proc, *proc.children(recursive=True)]:
        try:
            out[f"{p.pid}:{p.name()}"] = round(p.memory_info().rss / 2**20, 1)
        except psutil.NoSuchProcess:
            pass
    return out


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--churn-s", type=float, default=3.0)
    ap.add_argument("--abandon-every", type=int, default=10)
    ap.add_argument("--bad-every", type=int, default=20)
    ap.add_argument("--out", type=Path, default=None, help="write soak.md and soak.json here")
    args = ap.parse_args()

    import grpc

    from deltaserve.client.common import DeltaClientError
    from deltaserve.client.process import ServerProcess
    from deltaserve.client.sync import DeltaClient
    from deltaserve.tuning.synthetic import make_bottleneck_bundle, make_lora_bundle, make_sparse_bundle

    work = Path(tempfile.mkdtemp(prefix="deltaserve-soak-"))
    base, base_note = pick_base(work)
    facts = machine_facts()
    bundles = {
        "soak-lora": make_lora_bundle(base, work / "lora", "soak-lora", seed=1),
        "soak-sparse": make_sparse_bundle(base, work / "sparse", "soak-sparse", seed=2),
        "soak-bottleneck": make_bottleneck_bundle(base, work / "bottleneck", "soak-bottleneck", seed=3),
    }
    store = work / "store"
    srv = ServerProcess(base, store, "--kv-cache-memory-bytes", str(512 << 20), admin_token="t")
    images = [png_bytes(image(i, salt=7)) for i in range(6)]
    cases = [(q, img) for q in PROMPTS[:2] for img in images]  # 12 (prompt, image) pairs
    stop = threading.Event()
    lock = threading.Lock()
    counts: Counter = Counter()
    latencies: list[float] = []
    wrong: list[str] = []
    try:
        with DeltaClient(srv.grpc, admin_token="t") as c:
            for path in bundles.values():
                c.register(path)
            experts = [srv.base_name, *bundles]
            reference = {
                (e, k): c.generate(q, image=img, task=e, max_tokens=MAX_TOKENS, temperature=0).token_ids
                for e in experts
                for k, (q, img) in enumerate(cases)
            }
            distinct = len({tuple(v) for v in reference.values()})
            rss_start = tree_rss(srv.pid)

            def worker(seed: int) -> None:
                rng = random.Random(seed)
                n = 0
                with DeltaClient(srv.grpc, timeout=120) as wc:
                    while not stop.is_set():
                        n += 1
                        expert, k = rng.choice(experts), rng.randrange(len(cases))
                        q, img = cases[k]
                        t = time.perf_counter()
                        try:
                            if n % args.bad_every == 0:
                                try:
                                    wc.generate(q, image=img, task=expert, max_tokens=MAX_TOKENS, temperature=-1)
                                    outcome = "bad request accepted"
                                except DeltaClientError as exc:
                                    ok = exc.code == grpc.StatusCode.INVALID_ARGUMENT
                                    outcome = "bad request refused" if ok else f"bad request: {exc.code.name}"
                            elif n % args.abandon_every == 0:
                                for chunk in wc.generate_stream(q, image=img, task=expert, max_tokens=64):
                                    if chunk.token_ids:
                                        break
                                outcome = "abandoned stream"
                            else:
                                got = wc.generate(q, image=img, task=expert, max_tokens=MAX_TOKENS, temperature=0)
                                if got.token_ids != reference[expert, k]:
                                    outcome = "wrong output"
                                    with lock:
                                        wrong.append(f"{expert} case {k}: {got.token_ids} != {reference[expert, k]}")
                                else:
                                    outcome = "ok"
                                    with lock:
                                        latencies.append(time.perf_counter() - t)
                        except DeltaClientError as exc:
                            documented = exc.code == grpc.StatusCode.NOT_FOUND and expert != srv.base_name
                            outcome = "NOT_FOUND (delta unregistered)" if documented else f"failure: {exc.code.name}"
                        with lock:
                            counts[outcome] += 1

            def churn() -> None:
                rng = random.Random(0)
                while not stop.wait(args.churn_s):
                    name = rng.choice(list(bundles))
                    try:
                        c.unregister(name)
                        with lock:
                            counts["unregistrations"] += 1
                        c.register(bundles[name])
                        with lock:
                            counts["registrations"] += 1
                    except DeltaClientError as exc:
                        counts[f"churn failure: {exc.code.name}"] += 1

            threads = [threading.Thread(target=worker, args=(i,)) for i in range(args.workers)]
            threads.append(threading.Thread(target=churn))
            t0 = time.perf_counter()
            for th in threads:
                th.start()
            rss_series = [(0.0, rss_start)]  # a leak grows steadily; a warm-up levels off
            while (left := args.minutes * 60 - (time.perf_counter() - t0)) > 0:
                time.sleep(min(60.0, left))
                rss_series.append((round(time.perf_counter() - t0), tree_rss(srv.pid)))
            stop.set()
            for th in threads:
                th.join()
            elapsed = time.perf_counter() - t0
            for name, path in bundles.items():  # every delta back before the end figures
                if name not in {d.name for d in c.list().deltas}:
                    c.register(path)
            rss_end = tree_rss(srv.pid)
    finally:
        srv.stop()
    failure_kinds = ("failure", "bad request:", "bad request accepted", "churn failure")
    failures = {k: v for k, v in counts.items() if k.startswith(failure_kinds)}
    result = {
        "command": " ".join(["bench/soak.py", *sys.argv[1:]]),
        "base": base_note,
        "machine": facts,
        "seconds": round(elapsed, 1),
        "workers": args.workers,
        "counts": dict(counts),
        "failures": failures,
        "wrong_outputs": len(wrong),
        "wrong_examples": wrong[:10],
        "distinct_references": distinct,
        "references": len(reference),
        "latency_ms": {f"p{q}": round(1e3 * percentile(latencies, q), 1) for q in (50, 90, 99)} if latencies else {},
        "rss_mib_start": rss_start,
        "rss_mib_end": rss_end,
        "rss_mib_during": [{"s": t, **rss} for t, rss in rss_series],
        "store_bytes": dir_bytes(store / "deltas"),
        "staging_entries": len(list((store / "staging").iterdir())),
        "loadavg_at_end": [round(x, 2) for x in os.getloadavg()],
    }
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "soak.json").write_text(json.dumps(result, indent=2) + "\n")
        (args.out / "soak.md").write_text(report(result))


def report(r: dict) -> str:
    rows = "\n".join(f"| {k} | {v} |" for k, v in sorted(r["counts"].items()))
    starts, ends = r["rss_mib_start"], r["rss_mib_end"]
    rss = "\n".join(f"| {p} | {starts[p]} | {ends.get(p, 'gone')} |" for p in starts)
    rss += "".join(f"\n| {p} (new) | — | {ends[p]} |" for p in ends if p not in starts)
    procs = list(starts)
    during = "\n".join(
        f"| {row['s']} | " + " | ".join(str(row.get(p, "gone")) for p in procs) + " |" for row in r["rss_mib_during"]
    )
    lat = r["latency_ms"]
    return f"""# Soak

Generated by `.venv/bin/python {r["command"]}`; raw: [soak.json](soak.json). Base: {r["base"]}.
{r["machine"]["nproc"]} CPUs ({r["machine"]["cpu_model"]}), load average at start {r["machine"]["loadavg_at_start"]},
at end {r["loadavg_at_end"]}. {r["seconds"]} s, {r["workers"]} gRPC clients, base + one LoRA, one sparse and one
bottleneck delta; one delta unregistered and registered again every few seconds.

## Outcomes

| outcome | count |
|---|---:|
{rows}

- **wrong outputs: {r["wrong_outputs"]}** (every completed answer compared with its expert's greedy reference;
  {r["distinct_references"]} distinct references over {r["references"]} expert × prompt pairs)
- **failures besides the documented NOT_FOUND: {sum(r["failures"].values())}** {r["failures"] or ""}
- latency of correct answers ({MAX_TOKENS} tokens): p50 {lat.get("p50")} ms, p90 {lat.get("p90")} ms, p99 {lat.get("p99")} ms
- store after the run: {r["store_bytes"]} bytes in `deltas/`, {r["staging_entries"]} entries left in `staging/`

## Memory (RSS, MiB)

| process | start | end |
|---|---:|---:|
{rss}

During the run (every minute, under load; the end figures above are taken after the load stopped):

| s | {" | ".join(procs)} |
|---:|{"---:|" * len(procs)}
{during}
"""


if __name__ == "__main__":
    main()
