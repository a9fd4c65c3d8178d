"""The `bottleneck` delta kind (additive adapters on module outputs)."""

from deltaserve.plugins.bottleneck.adapter import ACTIVATIONS, BottleneckAdapter, attach_adapters
from deltaserve.plugins.bottleneck.kind import ADAPTER_FILE, BottleneckKind
from deltaserve.plugins.bottleneck.writer import write_bottleneck_bundle

__all__ = [
    "ACTIVATIONS",
    "ADAPTER_FILE",
    "BottleneckAdapter",
    "BottleneckKind",
    "attach_adapters",
    "write_bottleneck_bundle",
]
