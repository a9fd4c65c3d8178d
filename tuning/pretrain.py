"""Pretrain the embedded default base on the world's general tasks (``deltaserve base pretrain``).

Every parameter trains — the vision tower starts random too. The result is cached under
``cache_dir()/bases/<key>``, where the key hashes everything that determines the weights:
the base sizes, the seed, the world's key (version, sizes, generator code), the training
hyper-parameters, the code of the data/training/evaluation path and the torch/transformers
versions. A second run with the same inputs is a directory lookup.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from deltaserve.plugins.families import family_named
from deltaserve.plugins import env
from deltaserve.tuning import augment, batching, data, evaluate, train
from deltaserve.tuning.base import factory, tokenizer
from deltaserve.tuning.cache import atomic_dir, source_hash, stable_hash, tree_hash
from deltaserve.tuning.world import GENERAL_TASKS, WorldConfig, cached_world, world_key

PRETRAIN_VERSION = 1
META_FILE = "deltaserve-base.json"
OPEN_WORLD_FILE = "deltaserve-open-world.json"
"""``{"examples": [{"text": prompt, "image": "deltaserve-open-world/N.png" | null}, ...]}``: training
prompts of the base's general tasks, read by the server's auto router as examples of what the
base itself handles (the open world)."""
OPEN_WORLD_EXAMPLES = 24


@dataclass(frozen=True)
class PretrainConfig:
    """Everything that determines the pretrained weights (all of it is in the cache key)."""

    seed: int = 0
    """Seeds the random initialisation and the batch order (not the data: see ``world``)."""
    steps: int = 2000
    batch_size: int = 32
    lr: float = 1e-3
    """Peak learning rate of every part. 3e-3 (the first default) left the vision path unused:
    colour and position stayed at chance (see docs/base-ablation.md)."""
    warmup_steps: int = 100
    min_lr_ratio: float = 0.05
    weight_decay: float = 0.0
    vision_lr_scale: float = 1.0
    """Learning-rate factor of the vision tower (relative to ``lr``)."""
    projector_lr_scale: float = 1.0
    """Learning-rate factor of the vision→language projector."""
    augment_copies: int = 0
    """Reworded copies of every training prompt (:mod:`deltaserve.tuning.augment`), for phrasings never seen."""
    numerals: bool = False
    """Also train on :func:`numeral_samples` (text only, not scored): a base that writes numerals, as any
    real LLM does. Without them the numeral tokens are never a target and their LM-head rows drift away
    from every hidden state, so an expert with the head frozen cannot answer ``"7"`` (docs/expert-ablation.md)."""
    numerals_task: str = "numerals"
    """The batch group of the numeral samples: their own (one batch slot in seven) or ``"arithmetic"`` (mixed
    into that task's cycle: the vision tasks keep their share of the batches)."""
    """Reworded copies of every training prompt (:mod:`deltaserve.tuning.augment`), for phrasings never seen."""
    initializer_range: float = 0.02
    """Init std for pretraining. The random-init base uses a wide 0.3 so that untrained outputs
    differ per prompt (see :class:`TinyBaseConfig`); trained from, that width slows learning."""
    base: factory.TinyBaseConfig | factory.TinyQwen2VLConfig = field(default_factory=factory.TinyBaseConfig)
    """The tiny base's sizes; their class picks the architecture (``TinyQwen2VLConfig``: a Qwen2-VL base)."""
    world: WorldConfig = field(default_factory=WorldConfig)
    """Fixed (seed 0) by default: the tasks users evaluate on must be the ones whose test
    splits the base never trained on."""

    def train_config(self) -> train.TrainConfig:
        return train.TrainConfig(
            steps=self.steps,
            batch_size=self.batch_size,
            lr=self.lr,
            warmup_steps=min(self.warmup_steps, max(1, self.steps // 10)),
            min_lr_ratio=self.min_lr_ratio,
            weight_decay=self.weight_decay,
            seed=self.seed,
            balance_tasks=True,
            lr_multipliers=(
                (self.family.vision_tower, self.vision_lr_scale),
                (self.family.projector, self.projector_lr_scale),
            ),
        )

    @property
    def arch(self) -> str:
        return factory.arch_of(self.base)

    @property
    def family(self):
        return family_named(self.arch)

    def base_config(self) -> factory.TinyBaseConfig | factory.TinyQwen2VLConfig:
        return replace(self.base, initializer_range=self.initializer_range)


@dataclass(frozen=True)
class PretrainResult:
    path: Path
    """The cached base directory (treat as read-only)."""
    cached: bool
    """True when nothing was trained in this call."""
    meta: dict
    """The contents of ``deltaserve-base.json``."""


NUMERAL_PROMPTS = (
    "Write {w} as a numeral.",
    "{W} in digits?",
    "What numeral stands for {w}?",
    "How do you write {w} with digits?",
)
WORD_PROMPTS = ("Write {n} as a word.", "{n} in words?", "What number word is {n}?", "How do you say {n}?")


def numeral_samples(task: str = "numerals") -> list[data.Sample]:
    """Number words to numerals and back (``"Write seven as a numeral."`` → ``"7"``), every pair in every phrasing."""
    from deltaserve.tuning.world.scenes import NUMBER_WORDS

    samples = []
    for n, word in enumerate(NUMBER_WORDS):
        for i, t in enumerate(NUMERAL_PROMPTS):
            prompt = t.format(w=word, W=word.capitalize())
            samples.append(data.Sample(f"numerals:{n}:{i}", prompt, str(n), None, task))
        for i, t in enumerate(WORD_PROMPTS):
            samples.append(data.Sample(f"words:{n}:{i}", t.format(n=n), word, None, task))
    return samples


def open_world_examples(tasks: dict[str, data.Task], n: int, seed: int) -> list[data.Sample]:
    """``n`` training samples of every general task (every phrasing represented, see :func:`data.pick_examples`)."""
    return [s for name in sorted(tasks) for s in data.pick_examples(tasks[name]["train"], n, seed)]


def write_open_world(path: Path, samples: list[data.Sample]) -> Path:
    """``path`` (see :data:`OPEN_WORLD_FILE`) with the samples' images as PNG files beside it."""
    images = path.with_suffix("")
    images.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, s in enumerate(samples):
        image = None
        if s.image is not None:
            image = f"{images.name}/{i:04d}.png"
            s.load_image().save(path.parent / image, format="PNG")
        rows.append({"text": s.prompt, "image": image})
    path.write_text(json.dumps({"examples": rows}, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def pretrain_key(config: PretrainConfig) -> str:
    import torch
    import transformers

    code = source_hash([augment, batching, data, evaluate, train, factory, tokenizer, sys.modules[__name__]])
    return stable_hash(
        {
            "pretrain_version": PRETRAIN_VERSION,
            "arch": config.arch,
            "config": asdict(config),
            "world": world_key(config.world, GENERAL_TASKS),
            "code": code,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        }
    )


def cached_base(config: PretrainConfig | None = None) -> Path | None:
    """The cached pretrained base for ``config``, or None when it was never built."""
    path = env.cache_dir() / "bases" / pretrain_key(config or PretrainConfig())[:32]
    return path if (path / META_FILE).is_file() else None


def train_base(config: PretrainConfig, progress: bool = True, eval_split: str = "test"):
    """Initialise and train the base for ``config``, uncached: ``(model, tokenizer, processor, meta)``.

    ``meta`` holds the scores on every general task's ``eval_split`` and the timings; :func:`pretrain`
    caches the result (test scores), ``bench/base_ablation.py`` compares configurations with it (``val``).
    """
    started = time.perf_counter()
    world_dir = cached_world(config.world, GENERAL_TASKS)
    tasks = data.load_tasks(world_dir, type="general")
    data_hash = stable_hash({name: tree_hash(task.info.path) for name, task in sorted(tasks.items())})
    base_cfg = config.base_config()
    tok, processor, model = factory.init_base(base_cfg, config.seed)
    samples = [s for task in tasks.values() for s in task["train"]]
    samples += augment.augmented(samples, config.augment_copies, config.seed)
    if config.numerals:
        samples += numeral_samples(config.numerals_task)
    items = batching.encode(processor, samples)
    prepared = time.perf_counter()
    result = train.train(model, processor, items, config.train_config(), progress=progress, desc="pretrain")
    trained = time.perf_counter()
    metrics = {name: task.info.metric for name, task in tasks.items()}
    details = evaluate.evaluate_tasks(
        model, processor, {name: task[eval_split] for name, task in tasks.items()}, details=True, metrics=metrics
    )
    scores = {name: d["score"] for name, d in details.items()}
    meta = {
        **({"arch": config.arch} if config.arch != "llava" else {}),
        "stage": "pretrained",
        "eval_split": eval_split,
        "general_score": round(evaluate.general_score(scores), 4),
        "scores": {name: round(score, 4) for name, score in scores.items()},
        "metrics": metrics,
        "exact_match": {name: round(d["exact_match"], 4) for name, d in details.items()},
        "token_f1": {name: round(d["token_f1"], 4) for name, d in details.items()},
        "data_hash": data_hash,
        "train_hash": pretrain_key(config),
        "seed": config.seed,
        "sizes": asdict(base_cfg),
        "pretrain": asdict(config),
        "final_loss": round(sum(result.losses[-50:]) / len(result.losses[-50:]), 4),
        "seconds": {
            "prepare": round(prepared - started, 1),
            "train": round(trained - prepared, 1),
            "evaluate": round(time.perf_counter() - trained, 1),
        },
    }
    return model, tok, processor, meta


def pretrain(config: PretrainConfig | None = None, progress: bool = True) -> PretrainResult:
    """Return the pretrained base for ``config``, training it first unless it is cached."""
    config = config or PretrainConfig()
    key = pretrain_key(config)
    final = env.cache_dir() / "bases" / key[:32]
    if (final / META_FILE).is_file():
        return PretrainResult(final, True, json.loads((final / META_FILE).read_text()))
    model, tok, processor, meta = train_base(config, progress)
    with atomic_dir(final, exist_ok=True) as tmp:
        factory.save_model_dir(model, tok, processor, tmp, meta)
        general = data.load_tasks(cached_world(config.world, GENERAL_TASKS), type="general", splits=("train",))
        write_open_world(tmp / OPEN_WORLD_FILE, open_world_examples(general, OPEN_WORLD_EXAMPLES, config.seed))
    return PretrainResult(final, False, json.loads((final / META_FILE).read_text()))
