"""The `lora` delta kind."""
