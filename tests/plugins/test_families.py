"""The Qwen2.5-VL family entry: checkpoint names in the Hub layout of the published checkpoints.

A tiny random ``Qwen2_5_VLForConditionalGeneration`` is written under the family's checkpoint names
(``visual.*``, ``model.*``, ``lm_head.*``, as ``Qwen/Qwen2.5-VL-7B-Instruct`` names its tensors) and read
back by transformers (its own conversion maps that layout onto its module tree) and by vLLM's weight mapper
for the model; the tuning scope the family declares is the patch merger plus the last decoder layers.
"""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def tiny_qwen25():
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    config = Qwen2_5_VLConfig(
        text_config=dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=256,
            max_position_embeddings=512,
            rope_scaling={"rope_type": "default", "mrope_section": [2, 3, 3]},
        ),
        vision_config=dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=64,
            patch_size=8,
            spatial_merge_size=2,
            temporal_patch_size=2,
            fullatt_block_indexes=[1],
        ),
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def test_names_are_the_hub_layout_and_round_trip(tiny_qwen25):
    from deltaserve.plugins.families import QWEN2_5_VL, family_of

    assert family_of(tiny_qwen25) is QWEN2_5_VL
    names = [n for n, _ in tiny_qwen25.named_parameters()]
    ckpt = [QWEN2_5_VL.to_checkpoint(n) for n in names]
    assert all(
        c.startswith(("visual.", "model.layers.", "model.embed_tokens.", "model.norm.", "lm_head.")) for c in ckpt
    )
    assert [QWEN2_5_VL.to_module(c) for c in ckpt] == names
    assert QWEN2_5_VL.decoder_layers_checkpoint == "model.layers."
    assert QWEN2_5_VL.to_checkpoint(QWEN2_5_VL.projector) == "visual.merger."


def test_transformers_loads_the_hub_layout(tiny_qwen25, tmp_path):
    from safetensors.torch import save_file
    from transformers import Qwen2_5_VLForConditionalGeneration

    from deltaserve.plugins.families import QWEN2_5_VL

    tiny_qwen25.config.save_pretrained(tmp_path)
    state = {QWEN2_5_VL.to_checkpoint(k): v.contiguous() for k, v in tiny_qwen25.state_dict().items()}
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    loaded, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        str(tmp_path), dtype=torch.float32, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ours = tiny_qwen25.state_dict()
    assert all(torch.equal(v, ours[k]) for k, v in loaded.state_dict().items())


def test_vllm_maps_every_checkpoint_name(tiny_qwen25):
    from vllm.model_executor.models.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration

    from deltaserve.plugins.families import QWEN2_5_VL

    mapper = Qwen2_5_VLForConditionalGeneration.hf_to_vllm_mapper
    for name, _ in tiny_qwen25.named_parameters():
        mapped = mapper.map_name(QWEN2_5_VL.to_checkpoint(name))
        assert mapped is not None and mapped.startswith(("visual.", "language_model.model.", "language_model.lm_head."))


def test_tuning_scope_is_the_merger_and_the_last_layers(tiny_qwen25):
    from deltaserve.tuning.methods.scope import Scope

    names = {n for n, _ in Scope(last_n_layers=2).parameters(tiny_qwen25)}
    assert {n.split(".layers.")[1].split(".")[0] for n in names if ".layers." in n} == {"1", "2"}
    assert {n for n in names if "visual" in n} == {
        n for n, _ in tiny_qwen25.named_parameters() if n.startswith("model.visual.merger.")
    }
    linears = Scope(last_n_layers=2).decoder_linears(tiny_qwen25, ("q_proj", "down_proj"))
    assert len(linears) == 4


def test_a_bases_layout_is_read_from_its_tensor_names(tiny_qwen_base, tiny_qwen_hub_base):
    """Qwen2-VL bases come in two layouts (the published checkpoints' ``visual.*`` / ``model.*``, and transformers
    5.x's nested names): the family answers in the layout of the base at hand."""
    from transformers import AutoConfig

    from deltaserve.plugins.base_spec import BaseSpec
    from deltaserve.plugins.families import QWEN2_VL, family_of

    nested_spec, hub_spec = BaseSpec.from_dir(tiny_qwen_base), BaseSpec.from_dir(tiny_qwen_hub_base)
    nested, hub = nested_spec.family, hub_spec.family
    assert nested == QWEN2_VL and nested.decoder_layers_checkpoint == "model.language_model.layers."
    assert hub.decoder_layers_checkpoint == "model.layers." and hub.language_model == "model."
    assert hub.to_checkpoint(QWEN2_VL.projector) == "visual.merger."
    assert set(hub_spec.params) == {hub.to_checkpoint(n) for n in nested_spec.params}
    assert all(hub.to_module(hub.to_checkpoint(n)) == n for n in nested_spec.params)
    assert family_of(AutoConfig.from_pretrained(str(tiny_qwen_hub_base))) == hub  # the directory it was loaded from
    assert family_of({"model_type": "qwen2_vl"}) is QWEN2_VL  # nothing to read: the default layout
