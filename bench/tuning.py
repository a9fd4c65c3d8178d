"""Tuning benchmark: every method × every downstream task on the embedded default base.

    .venv/bin/python bench/tuning.py            # or: make bench-tuning / deltaserve bench tuning

For each downstream task of the world (``digits``, ``relations``) and each method (spider,
magnitude, full, lora, bottleneck) it tunes one delta with the *same* budget and settings
(:class:`deltaserve.tuning.tune.TuneConfig` defaults: 500 steps of batch 16, AdamW with warm-up
and cosine decay; peak LR 3e-3 for every method, chosen once and not tuned per method or task), then scores it:

- **target** — exact match on the task's test split;
- **general** — mean score on the general tasks' test splits, each by its own metric (exact match; caption token F1) (what the base knew);
- **H** — their harmonic mean;
- **delta params / density** — numbers the delta stores (and, for sparse deltas, the fraction
  of the trainable scope that changed); **trainable** — parameters the optimizer updated;
- **step time** — median wall time of one optimizer step, relative to ``full`` on the same task;
- **peak memory** — peak tensor memory allocated during the first two steps (model weights
  excluded: gradients, optimizer and method state, activations), relative to ``full``.

Every (task, method) is tuned once per seed (``--seeds``, default 0,1,2: the seed of the tuning run — batch
order, initialisation of adapters; the base is the same for all); the tables give the mean over seeds with the
range (min–max), and the seed's claim is checked per seed, not only on the means.

Writes ``docs/tuning-results.{json,md,png}``. Every figure comes from this one run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

METHODS = ("spider", "magnitude", "full", "lora", "bottleneck")
ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--base", type=Path, default=None, help="base model directory (default: the pretrained embedded base, cached)"
    )
    p.add_argument("--tasks", default=None, help="comma-separated downstream tasks (default: all of the world's)")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated methods")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default: TuneConfig's)")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated tuning seeds (one run per seed)")
    p.add_argument("--eval-limit", type=int, default=None, help="test samples per task (default: all)")
    p.add_argument("--out-dir", type=Path, default=ROOT / "docs", help="where tuning-results.* go")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def machine() -> dict:
    import torch

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def base_scores(base_dir: Path, task_dirs: dict[str, Path], general, limit) -> dict:
    """The untouched base on every downstream task and on the general tasks."""
    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from deltaserve.tuning import data, evaluate
    from deltaserve.tuning.tune import score

    model = LlavaForConditionalGeneration.from_pretrained(str(base_dir), dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(str(base_dir))
    targets = {}
    for task, task_dir in task_dirs.items():
        test = data.load_task(task_dir, splits=("test",))["test"]
        targets[task] = evaluate.evaluate(model, processor, test[:limit] if limit else test)["exact_match"]
    general_metrics = score(model, processor, None, general, limit)
    return {"target": {t: round(v, 4) for t, v in targets.items()}, **general_metrics}


def run(args: argparse.Namespace) -> dict:
    from deltaserve.tuning.pretrain import PretrainConfig, pretrain
    from deltaserve.tuning.tune import TuneConfig, default_general_dir, load_general, tune, world_task_dir
    from deltaserve.tuning.world import DOWNSTREAM_TASKS

    started = time.perf_counter()
    tasks = tuple(args.tasks.split(",")) if args.tasks else DOWNSTREAM_TASKS
    methods = tuple(args.methods.split(","))
    if args.base is None:
        pre = pretrain(PretrainConfig(), progress=not args.quiet)
        base_dir, base_info = (
            pre.path,
            {
                "path": str(pre.path),
                "cached": pre.cached,
                "general_score": pre.meta["general_score"],
                "pretrain": pre.meta.get("pretrain"),
            },
        )
    else:
        base_dir, base_info = args.base, {"path": str(args.base)}
    seeds = tuple(int(x) for x in args.seeds.split(","))
    config = TuneConfig(eval_limit=args.eval_limit, profile_memory_steps=2)
    if args.steps is not None:
        config = replace(config, steps=args.steps)
    task_dirs = {t: world_task_dir(t) for t in tasks}
    general_dir = default_general_dir()
    general = load_general(general_dir)
    report = {
        "machine": machine(),
        "base": base_info,
        "config": {
            **asdict(config),
            "seeds": list(seeds),
            "lr_by_method": {m: config.train_config(m).lr for m in methods},
        },
        "base_scores": base_scores(base_dir, task_dirs, general, args.eval_limit),
        "runs": [],
    }
    scratch = Path(tempfile.mkdtemp(prefix="deltaserve-bench-tuning-"))
    try:
        for seed in seeds:
            for task, task_dir in task_dirs.items():
                for method in methods:
                    print(f"[bench] seed {seed}: {task} × {method}", file=sys.stderr, flush=True)
                    result = tune(
                        base_dir,
                        task_dir,
                        method,
                        scratch / f"{task}-{method}-{seed}",
                        replace(config, seed=seed),
                        general_dir=general_dir,
                        progress=not args.quiet,
                    )
                    report["runs"].append(
                        {
                            "seed": seed,
                            "task": task,
                            "method": method,
                            "kind": json.loads((result.path / "delta.json").read_text())["kind"],
                            "metrics": result.metrics,
                            "stats": result.stats,
                            "step_seconds": round(result.step_seconds, 4),
                            "peak_memory_bytes": result.peak_memory_bytes,
                            "seconds": result.seconds,
                            "bundle_bytes": sum(p.stat().st_size for p in result.path.rglob("*") if p.is_file()),
                            "loss_first": result.metrics.get("train_loss_first"),
                            "loss_last": result.metrics.get("train_loss_last"),
                        }
                    )
                    shutil.rmtree(result.path, ignore_errors=True)
                    del result
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    for run_ in report["runs"]:
        full = next(
            (
                r
                for r in report["runs"]
                if r["task"] == run_["task"] and r["seed"] == run_["seed"] and r["method"] == "full"
            ),
            None,
        )
        if full:
            run_["step_time_vs_full"] = round(run_["step_seconds"] / full["step_seconds"], 3)
            run_["peak_memory_vs_full"] = (
                round(run_["peak_memory_bytes"] / full["peak_memory_bytes"], 3) if run_["peak_memory_bytes"] else None
            )
    report["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    report["seconds"] = round(time.perf_counter() - started, 1)
    return report


# ----------------------------------------------------------------------------- output


def _fmt_params(n: int | None) -> str:
    if n is None:
        return "–"
    return f"{n / 1e6:.2f} M" if n >= 1e6 else f"{n / 1e3:.1f} k"


def _spread(values: list[float]) -> dict:
    return {"mean": sum(values) / len(values), "min": min(values), "max": max(values)}


def summary(report: dict) -> dict[tuple[str, str], dict]:
    """Per (task, method): target, general and H as mean and range over the seeds; sizes and times as means."""
    out: dict[tuple[str, str], dict] = {}
    for r in report["runs"]:
        out.setdefault((r["task"], r["method"]), {"kind": r["kind"], "runs": []})["runs"].append(r)
    for entry in out.values():
        runs = entry["runs"]
        for key in ("target", "general", "h"):
            entry[key] = _spread([r["metrics"][key] for r in runs])
        for key in ("delta_params", "density", "trainable_params"):
            values = [r["stats"][key] for r in runs if key in r["stats"]]
            entry[key] = sum(values) / len(values) if values else None
        for key in ("step_time_vs_full", "peak_memory_vs_full", "step_seconds", "peak_memory_bytes"):
            values = [r[key] for r in runs if r.get(key) is not None]
            entry[key] = sum(values) / len(values) if values else float("nan")
    return out


def _cell(spread: dict, bold: bool = False) -> str:
    mean = f"**{spread['mean']:.3f}**" if bold else f"{spread['mean']:.3f}"
    return mean if spread["min"] == spread["max"] else f"{mean} ({spread['min']:.2f}–{spread['max']:.2f})"


def table(report: dict) -> str:
    rows = [
        "| task | method | kind | target | general | H | delta params | density | trainable | step time vs full | peak mem vs full |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    base = report["base_scores"]
    summ = summary(report)
    for task in dict.fromkeys(t for t, _ in summ):
        t0, g0 = base["target"][task], base["general"]
        h0 = 0.0 if t0 + g0 == 0 else 2 * t0 * g0 / (t0 + g0)
        rows.append(f"| {task} | *base* | – | {t0:.3f} | {g0:.3f} | {h0:.3f} | – | – | – | – | – |")
        for (t, method), e in summ.items():
            if t != task:
                continue
            density = f"{e['density']:.3f}" if e["density"] is not None else "–"
            rows.append(
                f"| {task} | {method} | {e['kind']} | {_cell(e['target'])} | {_cell(e['general'])} | {_cell(e['h'], True)} | "
                f"{_fmt_params(e['delta_params'] and round(e['delta_params']))} | {density} | "
                f"{_fmt_params(e['trainable_params'] and round(e['trainable_params']))} | "
                f"{e['step_time_vs_full']:.2f}× ({e['step_seconds'] * 1000:.0f} ms) | "
                f"{e['peak_memory_vs_full']:.2f}× ({e['peak_memory_bytes'] / 2**20:.1f} MiB) |"
            )
    return "\n".join(rows)


def observations(report: dict) -> list[str]:
    """Plain comparisons read off the runs (no claims beyond the numbers), per seed where it matters."""
    lines = []
    base_general = report["base_scores"]["general"]
    summ = summary(report)
    seeds = report["config"]["seeds"]
    for task in dict.fromkeys(t for t, _ in summ):
        runs = {m: e for (t, m), e in summ.items() if t == task}
        best = max(runs, key=lambda m: runs[m]["h"]["mean"])
        lines.append(
            f"- `{task}`: highest mean H {runs[best]['h']['mean']:.3f} by **{best}**; general score kept (vs the base's "
            f"{base_general:.3f}): "
            + ", ".join(f"{m} {v['general']['mean']:.3f}" for m, v in runs.items())
            + "; target: "
            + ", ".join(f"{m} {v['target']['mean']:.3f}" for m, v in runs.items())
            + "."
        )
        if "spider" not in runs:
            continue
        per_seed = {(r["method"], r["seed"]): r["metrics"] for r in report["runs"] if r["task"] == task}
        parts = []
        for m in runs:
            if m == "spider":
                continue
            both = [s for s in seeds if ("spider", s) in per_seed and (m, s) in per_seed]
            kept = sum(per_seed[("spider", s)]["general"] > per_seed[(m, s)]["general"] for s in both)
            diff = [per_seed[("spider", s)]["target"] - per_seed[(m, s)]["target"] for s in both]
            parts.append(
                f"{m}: general higher in {kept}/{len(both)} seeds, target difference "
                f"{sum(diff) / len(diff):+.3f} ({min(diff):+.2f} to {max(diff):+.2f})"
            )
        lines.append("  - the seed's claim, SPIDER against each method seed by seed — " + "; ".join(parts) + ".")
    return lines


def markdown(report: dict) -> str:
    cfg = report["config"]
    mach = report["machine"]
    lrs = ", ".join(f"{m} {lr:g}" for m, lr in cfg["lr_by_method"].items())
    return f"""# Tuning methods on the embedded base: specialization vs forgetting

Generated by `bench/tuning.py` (`make bench-tuning`) in one run of {report["seconds"] / 60:.1f} min, every method
tuned once per seed ({", ".join(map(str, cfg["seeds"]))}): cells give the mean over seeds and, in parentheses, the range. Raw numbers:
[tuning-results.json](tuning-results.json); plot: [tuning-results.png](tuning-results.png).

![target vs general score per method](tuning-results.png)

{table(report)}

*base*: the untouched pretrained base (what the server answers with when no delta applies).
target / general: exact match on the task's test split / mean over the general tasks' test splits of each task's metric (exact match; token F1 for caption)
({", ".join(k.split(".", 1)[1] for k in report["base_scores"] if k.startswith("general."))});
H: their harmonic mean. delta params: numbers stored in the delta (sparse: changed coordinates; LoRA: A and B;
bottleneck: adapter weights). density: changed / trainable coordinates of the scope (sparse deltas). trainable:
parameters the optimizer updated. step time: median over the run's steps, relative to `full` on the same task
(absolute in parentheses). peak mem: peak tensor memory allocated during the first two optimizer steps
(gradients, optimizer and method state, activations; the frozen base weights excluded), relative to `full`.

## What it shows

{chr(10).join(observations(report))}

## Setup (identical for every method)

- base: `{report["base"].get("path")}` (general score at pretraining {report["base"].get("general_score", "–")});
- scope: multimodal projector + the last {cfg["last_n_layers"]} decoder layers, vision tower frozen
  (LoRA and bottleneck can only attach to the decoder layers: vLLM serves LoRA on the language model only);
- {cfg["steps"]} optimizer steps of batch {cfg["batch_size"]}, AdamW (betas 0.9/0.98, no weight decay), {cfg["warmup_steps"]}
  warm-up steps then cosine decay to {cfg["min_lr_ratio"]}× the peak, gradient clipping at {cfg["grad_clip"]}, seeds {cfg["seeds"]};
- peak learning rate, fixed per method family before the run and not tuned on these results: {lrs};
- magnitude: the largest {cfg["options"]["magnitude_ratio"]:.0%} |w0| of each tensor frozen; LoRA: r={cfg["options"]["lora_r"]},
  alpha={cfg["options"]["lora_alpha"]:g} on {", ".join(cfg["options"]["lora_targets"])}; bottleneck: width {cfg["options"]["bottleneck_dim"]},
  {cfg["options"]["bottleneck_activation"]}, after {", ".join(cfg["options"]["bottleneck_targets"])}; SPIDER: no ratio (data-dependent density);
- machine: {mach["cpu_count"]} CPUs, torch {mach["torch"]} with {mach["torch_threads"]} intra-op thread(s), {mach["platform"]};
  load average {mach["load_average_at_start"]} at the start, {mach["load_average_at_end"]} at the end (the machine is shared:
  absolute times are noisy, ratios within one task are measured minutes apart).
"""


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(r["task"] for r in report["runs"]))
    markers = {"spider": "*", "magnitude": "s", "full": "o", "lora": "^", "bottleneck": "D"}
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.2 * len(tasks), 4.4), squeeze=False)
    base = report["base_scores"]
    summ = summary(report)
    for ax, task in zip(axes[0], tasks):
        ax.scatter([base["target"][task]], [base["general"]], marker="x", s=80, color="black", label="base")
        for (t, method), e in summ.items():
            if t != task:
                continue
            tx, gy = e["target"], e["general"]
            ax.errorbar(
                [tx["mean"]],
                [gy["mean"]],
                xerr=[[tx["mean"] - tx["min"]], [tx["max"] - tx["mean"]]],
                yerr=[[gy["mean"] - gy["min"]], [gy["max"] - gy["mean"]]],
                marker=markers.get(method, "o"),
                markersize=9,
                capsize=3,
                linestyle="none",
                label=method,
            )
        ax.set_title(f"{task}")
        ax.set_xlabel("target score (test exact match)")
        ax.set_ylabel("general score (mean over general tasks)")
        ax.set_xlim(-0.03, 1.03)
        ax.set_ylim(-0.03, 1.03)
        ax.grid(alpha=0.3)
        ax.legend(loc="upper right", fontsize=8)
    fig.suptitle(
        f"Specialization vs forgetting, {report['config']['steps']} steps per method, "
        f"mean and range over seeds {report['config']['seeds']}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    report = run(args)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "tuning-results.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(report, args.out_dir / "tuning-results.png")
    (args.out_dir / "tuning-results.md").write_text(markdown(report))
    print(table(report))
    print(f"wrote {args.out_dir}/tuning-results.{{md,png,json}} in {report['seconds']:.0f} s", file=sys.stderr)
    return report


if __name__ == "__main__":
    main()
