"""The shared training loop every tuning method runs (pretraining, full fine-tuning, SPIDER, …).

A method differs from plain fine-tuning only in *which parameters train* and *what happens
around the optimizer step*; both are :class:`TrainHooks`. The loop::

    params = hooks.trainable(model)              # others get requires_grad=False
    hooks.on_start(model, params)
    for step in range(config.steps):
        loss = model(**batch).loss               # loss on target tokens only
        loss.backward()
        hooks.after_backward(step, model, params)   # e.g. mask gradients
        clip, optimizer.step(), scheduler.step()
        hooks.after_step(step, model, params)       # e.g. SPIDER's importance-aware allocation
        optimizer.zero_grad()
    hooks.on_end(model, params)

``after_step`` still sees the step's gradients (they are cleared afterwards).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from deltaserve.tuning.batching import BatchStream, Encoded, collate

NamedParams = list[tuple[str, torch.nn.Parameter]]


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation hyper-parameters (AdamW, linear warm-up then cosine decay)."""

    steps: int = 300
    """Optimizer steps."""
    batch_size: int = 32
    lr: float = 1e-3
    """Peak learning rate."""
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1
    """The cosine decays to ``lr * min_lr_ratio`` at the last step."""
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.98)
    grad_clip: float | None = 1.0
    """Max global gradient norm; None disables clipping."""
    seed: int = 0
    """Seeds the batch order (and torch's RNG for anything stochastic in the model)."""
    balance_tasks: bool = False
    """Draw tasks uniformly instead of samples uniformly (for multi-task data)."""
    lr_multipliers: tuple[tuple[str, float], ...] = ()
    """``(name prefix, factor)`` pairs: parameters whose module name starts with a prefix train at
    ``lr * factor`` (first match wins), e.g. ``((family.vision_tower, 3.0),)``."""


class TrainHooks:
    """Extension points of :func:`train`; the defaults are plain full fine-tuning of every parameter."""

    def trainable(self, model: torch.nn.Module) -> NamedParams:
        """The parameters to optimise (module names). All others are frozen for the run."""
        return list(model.named_parameters())

    def on_start(self, model: torch.nn.Module, params: NamedParams) -> None:
        """Before the first step, e.g. to keep a copy of the initial weights."""

    def after_backward(self, step: int, model: torch.nn.Module, params: NamedParams) -> None:
        """Gradients are ready, before clipping and the optimizer step."""

    def after_step(self, step: int, model: torch.nn.Module, params: NamedParams) -> None:
        """Weights were just updated by the optimizer (gradients still present)."""

    def on_end(self, model: torch.nn.Module, params: NamedParams) -> None:
        """After the last step."""


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)
    """Mean target-token loss of every step."""
    seconds: float = 0.0
    trainable_parameters: int = 0


def lr_factor(step: int, config: TrainConfig) -> float:
    """Multiplier of the peak LR at ``step`` (0-based)."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    span = max(1, config.steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _param_groups(params: NamedParams, config: TrainConfig) -> list[dict]:
    factors: dict[float, list[torch.nn.Parameter]] = {}
    for name, p in params:
        factor = next((f for prefix, f in config.lr_multipliers if name.startswith(prefix)), 1.0)
        factors.setdefault(factor, []).append(p)
    return [{"params": ps, "lr": config.lr * f} for f, ps in factors.items()]


def train(
    model: torch.nn.Module,
    processor,
    items: list[Encoded],
    config: TrainConfig,
    hooks: TrainHooks | None = None,
    progress: bool = True,
    desc: str = "train",
) -> TrainResult:
    """Train ``model`` in place on encoded samples (see :func:`deltaserve.tuning.batching.encode`)."""
    hooks = hooks or TrainHooks()
    torch.manual_seed(config.seed)
    params = hooks.trainable(model)
    if not params:
        raise ValueError("no trainable parameters")
    chosen = {id(p) for _, p in params}
    for p in model.parameters():
        p.requires_grad_(id(p) in chosen)
    tensors = [p for _, p in params]
    optimizer = torch.optim.AdamW(
        _param_groups(params, config), lr=config.lr, betas=config.betas, weight_decay=config.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, config))
    stream = BatchStream(items, config.batch_size, seed=config.seed, balance_tasks=config.balance_tasks)
    pad_id = processor.tokenizer.pad_token_id
    result = TrainResult(trainable_parameters=sum(p.numel() for p in tensors))
    started = time.perf_counter()
    model.train()
    hooks.on_start(model, params)
    bar = tqdm(range(config.steps), desc=desc, disable=not progress, dynamic_ncols=True, mininterval=1.0)
    for step in bar:
        batch = collate(next(stream), pad_id)
        loss = model(**batch).loss
        loss.backward()
        hooks.after_backward(step, model, params)
        if config.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(tensors, config.grad_clip)
        optimizer.step()
        scheduler.step()
        hooks.after_step(step, model, params)
        optimizer.zero_grad(set_to_none=True)
        result.losses.append(loss.item())
        if step % 10 == 0 or step == config.steps - 1:
            bar.set_postfix(loss=f"{sum(result.losses[-10:]) / len(result.losses[-10:]):.3f}", refresh=False)
    hooks.on_end(model, params)
    model.eval()
    result.seconds = time.perf_counter() - started
    return result
