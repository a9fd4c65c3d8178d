"""Image features for routers: the base's own vision tower, pooled to one vector per image.

Routers must not load a second vision model (no model hub here, and the base already has
one): the CLIP tower LLaVA feeds its projector is read from the base checkpoint.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np


@contextlib.contextmanager
def one_torch_thread():
    """Torch on one thread for a small per-request forward: on a loaded 2-core machine the intra-op
    pool's synchronisation made the vision tower's ≈ 1 ms forward take ≈ 170 ms (measured)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class VisionEncoder:
    """The base's CLIP vision tower (weights from the base checkpoint), pooled to one vector per image."""

    @staticmethod
    def supports(base_dir: str | Path) -> bool:
        """Whether the base's vision tower is one this encoder reads (CLIP: LLaVA). Others (Qwen2-VL's ViT) give
        routers no image features: they route on words alone."""
        from transformers import AutoConfig

        vision = getattr(AutoConfig.from_pretrained(str(base_dir)), "vision_config", None)
        return getattr(vision, "model_type", None) == "clip_vision_model"

    def __init__(self, base_dir: str | Path):
        import torch
        from safetensors import safe_open
        from transformers import AutoConfig, AutoProcessor, CLIPVisionModel

        config = AutoConfig.from_pretrained(str(base_dir))
        self.layer = getattr(config, "vision_feature_layer", -2)
        self.model = CLIPVisionModel(config.vision_config).eval()
        expected = set(self.model.state_dict())
        state = {}
        for file in sorted(Path(base_dir).glob("*.safetensors")):
            with safe_open(str(file), "pt") as f:
                for key in f.keys():
                    if key.startswith("vision_tower."):
                        # Hub layout `vision_tower.vision_model.…`; transformers 5's CLIPVisionModel has no `vision_model.` level.
                        name = key.removeprefix("vision_tower.")
                        if name not in expected:
                            name = name.removeprefix("vision_model.")
                        state[name] = f.get_tensor(key)
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        if unexpected or any(not k.endswith("position_ids") for k in missing):
            raise RuntimeError(f"vision tower weights do not match: missing {missing}, unexpected {unexpected}")
        self.processor = AutoProcessor.from_pretrained(str(base_dir)).image_processor
        self._torch = torch

    def __call__(self, images: list) -> np.ndarray:
        """``[len(images), d]`` mean-pooled features (not normalised)."""
        with one_torch_thread(), self._torch.no_grad():
            pixels = self.processor(images=images, return_tensors="pt")["pixel_values"]
            hidden = self.model(pixel_values=pixels, output_hidden_states=True).hidden_states[
                self.layer
            ]  # [n, 1 + patches, d]
            return hidden[:, 1:].mean(1).numpy()  # drop CLS, as LLaVA's "default" strategy does


def unit(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero)."""
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.where(norm == 0, 1.0, norm)
