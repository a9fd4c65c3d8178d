"""The monitoring dashboard's main panels, drawn from a short bench run: what a newcomer sees in Grafana.

    .venv/bin/python bench/dashboard.py --seconds 90 --out docs

Starts ``deltaserve serve`` (child process) on the cached pretrained base, or a random-init tiny base
(``bench/_common.pick_base``), registers three synthetic deltas (``tuning/synthetic.py``) whose manifests carry
example prompts, so the ``auto`` router has tasks to route to:

- ``pirate`` — LoRA, examples "Translate to pirate speak: …";
- ``sql`` — sparse (no LM-head coordinates: served in the shared batch), examples "Write a SQL query …";
- ``recipe`` — bottleneck adapter, examples "Give me a recipe for …".

Then ``--workers`` HTTP clients (``POST /v1/chat/completions``, ``stream: true``, greedy, ``--max-tokens``) drive
traffic in three phases of ``--seconds / 3`` each:

1. ``base`` — every request names the base model (image + question);
2. ``explicit`` — every request names one of base / pirate / sql / recipe in turn (image + question);
3. ``auto`` — ``model: "auto"``, text in the tasks' own words (paraphrases, none of them a manifest example)
   and general questions (open world), so the router decides and the routing shares move.

Every answer must be HTTP 200 with a complete stream (``[DONE]``); failures are counted and printed.
Meanwhile ``GET /metrics`` is scraped every ``--scrape-s`` seconds (``prometheus_client``'s text parser) and the
dashboard's quantities (``deploy/grafana/deltaserve-dashboard.json`` over ``deploy/prometheus/deltaserve-rules.yml``)
are computed from the scraped counters and histograms exactly as the PromQL does, with a ``--window`` (default
10 s) instead of the rules' 1 m / 5 m, since the whole run is shorter than 5 m:

- requests/s by task: ``sum by (task) (rate(deltaserve_requests_total{outcome="ok"}[w]))``;
- generated tokens/s by task: ``sum by (task) (rate(deltaserve_generated_tokens_total[w]))``;
- TTFT p50/p95 by task: ``histogram_quantile(q, sum by (task, le) (rate(deltaserve_time_to_first_token_seconds_bucket[w])))``;
- routing share by expert: ``sum by (expert) (rate(deltaserve_routing_decisions_total[w])) / sum(rate(…[w]))``.

``rate`` here is (last − first sample in the window) / their time apart — Prometheus's ``rate`` without its
extrapolation to the window's edges; a series not yet exposed counts as 0 (a labelled counter appears on its first
increment). ``histogram_quantile`` is Prometheus's: linear interpolation inside the bucket holding the rank, the
lowest bucket's lower bound 0, the upper bound of the highest finite bucket when the rank falls in ``+Inf``.

Writes ``--out``/dashboard.png (4 panels), dashboard.json (raw scraped series and the computed ones) and
dashboard.md. ``--redraw docs/dashboard.json`` draws the PNG and the .md again from a run's JSON (no server).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import random
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import PROMPTS, image, machine_facts, pick_base, png_bytes  # noqa: E402

TASK_EXAMPLES = {
    "pirate": [
        "Translate to pirate speak: hello there",
        "Translate to pirate speak: where is the ship",
        "Translate to pirate speak: good day to you",
        "Translate to pirate speak: I lost my treasure",
        "Translate to pirate speak: the captain is angry",
        "Say it like a pirate: we sail at dawn",
        "Say it like a pirate: bring me the map",
        "How would a pirate say: thank you my friend",
    ],
    "sql": [
        "Write a SQL query that lists all customers from Paris",
        "Write a SQL query counting orders per month",
        "Write a SQL query to find the ten most expensive products",
        "SQL: select the names of employees hired after 2020",
        "SQL: delete duplicate rows from the users table",
        "Give me the SQL to join orders with customers",
        "Which SQL query returns the average salary by department",
        "Write a SQL statement that updates the price of product 42",
    ],
    "recipe": [
        "Give me a recipe for pancakes",
        "Give me a recipe for tomato soup",
        "How do I cook a risotto with mushrooms",
        "Recipe for a chocolate cake without eggs",
        "What do I need to bake bread at home",
        "Give me a quick recipe for a vegetable curry",
        "How do I make fresh pasta dough",
        "A simple recipe for lemon cookies please",
    ],
}
# Auto phase: the tasks in their own words (none is a manifest example) and open-world questions.
AUTO_PROMPTS = {
    "pirate": [
        "Translate to pirate speak: the weather is lovely today",
        "Translate to pirate speak: where did you hide the gold",
        "Say it like a pirate: please close the door",
        "How would a pirate say: I am hungry",
    ],
    "sql": [
        "Write a SQL query listing invoices above 100 euros",
        "SQL: count the users who signed up last week",
        "Write a SQL query that finds customers without orders",
        "Give me the SQL to rank products by sales",
    ],
    "recipe": [
        "Give me a recipe for apple pie",
        "How do I cook a spinach lasagna",
        "A quick recipe for banana bread please",
        "Give me a recipe for a lentil soup",
    ],
    "open world": [
        "What is the capital of Australia?",
        "Explain why the sky is blue.",
        "Who wrote Pride and Prejudice?",
        "How many legs does a spider have?",
    ],
}
AUTO_MIX = {"sql": 4, "pirate": 3, "recipe": 2, "open world": 2}  # weights of the auto phase's prompt groups
PHASES = ("base", "explicit", "auto")
KEPT_METRICS = (
    "deltaserve_requests",
    "deltaserve_generated_tokens",
    "deltaserve_time_to_first_token_seconds",
    "deltaserve_routing_decisions",
    "deltaserve_inflight_requests",
    "deltaserve_registered_deltas",
)


# ---- scraping and the PromQL functions ---------------------------------------------------------------------


def scrape(http, url: str) -> dict[str, float]:
    """One ``/metrics`` scrape: ``{'name{k="v",…}': value}`` for the deltaserve series the panels use."""
    from prometheus_client.parser import text_string_to_metric_families

    r = http.get(url + "/metrics")
    r.raise_for_status()
    out = {}
    for family in text_string_to_metric_families(r.text):
        if family.name not in KEPT_METRICS:
            continue
        for s in family.samples:
            if s.name.endswith(("_created", "_sum")):
                continue
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}"] = s.value
    return out


def parse_key(key: str) -> tuple[str, dict[str, str]]:
    name, _, rest = key.partition("{")
    labels = {}
    for part in rest.rstrip("}").split('",'):
        if part:
            k, _, v = part.partition('="')
            labels[k] = v.rstrip('"')
    return name, labels


def rate(scrapes: list[dict], i: int, window: float) -> dict[str, float]:
    """``rate(x[window])`` at scrape ``i`` for every counter series: (value now − value at the oldest scrape in
    the window) / time between them; a series missing from the older scrape counts as 0."""
    t = scrapes[i]["t"]
    j = i
    while j > 0 and t - scrapes[j - 1]["t"] <= window + 1e-6:
        j -= 1
    if j == i:
        return {}
    dt = t - scrapes[j]["t"]
    now, then = scrapes[i]["samples"], scrapes[j]["samples"]
    return {k: max(0.0, v - then.get(k, 0.0)) / dt for k, v in now.items()}


def sum_by(rates: dict[str, float], metric: str, by: tuple[str, ...], where: dict | None = None) -> dict:
    out: dict = defaultdict(float)
    for key, v in rates.items():
        name, labels = parse_key(key)
        if name != metric or any(labels.get(k) != w for k, w in (where or {}).items()):
            continue
        out[tuple(labels[b] for b in by)] += v
    return dict(out)


def histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> float:
    """Prometheus's ``histogram_quantile`` over ``(le, cumulative rate)`` pairs (``+Inf`` included)."""
    buckets = sorted(buckets)
    if len(buckets) < 2 or not math.isinf(buckets[-1][0]):
        return math.nan
    total = buckets[-1][1]
    if total <= 0:
        return math.nan
    rank = q * total
    for n, (le, count) in enumerate(buckets):
        if count >= rank:
            break
    if math.isinf(le):
        return buckets[-2][0]
    lower, below = (0.0, 0.0) if n == 0 else buckets[n - 1]
    if n == 0 and le <= 0:
        return le
    return lower + (le - lower) * (rank - below) / (count - below)


def panels(scrapes: list[dict], window: float) -> dict:
    """The four panels' series, one point per scrape (the first ``window`` seconds have fewer samples behind)."""
    out: dict = {
        "t": [],
        "requests_per_s": defaultdict(list),
        "tokens_per_s": defaultdict(list),
        "ttft_p50_s": defaultdict(list),
        "ttft_p95_s": defaultdict(list),
        "routing_share": defaultdict(list),
    }
    tasks: set[str] = set()
    experts: set[str] = set()
    for s in scrapes:
        for key in s["samples"]:
            name, labels = parse_key(key)
            if name in ("deltaserve_requests_total", "deltaserve_generated_tokens_total"):
                tasks.add(labels["task"])
            if name == "deltaserve_routing_decisions_total":
                experts.add(labels["expert"])
    for i in range(1, len(scrapes)):
        r = rate(scrapes, i, window)
        if not r:
            continue
        out["t"].append(round(scrapes[i]["t"], 2))
        req = sum_by(r, "deltaserve_requests_total", ("task",), {"outcome": "ok"})
        tok = sum_by(r, "deltaserve_generated_tokens_total", ("task",))
        buckets = sum_by(r, "deltaserve_time_to_first_token_seconds_bucket", ("task", "le"))
        routing = sum_by(r, "deltaserve_routing_decisions_total", ("expert",))
        routed = sum(routing.values())
        for task in sorted(tasks):
            out["requests_per_s"][task].append(req.get((task,), 0.0))
            out["tokens_per_s"][task].append(tok.get((task,), 0.0))
            per_task = [(float(le), v) for (t, le), v in buckets.items() if t == task]
            out["ttft_p50_s"][task].append(histogram_quantile(0.5, per_task))
            out["ttft_p95_s"][task].append(histogram_quantile(0.95, per_task))
        for expert in sorted(experts):
            out["routing_share"][expert].append(routing.get((expert,), 0.0) / routed if routed else math.nan)
    return {k: (dict(v) if isinstance(v, defaultdict) else v) for k, v in out.items()}


# ---- traffic --------------------------------------------------------------------------------------------------


def chat_body(model: str, question: str, png: bytes | None, max_tokens: int) -> dict:
    import base64

    content: list[dict] = []
    if png is not None:
        content.append(
            {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(png).decode()}}
        )
    content.append({"type": "text", "text": question})
    return {
        "model": model,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "stream": True,
    }


def streamed_chat(http, body: dict) -> tuple[str | None, str | None]:
    """(expert that served, None) on a 200 with a complete stream; (None, why) otherwise."""
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            return None, f"HTTP {r.status_code}: {r.read().decode(errors='replace')[:200]}"
        expert, done = None, False
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            data = line[len("data: ") :]
            if data == "[DONE]":
                done = True
                break
            event = json.loads(data)
            if "error" in event:
                return None, f"error event: {event['error']}"
            if "routing" in event:
                expert = event["routing"]["expert"] or event["model"]
        return (expert, None) if done else (None, "stream ended without [DONE]")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=90.0, help="traffic time, split into three equal phases")
    ap.add_argument("--workers", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--scrape-s", type=float, default=2.0)
    ap.add_argument("--window", type=float, default=10.0, help="rate window, seconds (the rules use 1 m / 5 m)")
    ap.add_argument("--out", type=Path, default=None, help="write dashboard.png, .json and .md here")
    ap.add_argument("--redraw", type=Path, default=None, help="redraw the PNG and .md from a dashboard.json; no run")
    args = ap.parse_args()
    if args.redraw:
        r = json.loads(args.redraw.read_text())
        r["panels"] = nan_back(r["panels"])
        render(r, args.redraw.with_suffix(".png"))
        args.redraw.with_suffix(".md").write_text(report(r))
        return

    import httpx

    from deltaserve.client.process import ServerProcess
    from deltaserve.client.sync import DeltaClient
    from deltaserve.tuning.synthetic import (
        SPARSE_PARAMS,
        make_bottleneck_bundle,
        make_lora_bundle,
        make_sparse_bundle,
    )

    work = Path(tempfile.mkdtemp(prefix="deltaserve-dashboard-"))
    base, base_note = pick_base(work)
    facts = machine_facts()
    ex = TASK_EXAMPLES
    bundles = {
        "pirate": make_lora_bundle(base, work / "pirate", "pirate", 1, "pirate speak", ex["pirate"]),
        "sql": make_sparse_bundle(
            base,
            work / "sql",
            "sql",
            2,
            params=[p for p in SPARSE_PARAMS if "lm_head" not in p],
            description="SQL queries",
            examples=ex["sql"],
        ),
        "recipe": make_bottleneck_bundle(
            base, work / "recipe", "recipe", 3, description="cooking recipes", examples=ex["recipe"]
        ),
    }
    images = [png_bytes(image(i, salt=11)) for i in range(8)]
    started = time.perf_counter()
    srv = ServerProcess(base, work / "store", "--kv-cache-memory-bytes", str(512 << 20), admin_token="t")
    start_s = time.perf_counter() - started
    scrapes: list[dict] = []
    phase_at: dict[str, float] = {}
    counts: Counter = Counter()
    served: dict[str, Counter] = {p: Counter() for p in PHASES}
    failures: list[str] = []
    auto_choices: Counter = Counter()  # (prompt group the bench meant, expert the router chose)
    lock = threading.Lock()
    stop = threading.Event()
    phase = {"name": PHASES[0]}
    try:
        with DeltaClient(srv.grpc, admin_token="t") as c:
            for path in bundles.values():
                c.register(path)
        tasks = [srv.base_name, *bundles]
        auto_groups = [g for g, w in AUTO_MIX.items() for _ in range(w)]

        def worker(seed: int) -> None:
            rng = random.Random(seed)
            turn = itertools.count(seed)
            with httpx.Client(base_url=srv.http, timeout=120) as http:
                while not stop.is_set():
                    name = phase["name"]
                    if name == "auto":
                        group = rng.choice(auto_groups)
                        body = chat_body("auto", rng.choice(AUTO_PROMPTS[group]), None, args.max_tokens)
                        body["_group"] = group
                    else:
                        model = srv.base_name if name == "base" else tasks[next(turn) % len(tasks)]
                        body = chat_body(model, rng.choice(PROMPTS), rng.choice(images), args.max_tokens)
                    group = body.pop("_group", None)
                    try:
                        expert, why = streamed_chat(http, body)
                    except httpx.HTTPError as exc:
                        expert, why = None, f"{type(exc).__name__}: {exc}"
                    with lock:
                        counts[name] += 1
                        if why is None:
                            served[name][expert] += 1
                            if group:
                                auto_choices[group, "base" if expert == srv.base_name else expert] += 1
                        else:
                            failures.append(f"{name} {body['model']}: {why}")

        with httpx.Client(base_url=srv.http, timeout=30) as scraper:
            scrapes.append({"t": 0.0, "samples": scrape(scraper, "")})
            t0 = time.perf_counter()
            threads = [threading.Thread(target=worker, args=(i,)) for i in range(args.workers)]
            for th in threads:
                th.start()
            phase_at[PHASES[0]] = 0.0
            next_scrape = args.scrape_s
            for n, name in enumerate(PHASES):
                if n:
                    phase["name"] = name
                    phase_at[name] = round(time.perf_counter() - t0, 2)
                end = args.seconds * (n + 1) / len(PHASES)
                while (now := time.perf_counter() - t0) < end:
                    time.sleep(max(0.0, min(next_scrape, end) - now))
                    if time.perf_counter() - t0 >= next_scrape - 1e-3:
                        samples = scrape(scraper, "")
                        scrapes.append({"t": round(time.perf_counter() - t0, 3), "samples": samples})
                        next_scrape += args.scrape_s
            stop.set()
            for th in threads:
                th.join()
            scrapes.append({"t": round(time.perf_counter() - t0, 3), "samples": scrape(scraper, "")})
    finally:
        srv.stop()
    series = panels(scrapes, args.window)
    last = scrapes[-1]["samples"]
    totals = {
        "requests_ok_by_task": {
            k[0]: v for k, v in sum_by(last, "deltaserve_requests_total", ("task",), {"outcome": "ok"}).items()
        },
        "requests_by_outcome": {k[0]: v for k, v in sum_by(last, "deltaserve_requests_total", ("outcome",)).items()},
        "generated_tokens_by_task": {
            k[0]: v for k, v in sum_by(last, "deltaserve_generated_tokens_total", ("task",)).items()
        },
        "routing_by_router_expert": {
            f"{k[0]}/{k[1]}": v
            for k, v in sum_by(last, "deltaserve_routing_decisions_total", ("router", "expert")).items()
        },
    }
    result = {
        "command": " ".join([".venv/bin/python bench/dashboard.py", *sys.argv[1:]]),
        "base": base_note,
        "base_name": srv.base_name,
        "machine": facts,
        "server_start_s": round(start_s, 1),
        "seconds": round(scrapes[-1]["t"], 1),
        "workers": args.workers,
        "max_tokens": args.max_tokens,
        "scrape_s": args.scrape_s,
        "window_s": args.window,
        "phases_start_s": phase_at,
        "requests_by_phase": dict(counts),
        "served_by_phase": {
            p: {("base" if k == srv.base_name else k): v for k, v in c.items()} for p, c in served.items()
        },
        "auto_meant_vs_chosen": {f"{g} -> {e}": v for (g, e), v in sorted(auto_choices.items())},
        "failures": len(failures),
        "failure_examples": failures[:20],
        "totals_at_end": totals,
        "loadavg_at_end": [round(x, 2) for x in os.getloadavg()],
        "panels": series,
        "scrapes": scrapes,
    }
    summary = {k: v for k, v in result.items() if k not in ("panels", "scrapes")}
    print(json.dumps(summary, indent=2))
    if failures:
        print(f"{len(failures)} FAILED requests:", *failures[:20], sep="\n  ")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "dashboard.json").write_text(json.dumps(no_nan(result), indent=1, allow_nan=False) + "\n")
        render(result, args.out / "dashboard.png")
        (args.out / "dashboard.md").write_text(report(result))
        print(f"wrote {args.out / 'dashboard.png'}, dashboard.json, dashboard.md")


def no_nan(x):
    """JSON has no NaN: an undefined quantile or share (no requests in the window) is written as null."""
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: no_nan(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [no_nan(v) for v in x]
    return x


def nan_back(x):
    if x is None:
        return math.nan
    if isinstance(x, dict):
        return {k: nan_back(v) for k, v in x.items()}
    if isinstance(x, list):
        return [nan_back(v) for v in x]
    return x


# ---- picture and report -----------------------------------------------------------------------------------------


def render(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    p = r["panels"]
    t = p["t"]
    names = sorted({*p["requests_per_s"], *p["routing_share"]}, key=lambda n: (n != r["base_name"], n))
    colour = {n: f"C{i}" for i, n in enumerate(names)}
    label = {n: (f"base ({n[:8]}…)" if n == r["base_name"] else n) for n in names}
    fig, axes = plt.subplots(2, 2, figsize=(13, 8.5), sharex=True)
    (ax_req, ax_tok), (ax_ttft, ax_route) = axes

    def phases(ax) -> None:
        starts = r["phases_start_s"]
        bounds = [*starts.values(), r["seconds"]]
        for n, (name, s) in enumerate(starts.items()):
            ax.axvspan(s, bounds[n + 1], color="grey", alpha=0.06 if n % 2 else 0.0)
            ax.axvline(s, color="grey", lw=0.8, ls=":")
            ax.text(
                s + 1,
                1.0,
                name,
                transform=ax.get_xaxis_transform(),
                va="top",
                fontsize=8,
                zorder=5,
                bbox={"facecolor": "white", "alpha": 0.7, "pad": 1, "lw": 0},
            )

    for task, ys in p["requests_per_s"].items():
        ax_req.plot(t, ys, color=colour[task], label=label[task])
    ax_req.plot(t, [sum(v) for v in zip(*p["requests_per_s"].values())], color="black", lw=1.5, label="all tasks")
    ax_req.set_title('Requests/s by task — rate(deltaserve_requests_total{outcome="ok"})', fontsize=10)
    ax_req.set_ylabel("requests / s")
    for task, ys in p["tokens_per_s"].items():
        ax_tok.plot(t, ys, color=colour[task], label=label[task])
    ax_tok.plot(t, [sum(v) for v in zip(*p["tokens_per_s"].values())], color="black", lw=1.5, label="all tasks")
    ax_tok.set_title("Generated tokens/s by task — rate(deltaserve_generated_tokens_total)", fontsize=10)
    ax_tok.set_ylabel("tokens / s")
    for task in p["ttft_p95_s"]:
        ax_ttft.plot(t, [1e3 * v for v in p["ttft_p95_s"][task]], color=colour[task])
        ax_ttft.plot(t, [1e3 * v for v in p["ttft_p50_s"][task]], color=colour[task], ls="--", lw=1)
    ax_ttft.set_title("Time to first token by task — histogram_quantile(0.5 / 0.95, …)", fontsize=10)
    ax_ttft.set_ylabel("TTFT, ms (streamed requests)")
    experts = [n for n in names if n in p["routing_share"]]
    shares = [[0.0 if math.isnan(v) else v for v in p["routing_share"][e]] for e in experts]
    ax_route.stackplot(t, shares, colors=[colour[e] for e in experts], labels=[label[e] for e in experts], alpha=0.8)
    ax_route.set_ylim(0, 1)
    ax_route.set_title("Routing share by expert — rate(deltaserve_routing_decisions_total) / sum", fontsize=10)
    ax_route.set_ylabel("share of routing decisions")
    for ax in axes.flat:
        phases(ax)
        ax.set_xlim(0, r["seconds"])
        ax.grid(alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel("seconds into the run")
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=colour[n], lw=3, label=label[n]) for n in names]
    handles += [
        Line2D([], [], color="black", lw=1.5, label="all tasks (sum)"),
        Line2D([], [], color="grey", label="TTFT p95"),
        Line2D([], [], color="grey", ls="--", lw=1, label="TTFT p50"),
    ]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=9, frameon=False)
    fails = f"{r['failures']} failed" if r["failures"] else "all HTTP 200"
    fig.suptitle(
        f"deltaserve dashboard panels from `{r['command']}`\n"
        f"{r['seconds']:.0f} s, {sum(r['requests_by_phase'].values())} streamed chat requests ({fails}), "
        f"{r['workers']} clients, rates over {r['window_s']:.0f} s windows of /metrics scraped every {r['scrape_s']:.0f} s; "
        f"base: {r['base'].split(' (')[0]}",
        fontsize=10,
    )
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _fmt(values: list[float], scale: float = 1.0, digits: int = 1) -> str:
    finite = [v * scale for v in values if not math.isnan(v)]
    return f"{min(finite):.{digits}f}–{max(finite):.{digits}f}" if finite else "—"


def report(r: dict) -> str:
    p, t = r["panels"], r["panels"]["t"]
    base = r["base_name"]

    def nm(name: str) -> str:
        return "base" if name == base else name

    starts = r["phases_start_s"]
    bounds = [*starts.values(), r["seconds"]]

    def in_phase(n: int, ys: list[float]) -> list[float]:  # points whose whole window lies in phase n
        return [y for x, y in zip(t, ys) if bounds[n] + r["window_s"] <= x <= bounds[n + 1]]

    rows = []
    for n, name in enumerate(starts):
        total = [sum(v) for v in zip(*p["requests_per_s"].values())]
        tokens = [sum(v) for v in zip(*p["tokens_per_s"].values())]
        share = {e: in_phase(n, ys) for e, ys in p["routing_share"].items()}
        mean_share = ", ".join(
            f"{nm(e)} {sum(v) / len(v):.2f}" for e, v in share.items() if v and sum(v) / len(v) >= 0.005
        )
        p95 = ", ".join(
            f"{nm(task)} {_fmt(in_phase(n, ys), 1e3, 0)}"
            for task, ys in p["ttft_p95_s"].items()
            if _fmt(in_phase(n, ys)) != "—"
        )
        served = ", ".join(f"{k} {v}" for k, v in sorted(r["served_by_phase"][name].items()))
        rows.append(
            f"| {name} | {r['requests_by_phase'].get(name, 0)} ({served}) | {_fmt(in_phase(n, total), 1, 2)} | "
            f"{_fmt(in_phase(n, tokens), 1, 1)} | {p95 or '—'} | {mean_share or '—'} |"
        )
    m = r["machine"]
    fails = "\n".join(f"  - {f}" for f in r["failure_examples"])
    return f"""# Dashboard panels from a bench run

Generated by `{r["command"]}`; raw scrapes and computed series: [dashboard.json](dashboard.json).

![dashboard panels](dashboard.png)

What a newcomer sees in Grafana (`deploy/grafana/deltaserve-dashboard.json`), drawn without Prometheus or Grafana:
the script scrapes the server's `GET /metrics` every {r["scrape_s"]:.0f} s while it drives traffic and computes each
panel's PromQL itself from the scraped counters and histogram buckets. The shipped recording rules
(`deploy/prometheus/deltaserve-rules.yml`) use 1 m and 5 m windows; this run is {r["seconds"]:.0f} s long, so every
rate here is over a {r["window_s"]:.0f} s window (Prometheus's `rate` without its extrapolation to the window's edges).

| panel | what it shows | dashboard query (recording rule) it mirrors |
|---|---|---|
| Requests/s by task | successful requests per second per task (expert or base), and their sum | `sum by (task) (deltaserve:requests:rate1m{{outcome="ok"}})` = `sum by (task, outcome) (rate(deltaserve_requests_total[1m]))` |
| Generated tokens/s by task | tokens the server generated per second per task, and their sum | `deltaserve:generated_tokens:rate1m` = `sum by (task) (rate(deltaserve_generated_tokens_total[1m]))` |
| Time to first token by task | p95 (solid) and p50 (dashed) time to the first token of streamed requests, per task | `deltaserve:ttft_seconds:p95_5m` (and `:p50_5m`) = `histogram_quantile(0.95, sum by (task, le) (rate(deltaserve_time_to_first_token_seconds_bucket[5m])))` |
| Routing share by expert | which expert each routing decision chose (explicit names and `auto` together), as shares of all decisions | `deltaserve:routing_share:rate5m` = `sum by (expert) (rate(deltaserve_routing_decisions_total[5m])) / ignoring (expert) group_left sum(rate(…[5m]))` |

TTFT buckets are the server's latency buckets (5, 10, 25, 50, 100, 250, 500 ms, 1 s …): a quantile is interpolated
linearly inside a bucket, so its resolution is the bucket's width, as in Grafana.

## The run

Base: {r["base"]} (`{r["base_name"]}`). Deltas (synthetic, random weights, `tuning/synthetic.py`; their manifests carry
example prompts for the `auto` router): `pirate` (LoRA), `sql` (sparse, served in the shared batch), `recipe`
(bottleneck). {m["nproc"]} CPUs ({m["cpu_model"]}), shared with other work: load average at start
{m["loadavg_at_start"]}, at end {r["loadavg_at_end"]}. Server start {r["server_start_s"]} s (not in the picture).
{r["workers"]} HTTP clients in a closed loop, `POST /v1/chat/completions` with `stream: true`, greedy,
`max_tokens` {r["max_tokens"]} (EOS may end an answer earlier), three phases:

- **base** — every request names the base model (a 32×32 image + a question);
- **explicit** — requests name base, `pirate`, `sql`, `recipe` in turn (image + question);
- **auto** — `model: "auto"`, text only: the tasks in their own words (none of them a manifest example) and
  general questions, weighted sql 4 : pirate 3 : recipe 2 : open world 2. The routing panel shows what the router
  chose, not what the bench meant.

Failed requests (not HTTP 200 or a stream without `[DONE]`): **{r["failures"]}**
{fails}

Per phase (points whose {r["window_s"]:.0f} s window lies inside the phase; min–max over the phase):

| phase | requests (served by, from the responses) | requests/s, all tasks | tokens/s, all tasks | TTFT p95 by task, ms | mean routing share |
|---|---|---:|---:|---|---|
{chr(10).join(rows)}

Auto phase, prompt group the bench meant → expert the router chose: {r["auto_meant_vs_chosen"]}.

Counters at the end: requests by outcome {r["totals_at_end"]["requests_by_outcome"]}; routing decisions by
router/expert { {k.replace(base, "base"): v for k, v in r["totals_at_end"]["routing_by_router_expert"].items()} }.
"""


if __name__ == "__main__":
    main()
