"""Image features for routers: the base's own vision tower, pooled to one vector per image.

Routers must not load a second vision model (no model hub here, and the base already has
one): the tower the base feeds its projector is read from the base checkpoint.
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
    """The base's own vision tower (weights from the base checkpoint), pooled to one vector per image.

    Architecture-neutral: the tower's class is the one the base's transformers model builds at its
    family's ``vision_tower`` (:mod:`deltaserve.plugins.families`), its weights the checkpoint tensors
    under that prefix. Pooling follows the processor's output: one image per row with a class token
    (LLaVA's CLIP: the mean of the patch states at ``vision_feature_layer``, CLS dropped, as LLaVA's
    "default" strategy), or every image's patches flattened with ``image_grid_thw`` (Qwen2-VL: the mean
    of each image's patch states before the merger).
    """

    @staticmethod
    def supports(base_dir: str | Path) -> bool:
        """Whether the base has a vision tower of a known family (else routers route on words alone)."""
        from transformers import AutoConfig

        from deltaserve.plugins.families import family_of

        config = AutoConfig.from_pretrained(str(base_dir))
        try:
            family_of(config)
        except ValueError:
            return False
        return getattr(config, "vision_config", None) is not None

    def __init__(self, base_dir: str | Path):
        import torch
        from safetensors import safe_open
        from transformers import AutoConfig, AutoProcessor

        from deltaserve.plugins.families import family_of

        config = AutoConfig.from_pretrained(str(base_dir))
        family = family_of(config)
        with torch.device("meta"):  # only to learn the tower's class: nothing is allocated
            skeleton = family.model_cls()._from_config(config)
        tower_cls = type(skeleton.get_submodule(family.vision_tower.rstrip(".")))
        self.layer = getattr(config, "vision_feature_layer", -2)
        self.model = tower_cls._from_config(config.vision_config).eval()
        expected = set(self.model.state_dict())
        state = {}
        for file in sorted(Path(base_dir).glob("*.safetensors")):
            with safe_open(str(file), "pt") as f:
                for key in f.keys():
                    module = family.to_module(key)
                    if module.startswith(family.vision_tower):
                        name = module.removeprefix(family.vision_tower)
                        if name not in expected:  # transformers 5's CLIPVisionModel may lack the `vision_model.` level
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
            inputs = self.processor(images=images, return_tensors="pt")
            grid = inputs.get("image_grid_thw")
            if grid is not None:  # every image's patches, flattened and concatenated
                hidden = self.model(inputs["pixel_values"], grid_thw=grid).last_hidden_state
                parts = hidden.split(grid.prod(-1).tolist())
                return self._torch.stack([part.mean(0) for part in parts]).numpy()
            hidden = self.model(pixel_values=inputs["pixel_values"], output_hidden_states=True).hidden_states[
                self.layer
            ]  # [n, 1 + patches, d]
            return hidden[:, 1:].mean(1).numpy()  # drop CLS, as LLaVA's "default" strategy does


def unit(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero)."""
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.where(norm == 0, 1.0, norm)
