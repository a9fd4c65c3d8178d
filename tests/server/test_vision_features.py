"""The routers' image features come from the base's own vision tower, on every architecture family."""

from __future__ import annotations

import numpy as np
import pytest


def _reference(base_dir, images):
    """The same pooling computed on the tower inside transformers' whole model (the weights the base serves)."""
    import torch
    from transformers import AutoConfig, AutoProcessor

    from deltaserve.plugins.families import family_of

    config = AutoConfig.from_pretrained(str(base_dir))
    model = family_of(config).model_cls().from_pretrained(str(base_dir), dtype=torch.float32).eval()
    inputs = AutoProcessor.from_pretrained(str(base_dir)).image_processor(images=images, return_tensors="pt")
    tower = model.get_submodule(family_of(config).vision_tower.rstrip("."))
    with torch.no_grad():
        if "image_grid_thw" in inputs:
            grid = inputs["image_grid_thw"]
            hidden = tower(inputs["pixel_values"], grid_thw=grid).last_hidden_state
            return torch.stack([p.mean(0) for p in hidden.split(grid.prod(-1).tolist())]).numpy()
        states = tower(pixel_values=inputs["pixel_values"], output_hidden_states=True).hidden_states
        return states[config.vision_feature_layer][:, 1:].mean(1).numpy()


@pytest.mark.parametrize("base", ["tiny_base", "tiny_qwen_base"])
def test_features_are_the_bases_own_tower_pooled_per_image(base, request, sample_images):
    from deltaserve.server.vision_features import VisionEncoder

    base_dir = request.getfixturevalue(base)
    assert VisionEncoder.supports(base_dir)
    features = VisionEncoder(base_dir)(sample_images)
    assert features.shape[0] == len(sample_images)
    np.testing.assert_allclose(features, _reference(base_dir, sample_images), rtol=1e-5, atol=1e-6)
    # one vector per image, and different images give different vectors
    assert len({tuple(np.round(f, 5)) for f in features}) == len(sample_images)
    # per image, not per batch: an image alone gives the vector it gets in the batch
    np.testing.assert_allclose(VisionEncoder(base_dir)(sample_images[1:2])[0], features[1], rtol=1e-5, atol=1e-6)
