"""Scoring: batched greedy generation, normalised exact match and token F1.

``general_score`` is the mean score over the general (open-world) tasks' test splits,
each by the metric its ``task.json`` names (exact match, except the embedded world's
``caption``: token F1) — what fine-tuning must not destroy; downstream tasks score the expert.
``token_f1`` (SQuAD-style bag-of-words F1 of the normalised answer) is reported
beside it: partial credit for long answers such as captions.
"""

from __future__ import annotations

import string
from collections import Counter

import torch

from deltaserve.tuning.batching import Encoded, collate, encode
from deltaserve.tuning.data import Sample

_TRAILING = string.punctuation + string.whitespace
_ANSWER_MARGIN = 4  # tokens beyond the longest target, so "Red." still decodes fully


def normalize(text: str) -> str:
    """Strip, lower-case, collapse whitespace, drop trailing punctuation: ``" Red circle. "`` → ``"red circle"``."""
    return " ".join(text.strip().lower().split()).rstrip(_TRAILING)


def token_f1(prediction: str, target: str) -> float:
    """Bag-of-words F1 of the normalised strings (commas count as separators): 1.0 iff the words match as multisets."""
    pred, gold = (normalize(t).replace(",", " ").split() for t in (prediction, target))
    common = sum((Counter(pred) & Counter(gold)).values())
    if not pred or not gold or not common:
        return float(pred == gold)
    precision, recall = common / len(pred), common / len(gold)
    return 2 * precision * recall / (precision + recall)


@torch.no_grad()
def generate(model, processor, items: list[Encoded], max_new_tokens: int, batch_size: int = 64) -> list[str]:
    """Greedy answers (decoded up to EOS, special tokens dropped), in the order of ``items``."""
    tokenizer = processor.tokenizer
    order = sorted(range(len(items)), key=lambda i: len(items[i].prompt_ids))  # similar lengths share a batch
    answers: list[str] = [""] * len(items)
    model.eval()
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        batch = collate([items[i] for i in chunk], tokenizer.pad_token_id, with_targets=False)
        out = model.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        new = out[:, batch["input_ids"].shape[1] :]  # [batch, generated]
        for row, i in zip(new.tolist(), chunk):
            if tokenizer.eos_token_id in row:
                row = row[: row.index(tokenizer.eos_token_id)]
            answers[i] = tokenizer.decode(row, skip_special_tokens=True)
    return answers


def evaluate(
    model,
    processor,
    samples: list[Sample] | list[Encoded],
    max_new_tokens: int | None = None,
    batch_size: int = 64,
    return_predictions: bool = False,
) -> dict:
    """``{"exact_match": mean normalised exact match, "token_f1": mean token F1, "n": len(samples)}``
    (+ ``"predictions"`` on request).

    ``max_new_tokens`` defaults to the longest target's token count plus a margin: a longer
    answer can never match.
    """
    items = (
        [s for s in samples if isinstance(s, Encoded)]
        if samples and isinstance(samples[0], Encoded)
        else encode(processor, samples)
    )
    if not items:
        return {"exact_match": 0.0, "token_f1": 0.0, "n": 0}
    if max_new_tokens is None:
        max_new_tokens = max(len(e.target_ids) for e in items) + _ANSWER_MARGIN
    predictions = generate(model, processor, items, max_new_tokens, batch_size)
    hits = [normalize(p) == normalize(e.sample.target) for p, e in zip(predictions, items)]
    f1 = [token_f1(p, e.sample.target) for p, e in zip(predictions, items)]
    result = {"exact_match": sum(hits) / len(hits), "token_f1": sum(f1) / len(f1), "n": len(hits)}
    if return_predictions:
        result["predictions"] = predictions
    return result


def evaluate_tasks(
    model,
    processor,
    tasks: dict[str, list[Sample] | list[Encoded]],
    details: bool = False,
    metrics: dict[str, str] | None = None,
    **kwargs,
) -> dict:
    """Score per task name: its metric from ``metrics`` (task name → ``"exact_match"`` or ``"token_f1"``,
    as in ``task.json``; exact match when absent). With ``details``, each task's whole :func:`evaluate`
    result instead, plus ``"score"``."""
    metrics = metrics or {}
    results = {name: evaluate(model, processor, samples, **kwargs) for name, samples in sorted(tasks.items())}
    for name, r in results.items():
        r["score"] = r[metrics.get(name, "exact_match")]
    return results if details else {name: r["score"] for name, r in results.items()}


def general_score(scores: dict[str, float]) -> float:
    """Mean of per-task scores (pass the general tasks' test scores)."""
    return sum(scores.values()) / len(scores) if scores else 0.0
