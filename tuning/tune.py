"""Tune a delta for one task on a base model and write it as a bundle (``deltaserve tune``).

::

    result = tune(base_dir, task_dir, "spider", out)          # → TuneResult(path=out, metrics=…)

1. check everything that can be checked before training — the method, ``out``, the base
   directory, every line and image of the task data (:class:`~deltaserve.tuning.errors.DataError`
   names file and line) — so bad input fails in seconds and writes nothing;
2. load the base (float32), let the method set up its trainable part
   (:mod:`deltaserve.tuning.methods`; the scope is the projector + the last N decoder layers,
   vision tower frozen) and run the shared loop (:func:`deltaserve.tuning.train.train`);
3. score the tuned model: exact match on the task's ``test`` split (*target*), the mean of the
   general tasks' own metrics on their ``test`` splits (*general*: what tuning must not destroy),
   and their harmonic mean *H*;
4. export through the method's bundle kind — written to a temporary sibling directory,
   validated against the base and renamed into place — with a handful of training prompts
   (and their images) as ``task.examples`` for the server's auto router.

:func:`cached_delta` runs the same once per content key under ``cache_dir()/deltas`` (the
demo); :func:`evaluate_bundle` scores an existing bundle applied through its plugin kind.

Defaults are sized for two CPU cores: 500 steps of batch 16 tune one task in about a minute.
(A first benchmark at 150 steps and LR 1e-3 for the selective methods left every method at
chance on both downstream tasks — no specialization to compare — so the budget was raised once,
for all methods alike, before the published run; see docs/tuning-results.md.)
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from deltaserve.plugins import env
from deltaserve.plugins.errors import BundleError, DeltaServeError
from deltaserve.tuning import augment, batching, data, evaluate, train
from deltaserve.tuning.cache import atomic_dir, source_hash, stable_hash, tree_hash
from deltaserve.tuning.errors import DataError, DataProblem
from deltaserve.tuning.methods import METHODS, MethodOptions, Scope, get_method
from deltaserve.tuning.world import DOWNSTREAM_TASKS, GENERAL_TASKS, WorldConfig, cached_world

TUNE_VERSION = 1
EXAMPLES_DIR = "examples"


class TuneError(DeltaServeError):
    """Tuning cannot start or finish (bad base directory, ``out`` taken, base/bundle mismatch).

    ``problems`` names file and line like :class:`~deltaserve.tuning.errors.DataError`.
    """

    def __init__(self, problems: list[DataProblem]):
        self.problems = list(problems)
        lines = [str(p) for p in self.problems]
        super().__init__(
            lines[0] if len(lines) == 1 else "\n  ".join([f"cannot tune ({len(lines)} problems):", *lines])
        )


@dataclass(frozen=True)
class TuneConfig:
    """Hyper-parameters of one tuning run (all recorded in the bundle's ``method.hyperparameters``)."""

    steps: int = 500
    """Optimizer steps (the same budget for every method in the benchmark)."""
    batch_size: int = 16
    lr: float | None = None
    """Peak learning rate; None: the method's default (3e-3 for every method)."""
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float | None = 1.0
    seed: int = 0
    """Seeds new modules' init (LoRA A, adapters' down projection) and the batch order."""
    last_n_layers: int = 2
    """Decoder layers (from the top) in the trainable scope."""
    train_vision_tower: bool = False
    """Selective methods: tune the vision tower too."""
    train_lm_head: bool = False
    """Selective methods: tune the LM head too (see :class:`~deltaserve.tuning.methods.scope.Scope`)."""
    options: MethodOptions = field(default_factory=MethodOptions)
    augment_copies: int = 0
    """Reworded copies of every training prompt (:mod:`deltaserve.tuning.augment`): the expert is asked in
    words it never saw (the world's val/test phrasings, a user's own)."""
    """Method-specific settings (magnitude ratio, LoRA rank, adapter width, …)."""
    examples: int = 24
    """Training prompts (with their images) stored as ``task.examples`` for the auto router."""
    eval_limit: int | None = None
    """Score on at most this many test samples per task (None: the whole test split)."""
    profile_memory_steps: int = 0
    """Profile tensor allocations over the first N steps and report their peak (benchmark; 0: off)."""

    def train_config(self, method: str) -> train.TrainConfig:
        return train.TrainConfig(
            steps=self.steps,
            batch_size=self.batch_size,
            lr=self.lr if self.lr is not None else get_method(method).default_lr,
            warmup_steps=min(self.warmup_steps, max(1, self.steps // 10)),
            min_lr_ratio=self.min_lr_ratio,
            weight_decay=self.weight_decay,
            grad_clip=self.grad_clip,
            seed=self.seed,
        )

    def scope(self) -> Scope:
        return Scope(
            last_n_layers=self.last_n_layers,
            train_vision_tower=self.train_vision_tower,
            train_lm_head=self.train_lm_head,
        )


@dataclass
class TuneResult:
    path: Path
    """The written bundle."""
    method: str
    metrics: dict[str, float]
    """``target``, ``general``, ``h`` and ``general.<task>`` — as in the manifest's ``task.metrics``."""
    stats: dict
    """``trainable_params``, ``delta_params`` (numbers stored in the delta), ``density`` (sparse)."""
    losses: list[float]
    seconds: dict[str, float]
    """``prepare``, ``train``, ``evaluate``, ``export``."""
    step_seconds: float
    """Median wall time of one optimizer step (profiled steps excluded)."""
    peak_memory_bytes: int | None = None
    """Peak of tensor memory allocated during the profiled first steps (see :class:`TuneConfig`)."""
    model: Any = field(default=None, repr=False)
    """The tuned transformers model (base + delta, in memory; LoRA layers / adapters attached)."""


# ----------------------------------------------------------------------------- checks


def _line_of(path: Path, needle: str) -> int | None:
    try:
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if needle in line:
                return number
    except OSError:
        pass
    return None


def check_base_dir(base_dir: str | Path) -> Path:
    """A model directory of a known family (``config.json`` whose ``model_type`` is one of
    :data:`deltaserve.plugins.families.FAMILIES`, + safetensors), else :class:`TuneError`."""
    from deltaserve.plugins.families import FAMILIES

    base_dir = Path(base_dir)
    config_path = base_dir / "config.json"
    if not config_path.is_file():
        raise TuneError(
            [
                DataProblem(
                    config_path, None, "missing: `--base` must be a model directory (config.json + *.safetensors)"
                )
            ]
        )
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise TuneError([DataProblem(config_path, None, f"unreadable: {e}")]) from None
    except json.JSONDecodeError as e:
        raise TuneError([DataProblem(config_path, e.lineno, f"malformed JSON: {e.msg} (column {e.colno})")]) from None
    problems = []
    known = [t for f in FAMILIES for t in f.model_types]
    if not isinstance(config, dict) or config.get("model_type") not in known:
        got = config.get("model_type") if isinstance(config, dict) else None
        problems.append(
            DataProblem(
                config_path,
                _line_of(config_path, '"model_type"'),
                f"`model_type` must be one of {', '.join(known)}, got {got!r}",
            )
        )
    if not any(base_dir.glob("*.safetensors")):
        problems.append(DataProblem(base_dir, None, "no *.safetensors weights (pickled checkpoints are not loaded)"))
    if problems:
        raise TuneError(problems)
    return base_dir


def check_out(out: str | Path) -> Path:
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise TuneError([DataProblem(out, None, "exists and is not an empty directory (nothing was written)")])
    return out


def bundle_problem_lines(bundle_dir: Path, error: BundleError) -> list[DataProblem]:
    """A bundle error as file:line problems (the base fingerprint line of ``delta.json`` for a base mismatch)."""
    manifest = Path(bundle_dir) / "delta.json"
    return [
        DataProblem(
            manifest, _line_of(manifest, '"fingerprint"') if p.startswith("base fingerprint mismatch") else None, p
        )
        for p in error.problems
    ]


# ----------------------------------------------------------------------------- data


def default_general_dir() -> Path:
    """The embedded world's general tasks (generated once, cached): what the default base was pretrained on."""
    return cached_world(WorldConfig(), GENERAL_TASKS)


def world_task_dir(name: str) -> Path:
    """The embedded world's downstream task ``name`` (generated once, cached)."""
    if name not in DOWNSTREAM_TASKS:
        raise ValueError(f"`{name}` is not a downstream task of the embedded world ({', '.join(DOWNSTREAM_TASKS)})")
    return cached_world(WorldConfig(), DOWNSTREAM_TASKS) / name


def load_general(general_dir: str | Path | None) -> dict[str, data.Task]:
    """The general tasks under ``general_dir`` (None: the embedded world's), their test splits loaded."""
    root = Path(general_dir) if general_dir is not None else default_general_dir()
    tasks = data.load_tasks(root, type="general", splits=("test",))
    if not tasks:
        raise DataError([DataProblem(root, None, "no general task directory (task.json with type `general`) here")])
    return tasks


def task_examples(samples: list[data.Sample]) -> tuple[list, dict[str, bytes]]:
    """Manifest examples and the image files they reference (re-encoded as PNG: always a valid bundle image)."""
    import io

    from deltaserve.plugins.manifest import Example

    examples, files = [], {}
    for i, s in enumerate(samples):
        image = None
        if s.image is not None:
            image = f"{EXAMPLES_DIR}/{i:02d}.png"
            buf = io.BytesIO()
            s.load_image().save(buf, format="PNG")
            files[image] = buf.getvalue()
        examples.append(Example(text=s.prompt, image=image))
    return examples, files


def _limit(samples: list, limit: int | None) -> list:
    return samples if limit is None else samples[:limit]


def harmonic(a: float, b: float) -> float:
    return 0.0 if a + b == 0 else 2 * a * b / (a + b)


def score(
    model, processor, target: list[data.Sample] | None, general: dict[str, data.Task] | None, limit: int | None
) -> dict[str, float]:
    """``target`` (exact match), ``general`` (mean of each general task's own metric, as in its
    ``task.json``), ``h`` and ``general.<task>`` of ``model``, rounded to 4 places."""
    metrics: dict[str, float] = {}
    if target is not None:
        metrics["target"] = evaluate.evaluate(model, processor, _limit(target, limit))["exact_match"]
    if general:
        samples = {n: _limit(t["test"], limit) for n, t in general.items()}
        scores = evaluate.evaluate_tasks(
            model, processor, samples, metrics={n: t.info.metric for n, t in general.items()}
        )
        metrics["general"] = evaluate.general_score(scores)
        metrics.update({f"general.{n}": v for n, v in scores.items()})
    if "target" in metrics and "general" in metrics:
        metrics["h"] = harmonic(metrics["target"], metrics["general"])
    return {k: round(v, 4) for k, v in metrics.items()}


# ----------------------------------------------------------------------------- the run


class _Probe(train.TrainHooks):
    """Wraps a method's hooks: times every step and (optionally) profiles tensor memory of the first steps."""

    def __init__(self, inner: train.TrainHooks, profile_steps: int):
        self.inner, self.profile_steps = inner, profile_steps
        self.stamps: list[float] = []
        self.peak: int | None = None
        self._prof = None

    def trainable(self, model):
        return self.inner.trainable(model)

    def on_start(self, model, params):
        if self.profile_steps > 0:
            from torch.profiler import ProfilerActivity, profile

            self._prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
            self._prof.__enter__()
        self.stamps.append(time.perf_counter())
        self.inner.on_start(model, params)

    def after_backward(self, step, model, params):
        self.inner.after_backward(step, model, params)

    def after_step(self, step, model, params):
        self.inner.after_step(step, model, params)
        if self._prof is not None and step == self.profile_steps - 1:
            self._prof.__exit__(None, None, None)
            self.peak = _peak_allocated(self._prof)
            self._prof = None
        self.stamps.append(time.perf_counter())

    def on_end(self, model, params):
        if self._prof is not None:
            self._prof.__exit__(None, None, None)
            self.peak, self._prof = _peak_allocated(self._prof), None
        self.inner.on_end(model, params)

    def step_seconds(self) -> float:
        steps = [b - a for a, b in zip(self.stamps, self.stamps[1:])][self.profile_steps :]
        return statistics.median(steps) if steps else float("nan")


def _peak_allocated(prof) -> int:
    """Peak of the running sum of CPU allocations minus frees, op by op, over the profiled window."""
    running = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        running += event.self_cpu_memory_usage
        peak = max(peak, running)
    return int(peak)


def tune(
    base_dir: str | Path,
    task_dir: str | Path,
    method: str,
    out: str | Path,
    config: TuneConfig | None = None,
    *,
    name: str | None = None,
    general_dir: str | Path | None = None,
    evaluate_general: bool = True,
    progress: bool = True,
) -> TuneResult:
    """Tune ``method`` on the task at ``task_dir`` from the base at ``base_dir``; write the bundle to ``out``.

    ``general_dir`` holds the general (open-world) task directories scored for *general*
    (default: the embedded world's). Raises :class:`DataError` / :class:`TuneError` /
    ValueError before any training for bad input; on any failure ``out`` is not created.
    """
    from transformers import AutoProcessor

    from deltaserve.plugins.base_spec import BaseSpec
    from deltaserve.plugins.manifest import MethodInfo, TaskInfo, task_name_problem

    config = config or TuneConfig()
    started = time.perf_counter()
    method_cls = get_method(method)
    out = check_out(out)
    base_dir = check_base_dir(base_dir)
    task = data.load_task(task_dir)
    name = name or task.name
    if bad := task_name_problem(name):
        raise ValueError(bad)
    general = load_general(general_dir) if evaluate_general else None
    base = BaseSpec.from_dir(base_dir)

    model = base.family.model_cls().from_pretrained(str(base_dir), dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(str(base_dir))
    items = batching.encode(
        processor, task["train"] + augment.augmented(task["train"], config.augment_copies, config.seed)
    )
    torch.manual_seed(config.seed)  # new modules (LoRA A, adapter down) are initialised in prepare
    tuner = method_cls(config.scope(), config.options)
    train_model, hooks = tuner.prepare(model)
    probe = _Probe(hooks, min(config.profile_memory_steps, config.steps))
    prepared = time.perf_counter()

    train_config = config.train_config(method)
    result = train.train(
        train_model, processor, items, train_config, probe, progress=progress, desc=f"tune {method}:{name}"
    )
    tuner.finalize(base_dir)
    trained = time.perf_counter()

    model.eval()
    metrics = score(model, processor, task["test"], general, config.eval_limit)
    metrics["train_loss_first"] = round(sum(result.losses[:10]) / len(result.losses[:10]), 4)
    metrics["train_loss_last"] = round(sum(result.losses[-10:]) / len(result.losses[-10:]), 4)
    evaluated = time.perf_counter()

    examples, files = task_examples(data.pick_examples(task["train"], config.examples, config.seed))
    hyper = {
        **asdict(train_config),
        "betas": list(train_config.betas),
        **tuner.hyperparameters(),
        "options": config.options.as_dict(),
        "data": {"task": task.name, "train_samples": len(items), "data_hash": tree_hash(task.info.path)},
        "eval_limit": config.eval_limit,
    }
    info = MethodInfo(name=method, hyperparameters=hyper)
    task_info = TaskInfo(description=task.info.description or f"task `{task.name}`", examples=examples, metrics=metrics)
    path = tuner.export(out, name=name, base=base, base_dir=base_dir, task=task_info, info=info, extra_files=files)
    stats = tuner.stats()
    stats.setdefault("trainable_params", result.trainable_parameters)
    done = time.perf_counter()
    return TuneResult(
        path=Path(path),
        method=method,
        metrics=metrics,
        stats=stats,
        losses=result.losses,
        seconds={
            "prepare": round(prepared - started, 2),
            "train": round(trained - prepared, 2),
            "evaluate": round(evaluated - trained, 2),
            "export": round(done - evaluated, 2),
        },
        step_seconds=probe.step_seconds(),
        peak_memory_bytes=probe.peak,
        model=model,
    )


# ----------------------------------------------------------------------------- evaluation of a bundle


def evaluate_bundle(
    base_dir: str | Path,
    bundle_dir: str | Path,
    task_dirs: list[str | Path],
    *,
    general_dir: str | Path | None = None,
    evaluate_general: bool = True,
    limit: int | None = None,
) -> dict:
    """Apply the bundle to the base through its plugin kind and score it.

    ``scores``: exact match on the test split of every task in ``task_dirs``; ``target`` is the
    score on the task named like the bundle (else the first one); ``general`` and ``h`` as in
    :func:`tune`. A bundle of another base is a :class:`TuneError` naming ``delta.json`` and
    the line of its base fingerprint.
    """
    from transformers import AutoProcessor

    from deltaserve.plugins.base_spec import BaseSpec
    from deltaserve.plugins.bundle import read_bundle

    base_dir = check_base_dir(base_dir)
    tasks = [data.load_task(d, splits=("test",)) for d in task_dirs]
    general = load_general(general_dir) if evaluate_general else None
    spec = BaseSpec.from_dir(base_dir)
    try:
        bundle = read_bundle(bundle_dir, base=spec)
    except BundleError as e:
        raise TuneError(bundle_problem_lines(Path(bundle_dir), e)) from None
    model = spec.family.model_cls().from_pretrained(str(base_dir), dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(str(base_dir))
    with bundle.kind.apply(model, bundle):
        scores = {t.name: evaluate.evaluate(model, processor, _limit(t["test"], limit))["exact_match"] for t in tasks}
        general_metrics = score(model, processor, None, general, limit) if general else {}
    target_task = bundle.name if bundle.name in scores else (tasks[0].name if tasks else None)
    report = {
        "bundle": str(bundle_dir),
        "name": bundle.name,
        "kind": bundle.manifest.kind,
        "scores": {k: round(v, 4) for k, v in scores.items()},
    }
    if target_task is not None:
        report["target_task"] = target_task
        report["target"] = round(scores[target_task], 4)
    report.update(general_metrics)
    if "target" in report and "general" in report:
        report["h"] = round(harmonic(report["target"], report["general"]), 4)
    return report


# ----------------------------------------------------------------------------- cache for the demo


def _code_hash() -> str:
    from deltaserve.plugins import writer
    from deltaserve.plugins.bottleneck import adapter, kind as bottleneck_kind
    from deltaserve.plugins.lora import writer as lora_writer
    from deltaserve.plugins.sparse import writer as sparse_writer
    from deltaserve.tuning.methods import (
        base as m_base,
        bottleneck as m_bottleneck,
        full,
        lora,
        magnitude,
        scope,
        selective,
        spider,
    )

    modules = [
        augment,
        batching,
        data,
        evaluate,
        train,
        sys.modules[__name__],
        m_base,
        m_bottleneck,
        full,
        lora,
        magnitude,
        scope,
        selective,
        spider,
    ]
    return source_hash(modules + [writer, adapter, bottleneck_kind, lora_writer, sparse_writer])


def delta_key(
    base_dir: Path, task_dir: Path, method: str, config: TuneConfig, name: str, general_dir: Path | None
) -> str:
    """Content key of a tuned delta: base fingerprint, data, method + config, code and library versions."""
    import peft
    import transformers

    from deltaserve.plugins.fingerprint import fingerprint

    return stable_hash(
        {
            "tune_version": TUNE_VERSION,
            "base": fingerprint(base_dir),
            "data": tree_hash(task_dir),
            "general": tree_hash(general_dir) if general_dir is not None else "embedded-world",
            "method": method,
            "name": name,
            "config": asdict(config),
            "code": _code_hash(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
        }
    )


def cached_delta(
    base_dir: str | Path,
    task: str | Path,
    method: str,
    steps: int | None = None,
    seed: int = 0,
    *,
    config: TuneConfig | None = None,
    name: str | None = None,
    general_dir: str | Path | None = None,
    progress: bool = True,
) -> Path:
    """The bundle of ``method`` tuned on ``task`` (a task directory, or an embedded-world downstream task
    name such as ``"digits"``), tuned once and kept under ``cache_dir()/deltas/<key>/bundle``.

    A second call with the same inputs (see :func:`delta_key`) is a directory lookup.
    ``tune.json`` beside the bundle holds the run's metrics and timings.
    """
    config = config or TuneConfig()
    config = replace(config, seed=seed, **({"steps": steps} if steps is not None else {}))
    get_method(method)
    task_dir = Path(task) if Path(task).is_dir() else world_task_dir(str(task))
    name = name or data.read_task_info(task_dir).name
    key = delta_key(Path(base_dir), task_dir, method, config, name, Path(general_dir) if general_dir else None)
    final = env.cache_dir() / "deltas" / key[:32]
    if (final / "tune.json").is_file():
        return final / "bundle"
    with atomic_dir(final, exist_ok=True) as tmp:
        result = tune(
            base_dir, task_dir, method, tmp / "bundle", config, name=name, general_dir=general_dir, progress=progress
        )
        summary = {
            "method": method,
            "metrics": result.metrics,
            "stats": result.stats,
            "seconds": result.seconds,
            "step_seconds": result.step_seconds,
            "key": key,
        }
        (tmp / "tune.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    return final / "bundle"


__all__ = [
    "METHODS",
    "TuneConfig",
    "TuneError",
    "TuneResult",
    "cached_delta",
    "evaluate_bundle",
    "tune",
]
