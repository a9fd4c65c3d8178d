"""LoRA interop: a plain PEFT adapter imports into a bundle; PEFT and our apply give identical logits."""

from __future__ import annotations

import json

import pytest
import torch

from deltaserve.plugins.bundle import read_bundle
from deltaserve.plugins.errors import BundleError
from deltaserve.plugins.lora import import_peft_adapter

TARGETS = r".*language_model.*\.(q_proj|v_proj)"  # the vision tower has q_proj/v_proj too (NOTES §7)


def load_model(tiny_base):
    from transformers import LlavaForConditionalGeneration

    return LlavaForConditionalGeneration.from_pretrained(str(tiny_base), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def peft_dir(tiny_base, tmp_path_factory):
    from peft import LoraConfig, get_peft_model

    out = tmp_path_factory.mktemp("peft") / "adapter"
    # init_lora_weights=False: PEFT's default leaves lora_B zero, i.e. no visible effect.
    config = LoraConfig(r=4, lora_alpha=16, target_modules=TARGETS, init_lora_weights=False)
    torch.manual_seed(5)
    get_peft_model(load_model(tiny_base), config).save_pretrained(str(out))
    return out


def test_import_validates_and_matches_peft(peft_dir, tmp_path, tiny_base, base_spec, prompt_inputs):
    bundle_dir = import_peft_adapter(
        peft_dir,
        tmp_path / "imported",
        name="imported",
        base=base_spec,
        description="from PEFT",
        examples=["Count the shapes."],
    )
    bundle = read_bundle(bundle_dir, base=base_spec)
    for name in ("adapter_config.json", "adapter_model.safetensors"):  # copied byte for byte
        assert (bundle_dir / name).read_bytes() == (peft_dir / name).read_bytes()
    assert not (bundle_dir / "README.md").exists()
    assert bundle.manifest.config["r"] == 4 and len(bundle.manifest.config["modules"]) == 8
    assert bundle.manifest.task.examples[0].text == "Count the shapes."

    inputs = prompt_inputs[0]
    model = load_model(tiny_base)
    with torch.no_grad():
        base_logits = model(**inputs).logits
        with bundle.kind.apply(model, bundle):
            ours = model(**inputs).logits

        from peft import PeftModel

        theirs = PeftModel.from_pretrained(load_model(tiny_base), str(bundle_dir)).eval()(**inputs).logits
    assert not torch.allclose(ours, base_logits)
    assert torch.equal(ours, theirs)


def test_import_refuses_pickled_adapters(peft_dir, tmp_path, base_spec):
    src = tmp_path / "pickled"
    src.mkdir()
    (src / "adapter_config.json").write_text((peft_dir / "adapter_config.json").read_text())
    (src / "adapter_model.bin").write_bytes(b"\x80\x04N.")
    with pytest.raises(BundleError, match="pickle-type file `adapter_model.bin` is not allowed"):
        import_peft_adapter(src, tmp_path / "out", name="x", base=base_spec)
    assert not (tmp_path / "out").exists()


def test_import_rejects_vision_targets(tiny_base, tmp_path, base_spec):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=2, lora_alpha=4, target_modules=["q_proj"], init_lora_weights=False
    )  # matches the vision tower too
    get_peft_model(load_model(tiny_base), config).save_pretrained(str(tmp_path / "src"))
    assert json.loads((tmp_path / "src" / "adapter_config.json").read_text())["target_modules"] == ["q_proj"]
    with pytest.raises(BundleError, match="is outside the language model's decoder layers") as info:
        import_peft_adapter(tmp_path / "src", tmp_path / "out", name="x", base=base_spec)
    assert len(info.value.problems) == 2  # the two vision layers; the decoder layers are fine


def test_write_from_a_live_peft_model(tiny_base, tmp_path, base_spec):
    """What the tuning trainer does: LoraConfig.to_dict() + get_peft_model_state_dict → bundle."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    from deltaserve.plugins.lora import write_lora_bundle

    config = LoraConfig(
        r=2, lora_alpha=4, target_modules=["model.language_model.layers.3.mlp.down_proj"], init_lora_weights=False
    )
    peft_model = get_peft_model(load_model(tiny_base), config)
    out = write_lora_bundle(
        tmp_path / "live", name="live", base=base_spec,
        adapter_config=peft_model.peft_config["default"].to_dict(), tensors=get_peft_model_state_dict(peft_model),
    )  # fmt: skip
    bundle = read_bundle(out, base=base_spec)
    assert bundle.manifest.config["modules"] == ["language_model.model.layers.3.mlp.down_proj"]
    assert json.loads((out / "adapter_config.json").read_text())["target_modules"] == [
        "model.language_model.layers.3.mlp.down_proj"
    ]
