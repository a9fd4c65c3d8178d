"""Sentence embeddings for the auto router, all offline.

``load_text_embedder(spec)``:

- ``"wordllama"`` (default) — WordLlama's ``l2_supercat`` 256-d static token embeddings
  (distilled from the input embeddings of several LLMs, MIT licence), which the
  ``wordllama`` wheel ships inside itself: 16 MB, no download, ≈ 0.03 ms per prompt on a
  CPU core. Read straight from the wheel's files, so no code path can reach for the hub.
- a **directory** in sentence-transformers layout (``modules.json``, the transformer's
  ``config.json`` + weights, pooling config) — a user's own model, e.g. a multilingual
  one, loaded with the ``sentence-transformers`` library, ``local_files_only``.
- ``"none"`` — no embedding: the router's character n-grams alone.

Every embedder returns L2-normalised float32 rows ``[n, dim]``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

from deltaserve.server.vision_features import unit


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
    """A local sentence-transformers model directory (never downloads)."""

    def __init__(self, path: str | Path):
        path = Path(path)
        if not (path / "modules.json").is_file():
            raise ValueError(f"`{path}` is not a sentence-transformers model directory (no modules.json)")
        from sentence_transformers import SentenceTransformer

        self.name = f"sentence-transformers:{path.name}"
        self._model = SentenceTransformer(str(path), device="cpu", local_files_only=True)

    def __call__(self, texts: list[str]) -> np.ndarray:
        out = self._model.encode(list(texts), convert_to_numpy=True, normalize_embeddings=True, show_progress_bar=False)
        return out.astype(np.float32)


def load_text_embedder(spec: str) -> TextEmbedder | None:
    """``"wordllama"``, ``"none"`` (None) or a sentence-transformers directory."""
    if spec == "none":
        return None
    if spec == "wordllama":
        return WordLlamaEmbedder()
    if Path(spec).is_dir():
        return SentenceTransformerEmbedder(spec)
    raise ValueError(
        f"router option `embedder` must be `wordllama`, `none` or a sentence-transformers model directory; got {spec!r}"
    )
