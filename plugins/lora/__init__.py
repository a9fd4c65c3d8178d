"""The `lora` delta kind (PEFT LoRA adapters; bundles are also PEFT adapter directories)."""

from deltaserve.plugins.lora.adapter_config import ADAPTER_CONFIG, ADAPTER_WEIGHTS, peft_key
from deltaserve.plugins.lora.kind import LoraKind
from deltaserve.plugins.lora.writer import import_peft_adapter, write_lora_bundle

__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "LoraKind", "import_peft_adapter", "peft_key", "write_lora_bundle"]
