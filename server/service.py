"""The serving core both front ends call: validate → route → schedule → generate, plus registry ops.

Front ends (gRPC, HTTP) translate their wire formats into
:class:`~deltaserve.server.requests.InferenceRequest` and back, and translate typed
errors into status codes; everything else happens here, once.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import hmac
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from deltaserve.server import metrics
from deltaserve.server.bindings import BASE_STATE
from deltaserve.server.config import ServeConfig
from deltaserve.server.engine import Chunk, Engine, GenerationInput, TokenLogprob
from deltaserve.server.errors import InvalidRequestError, NotFoundError, UnauthenticatedError, UnavailableError
from deltaserve.server.registry import DeltaRegistry, LiveDelta
from deltaserve.server.requests import InferenceRequest, PreparedRequest, prepare
from deltaserve.server.routing import ExplicitRouter, RouteDecision, RouteQuery, Router, TaskCard, load_router
from deltaserve.server.scheduler import SchedulerConfig, StateScheduler

log = logging.getLogger(__name__)

AUTO = "auto"
_OUTCOMES = {InvalidRequestError: "invalid", NotFoundError: "not_found", UnavailableError: "unavailable"}


@dataclass
class Routed:
    """First event of every generation: who serves it and why."""

    request_id: str
    expert: str
    """Task name, or the base model's name."""
    decision: RouteDecision
    prompt_tokens: int
    replica: dict | None = None
    """Which engine replica serves it, and whether it held the delta already (engine replicas on Ray Serve)."""


@dataclass
class Choice:
    """One whole completion of a request (``n`` of them per request)."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None
    logprobs: list[TokenLogprob] | None = None


class Generation:
    """A request past validation and routing: its decision (:attr:`routed`), then its output,
    either streamed (``async for chunk in generation``) or whole (:meth:`collect`).

    Both front ends get one from :meth:`DeltaService.submit`; they translate it into their wire
    format and nothing else. Closing it (or leaving the ``async for`` early) aborts the request in
    the engine.
    """

    def __init__(self, routed: Routed, events: AsyncIterator[Chunk], n: int, first: Chunk | None = None):
        self.routed = routed
        self.n = n
        self._events = events
        self._first = first

    async def __aiter__(self) -> AsyncIterator[Chunk]:
        try:
            if self._first is not None:
                yield self._first
            async for chunk in self._events:
                yield chunk
        finally:
            await self._events.aclose()

    async def aclose(self) -> None:
        await self._events.aclose()

    async def collect(self, chunks: AsyncIterator[Chunk] | None = None) -> list[Choice]:
        """Every choice whole (``chunks``: this generation's chunks through a wrapper, e.g. a disconnect watcher)."""
        choices = [Choice(i, "", [], None) for i in range(self.n)]
        texts: list[list[str]] = [[] for _ in range(self.n)]
        async for chunk in chunks if chunks is not None else self:
            c = choices[chunk.index]
            texts[chunk.index].append(chunk.text)
            c.token_ids.extend(chunk.token_ids)
            if chunk.logprobs is not None:
                c.logprobs = (c.logprobs or []) + chunk.logprobs
            if chunk.finished:
                c.finish_reason = chunk.finish_reason
        for c, text in zip(choices, texts):
            c.text = "".join(text)
        return choices


@dataclass(frozen=True)
class UploadLimits:
    max_bytes: int
    """Total bytes of a bundle's files."""
    max_files: int


class DeltaService:
    def __init__(self, config: ServeConfig, engine: Engine, registry: DeltaRegistry, worker=None):
        self.config = config
        self.engine = engine
        self.registry = registry
        self.worker = worker
        """:class:`~deltaserve.server.bindings.WorkerDeltas` when the worker extension is loaded."""
        switch = worker.switch if worker is not None else _base_only_switch
        self.scheduler = StateScheduler(switch, SchedulerConfig(**_scheduler_options(config.extra)))
        if worker is not None:
            worker.on_unstaged = self.scheduler.state_removed
        self.explicit_router = ExplicitRouter()
        self.auto_router: Router = load_router(
            config.router, _router_options(config.extra), engine=engine, base_dir=config.engine.model
        )
        registry.before_publish = self._prepare_routing
        self.base_name = engine.model_name
        self.image_tokens = _image_tokens(engine)
        self._inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self.draining = False

    # ---- inference ------------------------------------------------------------------

    async def _generate(self, req: InferenceRequest) -> AsyncIterator[Routed | Chunk]:
        """Yield :class:`Routed` once, then the output chunks. Raises typed errors before the first event."""
        if self.draining:
            raise UnavailableError("the server is shutting down")
        started = time.perf_counter()
        task_label = "unknown"
        outcome = "error"
        self._enter()
        try:
            prep = await self._prepare(req, in_thread=_is_large(req))
            decision = self._route(req.task, prep)
            expert = decision.expert or self.base_name
            task_label = expert
            metrics.ROUTING.labels(decision.router, expert).inc()
            lease = self.registry.lease(decision.expert) if decision.expert else contextlib.nullcontext(None)
            with lease as delta:
                routed = Routed(prep.request_id, expert, decision, prep.prompt_tokens)
                first = True
                generated = 0
                async with contextlib.aclosing(self._execute(prep, delta, routed, req.stream)) as events:
                    async for event in events:
                        if isinstance(event, Chunk):
                            if first and event.token_ids and req.stream:
                                metrics.TTFT.labels(task_label).observe(time.perf_counter() - started)
                                first = False
                            generated += len(event.token_ids)
                        yield event
            metrics.GENERATED_TOKENS.labels(task_label).inc(generated)
            metrics.PROMPT_TOKENS.labels(task_label).inc(prep.prompt_tokens)
            metrics.REQUEST_LATENCY.labels(task_label).observe(time.perf_counter() - started)
            outcome = "ok"
        except GeneratorExit:
            outcome = "cancelled"
            raise
        except asyncio.CancelledError:
            outcome = "cancelled"
            raise
        except Exception as exc:
            outcome = _OUTCOMES.get(type(exc), "error")
            raise
        finally:
            metrics.REQUESTS.labels(task_label, outcome, req.api).inc()
            self._exit()

    async def _execute(
        self, prep: PreparedRequest, delta: LiveDelta | None, routed: Routed, stream: bool
    ) -> AsyncIterator[Routed | Chunk]:
        """Run a routed request: yield ``routed`` once it holds its engine state, then the output chunks.
        (The ingress of engine replicas forwards the request instead: :mod:`deltaserve.server.deploy_ray`.)"""
        async with self.scheduler.slot(delta.binding.state if delta else BASE_STATE):
            yield routed
            async with contextlib.aclosing(self.run(prep, delta, stream)) as chunks:
                async for chunk in chunks:
                    yield chunk

    async def run(self, prep: PreparedRequest, delta: LiveDelta | None, stream: bool) -> AsyncIterator[Chunk]:
        """The engine's output for a prepared request with ``delta`` (held by the caller; None: the base),
        in the engine state it needs (the caller holds the scheduler slot)."""
        binding = delta.binding if delta else None
        inp = GenerationInput(
            prep.request_id,
            prep.prompt_token_ids,
            prep.sampling,
            prep.image,
            binding.lora_request() if binding else None,
            stream=stream,
            cache_salt=binding.salt if binding else None,
            delta_tag=binding.tag if binding else None,
        )
        # aclosing: a closed request (client gone) aborts in the engine at once, not when the GC finds the iterator
        async with contextlib.aclosing(self.engine.generate(inp)) as chunks:
            async for chunk in chunks:
                yield chunk

    async def submit(self, req: InferenceRequest) -> Generation:
        """Validate, route and start ``req``. For a stream, wait for its first output too, so that
        every refusal — validation, routing, the engine's own checks (e.g. a JSON schema its grammar
        backend rejects) — raises here, before a front end has sent a byte."""
        events = self._generate(req)
        routed = await anext(events)
        assert isinstance(routed, Routed)
        first = None
        if req.stream:
            try:
                first = await anext(events, None)
            except BaseException:
                await events.aclose()
                raise
        return Generation(routed, events, req.sampling.n or 1, first)

    async def route(self, req: InferenceRequest) -> Routed:
        """The routing decision ``req`` would get, without generating (no engine work, no metrics)."""
        prep = await self._prepare(req, in_thread=True)
        decision = self._route(req.task, prep)
        return Routed(prep.request_id, decision.expert or self.base_name, decision, prep.prompt_tokens)

    async def _prepare(self, req: InferenceRequest, *, in_thread: bool) -> PreparedRequest:
        """:func:`prepare` (validation, image decode, chat template, tokenization) on the event loop, or in a thread
        when it may hold the loop long: a 2 MB prompt tokenizes in about a second, in C that releases the GIL only
        when called from a thread (measured: /health stalled 0.88 s on the loop, 16 ms with the thread)."""
        kwargs = dict(
            tokenizer=self.engine.tokenizer,
            max_model_len=self.engine.max_model_len,
            image_tokens=self.image_tokens,
            config=self.config,
        )
        if in_thread:
            return await asyncio.to_thread(prepare, req, **kwargs)
        return prepare(req, **kwargs)

    def _route(self, task: str | None, prep: PreparedRequest) -> RouteDecision:
        query = RouteQuery(text=prep.user_text, image=prep.image, task=task)
        if task and task != AUTO:
            if task == self.base_name:
                return RouteDecision(None, 1.0, "the request named the base model", self.explicit_router.name)
            if task not in self.registry.names():
                raise NotFoundError(f"unknown task `{task}`; available: {[self.base_name, *self.registry.names()]}")
            return self.explicit_router.route(query)
        decision = self.auto_router.route(query)
        if decision.expert is not None and decision.expert not in self.registry.names():
            return RouteDecision(
                None, decision.score, f"router chose unknown task `{decision.expert}`; base instead", decision.router
            )
        return decision

    def metrics_exposition(self) -> bytes:
        """``GET /metrics``: this process's Prometheus metrics (deltaserve's and vLLM's)."""
        return metrics.exposition()

    @property
    def healthy(self) -> bool:
        """The one health definition of both front ends: the engine is alive and the server is not draining."""
        return not self.draining and not self.engine.errored

    @property
    def inflight(self) -> int:
        return self._inflight

    def _enter(self) -> None:
        self._inflight += 1
        self._idle.clear()
        metrics.INFLIGHT.set(self._inflight)

    def _exit(self) -> None:
        self._inflight -= 1
        metrics.INFLIGHT.set(self._inflight)
        if self._inflight == 0:
            self._idle.set()

    # ---- registry -------------------------------------------------------------------

    @property
    def upload_limits(self) -> UploadLimits:
        """What an uploaded bundle may hold (the front ends refuse a larger upload while it arrives)."""
        return UploadLimits(self.registry.max_bundle_bytes, self.registry.limits.max_files)

    def check_admin(self, token: str | None) -> None:
        expected = self.config.admin_token
        if expected and not (token and hmac.compare_digest(token.encode(), expected.encode())):
            raise UnauthenticatedError("this operation needs the admin token (Authorization: Bearer <token>)")

    async def register(
        self, *, token: str | None, path: Path | None = None, files=None, name: str | None = None
    ) -> LiveDelta:
        self.check_admin(token)
        if files is not None:
            staging = await asyncio.to_thread(self.registry.write_upload, files)
            try:
                delta = await self.registry.register(staging, name, staged=True)
            finally:
                shutil.rmtree(staging, ignore_errors=True)  # consumed on success; never left behind
        else:
            delta = await self.registry.register(Path(path), name)
        return delta

    async def unregister(self, name: str, *, token: str | None) -> None:
        self.check_admin(token)
        await self.registry.unregister(name)

    def deltas(self) -> list[LiveDelta]:
        """The registered deltas, by name."""
        return self.registry.list()

    def delta(self, name: str) -> LiveDelta:
        """One registered delta; :class:`NotFoundError` if there is none of that name."""
        return self.registry.get(name)

    async def engine_state(self) -> dict:
        """What the engine holds right now: its state, the switches so far, the LoRA adapters loaded in vLLM, requests in flight."""
        return {
            "state": self.scheduler.current,
            "state_switches": self.scheduler.switches,
            "lora_adapter_ids": sorted(await self.engine.list_loras()) if self.engine.config.enable_lora else [],
            "inflight": self.inflight,
        }

    async def verify_base(self, *, token: str | None) -> dict:
        """Check that the weights the engine computes with in the base state are the base's.

        Holds the engine in the base state (the scheduler switches back and keeps exclusive
        states out meanwhile), reads every checkpoint tensor back from the live model
        (see :func:`deltaserve.server.worker_patches.live_hashes`) and compares digests with
        the base checkpoint — the files the base fingerprint covers.
        """
        self.check_admin(token)
        if self.worker is None:
            raise UnavailableError(
                "weight verification needs the worker extension (the server runs with --no-exclusive)"
            )
        if self.config.engine.tensor_parallel_size > 1:
            raise UnavailableError(
                "weight verification reads whole tensors back from one worker: not available with "
                f"--tensor-parallel-size {self.config.engine.tensor_parallel_size}"
            )
        from deltaserve.server.worker_patches import checkpoint_hashes

        async with self.scheduler.slot(BASE_STATE):
            live = await self.worker.live_hashes()
        expected = await asyncio.to_thread(checkpoint_hashes, self.config.engine.model, sorted(live))
        mismatched = sorted(name for name in live if live[name] != expected[name])
        return {
            "match": not mismatched,
            "tensors": len(live),
            "mismatched": mismatched,
            "state_switches": self.scheduler.switches,
        }

    async def _prepare_routing(self, deltas: list[LiveDelta]):
        """The registry's ``before_publish`` hook: retrain the router off the loop, install it at publication."""
        prepared = await asyncio.to_thread(lambda: self.auto_router.prepare([task_card(d) for d in deltas]))
        return lambda: self.auto_router.install(prepared)

    # ---- lifecycle ------------------------------------------------------------------

    async def start(self) -> list[str]:
        problems = await self.registry.restore()
        commit = await self._prepare_routing(self.registry.list())
        commit()
        return problems

    async def drain(self, grace_s: float) -> bool:
        """Refuse new requests; wait up to ``grace_s`` for in-flight ones. True if all finished."""
        self.draining = True
        try:
            await asyncio.wait_for(self._idle.wait(), grace_s)
            return True
        except TimeoutError:
            return False

    async def close(self) -> None:
        await self.scheduler.close()
        await self.registry.close()


def task_card(delta: LiveDelta) -> TaskCard:
    from PIL import Image

    examples = []
    for ex in delta.manifest.task.examples:
        image = None
        if ex.image:
            with Image.open(delta.path / ex.image) as img:
                image = img.convert("RGB")
        examples.append((ex.text, image))
    return TaskCard(
        delta.name, delta.kind, delta.manifest.task.description, examples, delta.manifest.task.metrics.get("target")
    )


LARGE_TEXT_CHARS = 16_384
LARGE_IMAGE_BYTES = 256 << 10


def _is_large(req: InferenceRequest) -> bool:
    """Whether preparing ``req`` may take milliseconds (prepared in a thread then). Typical requests are prepared on
    the event loop: a thread hop per request costs throughput on a small machine."""
    if req.image is not None and len(req.image) > LARGE_IMAGE_BYTES:
        return True
    chars = len(req.prompt or "")
    for message in req.messages or ():
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            chars += len(content)
        elif isinstance(content, list):  # parts: text, and images (inline data URLs count by their length)
            chars += sum(len(str(part)) for part in content)
        else:
            return True  # malformed: let the thread find out
    return chars > LARGE_TEXT_CHARS


async def _base_only_switch(state: str) -> None:
    raise RuntimeError(f"cannot switch the engine to `{state}`: exclusive deltas are disabled (--no-exclusive)")


def _image_tokens(engine: Engine):
    """``(height, width) ↦`` the feature tokens an image of that size expands to, as the base's own processor
    counts them (``_get_num_multimodal_tokens``: a fixed count for LLaVA, resolution-dependent for Qwen2-VL)."""
    import functools

    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(engine.config.model) if engine.config.model else None

    @functools.lru_cache(maxsize=256)
    def count(height: int, width: int) -> int:
        if processor is None:
            raise RuntimeError("no base directory to count image tokens with")
        return int(processor._get_num_multimodal_tokens(image_sizes=[(height, width)]).num_image_tokens[0])

    return count


def _scheduler_options(extra: dict) -> dict:
    out = {}
    if "max_state_wait_s" in extra:
        out["max_wait_s"] = float(extra["max_state_wait_s"])
    if "state_batch_wait_s" in extra:
        out["min_batch_wait_s"] = float(extra["state_batch_wait_s"])
    return out


def _router_options(extra: dict) -> dict:
    return {k.removeprefix("router."): v for k, v in extra.items() if k.startswith("router.")}
