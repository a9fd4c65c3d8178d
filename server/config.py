"""Configuration of the engine and the server (one dataclass each; every field documented).

CPU defaults: the KV cache is sized explicitly (``kv_cache_memory_bytes``) because
vLLM-CPU otherwise reserves ``gpu_memory_utilization`` × the RAM of NUMA node 0 and
refuses to start when that much is not free (on these machines node 0 has only 7.5 GiB).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

MiB = 1024 * 1024


@dataclass
class EngineConfig:
    """Knobs of the vLLM ``AsyncLLM`` engine (names follow vLLM's engine arguments)."""

    model: str
    """Base model directory (transformers layout, LLaVA architecture)."""
    served_model_name: str | None = None
    """Name clients use for the untouched base model; default: the directory name."""
    dtype: str = "float32"
    """Weights/activations dtype. float32 keeps vLLM token-exact with the PyTorch references."""
    max_model_len: int | None = None
    """Longest prompt + completion in tokens; default: the model's ``max_position_embeddings``."""
    max_num_seqs: int = 64
    """Most sequences in one engine step (the batch)."""
    enable_lora: bool = True
    """Multi-LoRA: LoRA deltas ride in the same batch as base traffic. (On CPU vLLM then runs eager.)"""
    max_loras: int = 4
    """Distinct LoRA adapters usable within one batch."""
    max_lora_rank: int = 16
    """Largest LoRA rank accepted (vLLM allows 1, 8, 16, 32, 64, 128, 256, 320, 512)."""
    max_cpu_loras: int | None = None
    """LoRA adapters kept loaded (LRU); default: ``max(max_loras, 16)``."""
    kv_cache_memory_bytes: int | None = 512 * MiB
    """KV cache size. ``None`` falls back to ``gpu_memory_utilization`` (vLLM's default sizing)."""
    gpu_memory_utilization: float = 0.4
    """Fraction of (GPU, or on CPU NUMA-node) memory vLLM may use when ``kv_cache_memory_bytes`` is None."""
    enforce_eager: bool = False
    """Disable torch.compile (vLLM compiles the decoder even on CPU unless LoRA is enabled)."""
    seed: int = 0
    """Seed of vLLM's samplers (sampling requests without their own seed)."""
    exclusive_deltas: bool = True
    """Load deltaserve's worker extension, which serves plan kinds (sparse, bottleneck, …): in the shared
    batch, or as exclusive engine states."""
    tensor_parallel_size: int = 1
    """Workers the model is sharded over (vLLM's ``tensor_parallel_size``). Every delta kind is served sharded:
    each worker applies its piece (:mod:`deltaserve.server.worker_patches`)."""
    concurrent_delta_budget_bytes: int = 256 * MiB
    """Largest resident size (updated weights, adapters) of a plan delta served in the shared batch; a
    larger one is served as an exclusive engine state (0: every plan delta exclusive)."""
    engine_spin_ms: float | None = None
    """How long the engine core and its workers busy-wait on vLLM's shared-memory queues after each message
    before sleeping on a socket. vLLM spins for 1 s, which keeps the two engine processes on two cores whenever
    traffic flows; on a machine with few cores that starves the server's event loop (the front end): measured
    on 2 cores, gRPC went from 0.385× to 0.961× the ``AsyncLLM`` called directly on base traffic
    (``bench/serving.py``, ``docs/serving-bench.md``).
    ``None``: 1 ms on CPU, vLLM's 1 s on GPU (where it was not measured); a number: that many ms everywhere."""
    disable_log_stats: bool = False
    """vLLM's own Prometheus metrics need stats on."""

    @property
    def name(self) -> str:
        return self.served_model_name or Path(self.model).name


@dataclass
class ServeConfig:
    """``deltaserve serve``: one engine, both front ends, one delta store."""

    engine: EngineConfig
    store: Path
    """Directory of the persisted delta registry (created)."""
    store_url: str | None = None
    """Engine replicas only: ``s3://bucket/prefix`` the store is published to and the replicas read from
    (:mod:`deltaserve.server.object_store`); None: the replicas read ``store`` itself (shared storage)."""
    host: str = "127.0.0.1"
    grpc_port: int = 50051
    """0 picks a free port (reported on stdout and in ``<store>/server.json``)."""
    http_port: int = 8000
    """0 picks a free port."""
    admin_token: str | None = None
    """When set, registry mutations need ``Authorization: Bearer <token>`` (gRPC metadata or HTTP header)."""
    grace_period_s: float = 30.0
    """On SIGTERM: stop accepting, let in-flight requests finish for at most this long, then abort them."""
    default_max_tokens: int = 64
    """``max_tokens`` when a request leaves it unset."""
    max_tokens_limit: int = 1024
    """Largest ``max_tokens`` a request may ask for (also capped by the model length)."""
    max_image_bytes: int = 8 * MiB
    """Largest encoded image accepted."""
    max_image_pixels: int = 4096 * 4096
    """Largest decoded image (width × height) accepted: guards against decompression bombs."""
    max_bundle_bytes: int = 512 * MiB
    """Largest delta bundle accepted by ``Register`` (all files together)."""
    router: str = "auto"
    """Router used when a request names no task or ``auto`` (entry point group ``deltaserve.routers``)."""
    extra: dict = field(default_factory=dict)
    """Router/scheduler options (``--router-opt key=value``)."""
