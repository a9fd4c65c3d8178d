"""Engine replicas on Ray Serve: ``deltaserve serve --replicas N``.

One Ray Serve application of two deployments:

- **Ingress** (one replica): both front ends of ``deltaserve serve`` — the HTTP app
  (:func:`~deltaserve.server.http_api.create_app`, Ray Serve's HTTP proxy in front) and the gRPC server
  (:class:`~deltaserve.server.grpc_api.GrpcFrontEnd`, listening in the ingress's own process on ``--grpc-port``),
  both unchanged — over a :class:`FleetService` — a :class:`~deltaserve.server.service.DeltaService` that validates,
  tokenizes and routes every request itself (the ``auto`` router runs here, before any replica is chosen), holds
  the fleet's registry, and forwards each routed request to an engine replica instead of running it.
- **EngineReplica** (N replicas): one vLLM engine each (:class:`~deltaserve.server.engine.Engine`), with the
  service's scheduler and engine path (:meth:`DeltaService.run`) and a registry that only reads the store.

Delta affinity is Ray Serve's model multiplexing: the ingress calls a replica with
``multiplexed_model_id`` = the delta version's key (``<task>-<16 hex digits of its content digest>``, its
directory in the store; the base model: no id). Ray Serve sends such a request to a replica that already holds
that id when there is one; the replica's ``@serve.multiplexed`` loader binds the version on demand and keeps at
most ``max_deltas_per_replica`` of them, least recently used evicted (detached once its requests end).

One registry for the fleet: the store (a directory every replica can read: shared storage across machines) is
written only by the ingress — registration validates, stores and indexes a bundle once (``index.json``, replaced
atomically), and every replica can then load it. Unregistration rewrites the index: new requests get 404 at once;
each replica notices within :data:`SYNC_S` that a version it holds is no longer indexed and detaches it once its
requests there end; the ingress removes the version's directory once no forwarded request uses it. Replicas hold
no registry state, so registrations survive the loss of any replica (and the ingress restores from the index).

Ray Serve itself restarts dead replicas and checks their health; a request whose replica died before answering is
sent once more, else answered 503 (untested: the test kills a replica between requests). On a Ray instance of one
machine each replica pins its engine to its own slice of the cores (:func:`cpu_binding`, from Ray Serve's local
replica rank), unless ``VLLM_CPU_OMP_THREADS_BIND`` is set. Each replica writes what it holds to
``<store>/replicas/<replica>.json`` (rewritten on every change and every :data:`SYNC_S`): ``GET /v1/engine`` on the
ingress lists the fresh ones.

The gRPC server listens on the machine that runs the ingress (on a local Ray instance: this one). Not offered
here: ``/v1/engine/verify`` (the single-process server).

Metrics: each replica writes its Prometheus snapshot (``<replica>.prom``, vLLM's ``vllm:*`` and deltaserve's
series of that process) with its status; the ingress's ``/metrics`` merges the fresh ones into its own, each
series labelled ``replica="<id>"`` (so one scrape covers the fleet, at most :data:`SYNC_S` old).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import json
import logging
import os
import shutil
import signal
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

from deltaserve.plugins.errors import DeltaServeError
from deltaserve.server import metrics
from deltaserve.server.bindings import BASE_STATE, WorkerDeltas
from deltaserve.server.config import ServeConfig
from deltaserve.server.engine import Chunk
from deltaserve.server.errors import NotFoundError, UnavailableError
from deltaserve.server.registry import (
    INDEX_FILE,
    VERSION_KEY,
    DeltaRegistry,
    LiveDelta,
    _write_atomic,
    version_key,
)
from deltaserve.server.requests import PreparedRequest
from deltaserve.server.service import DeltaService, Routed

log = logging.getLogger(__name__)

APP_NAME = "deltaserve"
STATUS_DIR = "replicas"
SYNC_S = 1.0
"""How often a replica compares what it holds with the index (and rewrites its status file)."""
METRICS_SUFFIX = ".prom"
"""A replica's Prometheus snapshot, beside its status file (written with it)."""
STATUS_FRESH_S = 10.0
"""A status file older than this belongs to a replica that is gone."""


# ---- the ingress ------------------------------------------------------------------------


class FleetEngine:
    """The ingress's view of the replicas' engine: the base's tokenizer (loaded as vLLM loads it) and the context
    length the replicas report, to validate and tokenize requests; generation happens on the replicas."""

    errored = False

    def __init__(self, config, max_model_len: int):
        from vllm.tokenizers.registry import get_tokenizer

        self.config = config
        self.model_name = config.name
        self.max_model_len = max_model_len
        self.tokenizer = get_tokenizer(config.model)


class FleetService(DeltaService):
    """The ingress's service: validation, routing and the registry as in one server; execution on a replica."""

    def __init__(self, config: ServeConfig, engine: FleetEngine, replicas):
        self.remote = object_store(config)
        self.board = StatusBoard(config.store, self.remote)
        registry = DeltaRegistry(
            config.store, config.engine.model, engine, max_bundle_bytes=config.max_bundle_bytes, bind=False,
            remote=self.remote,
        )  # fmt: skip
        super().__init__(config, engine, registry)
        self.replicas = replicas
        """Ray Serve handle of the :class:`EngineReplica` deployment."""

    async def _execute(
        self, prep: PreparedRequest, delta: LiveDelta | None, routed: Routed, stream: bool
    ) -> AsyncIterator[Routed | Chunk]:
        """Forward to a replica: one that holds ``delta``'s version if any (multiplexing), else any."""
        key = version_key(delta.name, delta.digest) if delta else ""
        handle = self.replicas.options(stream=True, multiplexed_model_id=key)
        for attempt in range(2):  # a replica lost before it answered: once more, on another (nothing was sent yet)
            response = handle.generate.remote(prep, stream)
            try:
                info = await _unwrap(anext(response))  # the replica's typed refusals raise here, before any output
                break
            except UnavailableError:
                response.cancel()
                if attempt:
                    raise
                log.warning("request %s: its replica was lost before answering; trying another", prep.request_id)
        try:
            routed.replica = info
            if delta is not None:
                metrics.AFFINITY.labels("hit" if info["held"] else "load").inc()
            yield routed
            while True:
                try:
                    chunk = await _unwrap(anext(response))
                except StopAsyncIteration:
                    return
                yield chunk
        finally:
            response.cancel()  # a no-op once it finished; else the replica aborts the request in its engine

    async def engine_state(self) -> dict:
        """Every live replica's status: what it holds (versions, LoRA adapters), its loads and affinity hits."""
        return {"replicas": await asyncio.to_thread(self.board.statuses)}

    def metrics_exposition(self) -> bytes:
        """The ingress's metrics and every live replica's (vLLM's ``vllm:*`` and deltaserve's engine-side
        series), each replica's labelled ``replica="<id>"``: the snapshot it wrote with its status."""
        others = [
            ({"replica": status["replica"]}, self.board.exposition(status["replica"]))
            for status in self.board.statuses()
        ]
        return metrics.exposition(others)

    async def verify_base(self, *, token: str | None) -> dict:
        self.check_admin(token)
        raise UnavailableError("weight verification is not available with engine replicas (run one server)")


async def _unwrap(awaitable):
    """A replica's typed error (404, 400 …) as itself, not wrapped in Ray's task error; a lost replica as
    :class:`UnavailableError` (503)."""
    from ray.exceptions import RayActorError, RayTaskError

    try:
        return await awaitable
    except RayActorError as exc:
        raise UnavailableError(f"the engine replica serving this request was lost ({type(exc).__name__})") from None
    except RayTaskError as exc:
        cause = getattr(exc, "cause", None)
        if isinstance(cause, DeltaServeError):
            raise cause from None
        raise


def object_store(config: ServeConfig):
    """The :class:`~deltaserve.server.object_store.ObjectStore` of ``--store-url``, or None (a shared directory)."""
    if config.store_url is None:
        return None
    from deltaserve.server.object_store import ObjectStore

    return ObjectStore(config.store_url)


class StatusBoard:
    """Where each replica leaves its status (``<replica>.json``) and Prometheus snapshot (``<replica>.prom``) for
    the ingress: ``<store>/replicas/``, or the same names in the bucket of ``--store-url`` (``remote``)."""

    def __init__(self, store: Path, remote=None):
        self.directory, self.remote = Path(store) / STATUS_DIR, remote

    def put(self, replica: str, status: dict, exposition: bytes) -> None:
        for name, body in ((replica + METRICS_SUFFIX, exposition), (f"{replica}.json", json.dumps(status).encode())):
            if self.remote is not None:
                self.remote.put(body, STATUS_DIR, name)
            else:
                self.directory.mkdir(exist_ok=True)
                _write_atomic(self.directory / name, body)

    def remove(self, replica: str) -> None:
        for name in (f"{replica}.json", replica + METRICS_SUFFIX):
            if self.remote is not None:
                self.remote.delete(STATUS_DIR, name)
            else:
                (self.directory / name).unlink(missing_ok=True)

    def _read(self, name: str) -> bytes | None:
        if self.remote is not None:
            return self.remote.get(STATUS_DIR, name)
        try:
            return (self.directory / name).read_bytes()
        except OSError:  # removed meanwhile
            return None

    def statuses(self) -> list[dict]:
        """The fresh statuses (written within :data:`STATUS_FRESH_S`), by replica id."""
        if self.remote is not None:
            names = self.remote.names(STATUS_DIR)
        else:
            names = [p.name for p in self.directory.glob("*")] if self.directory.is_dir() else []
        out = []
        now = time.time()
        for name in sorted(n for n in names if n.endswith(".json")):
            try:
                status = json.loads(self._read(name) or b"")
            except ValueError:
                continue  # being replaced, or removed meanwhile
            if now - status.get("updated_at", 0) <= STATUS_FRESH_S:
                out.append(status)
        return out

    def exposition(self, replica: str) -> str:
        return (self._read(replica + METRICS_SUFFIX) or b"").decode()


# ---- an engine replica ------------------------------------------------------------------


class _Resident:
    """What the multiplexer keeps per version key on a replica: the bound version, or None once the index no
    longer names it (rebound if the same content is registered again). Ray Serve calls ``__del__`` when it
    evicts the key (least recently used); the garbage collector may call it again later."""

    def __init__(self, replica: EngineReplicaBase, key: str, delta: LiveDelta):
        self.replica, self.key, self.delta = replica, key, delta
        self.lock = asyncio.Lock()
        self._loop = asyncio.get_running_loop()
        self._evicted = False

    def __del__(self):
        if self._evicted:
            return
        self._evicted = True
        with contextlib.suppress(RuntimeError):  # the loop is closed: the replica is gone anyway
            self._loop.call_soon_threadsafe(self.replica._evicted, self)


class EngineReplicaBase:
    """One engine replica. Subclassed by :func:`replica_class` with the multiplexed loader (its LRU size is fixed
    where the class is defined)."""

    async def __init__(self, config: ServeConfig, cores_shared_by: int | None):
        from ray import serve

        from deltaserve.server.engine import Engine

        context = serve.get_replica_context()
        self.tag = context.replica_id.unique_id if context else str(os.getpid())
        self.remote = object_store(config)
        self.board = StatusBoard(config.store, self.remote)
        if self.remote is None:
            self.store = Path(config.store)
        else:  # a private cache of the bucket: its index, and the versions this replica loads
            self.store = Path(tempfile.mkdtemp(prefix=f"deltaserve-replica-{self.tag}-"))
            self._uploads = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="deltaserve-status")
            await asyncio.to_thread(self.remote.pull, self.store, versions=False)
        if "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:  # the user's binding, if set, wins
            rank = getattr(getattr(context, "rank", None), "local_rank", None)
            binding = cpu_binding(rank, cores_shared_by, config.engine.tensor_parallel_size)
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = binding
            log.info("replica %s (local rank %s): VLLM_CPU_OMP_THREADS_BIND=%s", self.tag, rank, binding)
        self.engine = await Engine.start(config.engine)
        worker = (
            WorkerDeltas(self.engine, config.engine.concurrent_delta_budget_bytes)
            if config.engine.exclusive_deltas
            else None
        )
        registry = DeltaRegistry(
            self.store, config.engine.model, self.engine, max_bundle_bytes=config.max_bundle_bytes, worker=worker,
            owns_store=False,
        )  # fmt: skip
        # Requests arrive routed: the replica needs no router of its own.
        replica_config = dataclasses.replace(config, router="base")
        self.service = DeltaService(replica_config, self.engine, registry, worker)
        self.resident: dict[str, _Resident] = {}
        self.loads = self.hits = self.requests = 0
        self._loras: list[int] | None = None
        self._closing = False
        self._sync_task = asyncio.create_task(self._sync_loop())
        self._write_status()
        log.info("engine replica %s ready (pid %d)", self.tag, os.getpid())

    async def describe(self) -> dict:
        return {"max_model_len": self.engine.max_model_len, "model_name": self.engine.model_name, "replica": self.tag}

    async def _load_version(self, key: str) -> LiveDelta:
        if self.remote is not None:
            if VERSION_KEY.fullmatch(key) is None:
                raise NotFoundError(f"no stored delta version `{key}`")
            await asyncio.to_thread(self.remote.fetch_version, key, self.store)
        return await self.service.registry.load_version(key)

    async def _bind(self, key: str) -> _Resident:
        delta = await self._load_version(key)
        self.loads += 1
        resident = _Resident(self, key, delta)
        self.resident[key] = resident
        self._write_status()
        return resident

    async def generate(self, prep: PreparedRequest, stream: bool) -> AsyncIterator[dict | Chunk]:
        """Yield ``{"replica", "pid", "held"}`` (``held``: the delta was bound here before this request), then the
        engine's chunks. Refusals (an unknown version, the engine refusing a delta) raise before the first yield."""
        from ray import serve

        key = serve.get_multiplexed_model_id()
        self.requests += 1
        delta = None
        held = None
        if key:
            current = self.resident.get(key)
            held = current is not None and current.delta is not None
            resident = await self.load(key)
            async with resident.lock:
                if resident.delta is None:  # released after an unregistration; the same content is back
                    resident.delta = await self._load_version(key)
                    self.loads += 1
                    self._write_status()
            delta = resident.delta
            self.hits += held
        registry = self.service.registry
        with registry.hold(delta) if delta else contextlib.nullcontext():
            async with self.service.scheduler.slot(delta.binding.state if delta else BASE_STATE):
                yield {"replica": self.tag, "pid": os.getpid(), "held": held}
                async with contextlib.aclosing(self.service.run(prep, delta, stream)) as chunks:
                    async for chunk in chunks:
                        yield chunk

    def _evicted(self, resident: _Resident) -> None:
        """The multiplexer evicted ``resident`` (least recently used): detach it once its requests end."""
        if self._closing:  # the replica stops: the engine goes, and every adapter with it
            return
        if self.resident.get(resident.key) is resident:
            del self.resident[resident.key]
        if resident.delta is not None:
            self.service.registry.release(resident.delta)
            resident.delta = None
        self._write_status()

    async def _sync_loop(self) -> None:
        while True:
            await asyncio.sleep(SYNC_S)
            try:
                await self.sync()
            except Exception:  # never let the loop die (an unreadable index is retried next time)
                log.exception("replica %s: could not compare its deltas with the index", self.tag)

    async def sync(self) -> None:
        """Release every held version the index no longer names (unregistered or replaced); refresh the status."""
        if self.remote is not None:
            await asyncio.to_thread(self.remote.pull, self.store, versions=False)
        held = [k for k, r in self.resident.items() if r.delta is not None]
        for key in self.service.registry.unindexed(held):
            resident = self.resident[key]
            log.info("replica %s: %s is no longer registered; detaching it once its requests end", self.tag, key)
            self.service.registry.release(resident.delta)
            resident.delta = None
        if self.engine.config.enable_lora:
            self._loras = sorted(await self.engine.list_loras())
        self._write_status()

    def _put_status(self, status: dict, exposition: bytes) -> None:
        try:
            self.board.put(self.tag, status, exposition)
        except UnavailableError as exc:  # the next sync writes it again
            log.warning("replica %s: could not write its status: %s", self.tag, exc)

    def status(self) -> dict:
        return {
            "replica": self.tag,
            "pid": os.getpid(),
            "held": sorted(k for k, r in self.resident.items() if r.delta is not None),
            "lora_adapter_ids": self._loras,
            "cpu_binding": os.environ.get("VLLM_CPU_OMP_THREADS_BIND"),
            "loads": self.loads,
            "hits": self.hits,
            "requests": self.requests,
            "updated_at": time.time(),
        }

    def _write_status(self) -> None:
        if self.remote is not None:  # uploaded in order, off the event loop
            self._uploads.submit(self._put_status, self.status(), metrics.exposition())
        else:
            self.board.put(self.tag, self.status(), metrics.exposition())

    def __del__(self):
        self._closing = True
        with contextlib.suppress(Exception):
            self._sync_task.cancel()
        with contextlib.suppress(Exception):
            if self.remote is not None:
                self._uploads.shutdown(wait=True)
                shutil.rmtree(self.store, ignore_errors=True)  # the private cache
            self.board.remove(self.tag)
        with contextlib.suppress(Exception):
            self.engine.shutdown()


def cpu_binding(rank: int | None, replicas: int | None, tensor_parallel_size: int = 1) -> str:
    """vLLM-cpu's ``VLLM_CPU_OMP_THREADS_BIND`` for replica ``rank`` of ``replicas`` sharing this machine's cores:
    its own slice of the cores (split further per tensor-parallel worker, ``|``-separated), so that engines never
    pin the same cores. ``nobind`` when that cannot be worked out (rank or replica count unknown, fewer cores than
    workers): on a loaded machine unpinned OpenMP threads cost much (``docs/replicas-bench.md``)."""
    cores = sorted(os.sched_getaffinity(0))
    if rank is None or not replicas or len(cores) < replicas * tensor_parallel_size:
        return "nobind"
    per = len(cores) // replicas
    mine = cores[(rank % replicas) * per : (rank % replicas + 1) * per]
    each = len(mine) // tensor_parallel_size
    groups = [mine[i * each : (i + 1) * each] for i in range(tensor_parallel_size)]
    return "|".join(",".join(map(str, g)) for g in groups)


def replica_class(max_deltas: int) -> type:
    """The replica deployment's class, its multiplexed loader keeping at most ``max_deltas`` versions."""
    from ray import serve

    class EngineReplica(EngineReplicaBase):
        @serve.multiplexed(max_num_models_per_replica=max_deltas)
        async def load(self, key: str) -> _Resident:
            return await self._bind(key)

    return EngineReplica


class IngressBase:
    """The ingress deployment (wrapped by ``serve.ingress`` in :func:`build_app`): the HTTP app and the gRPC
    server (on ``config.grpc_port``, which :func:`run` fixes before the deployment starts) over a
    :class:`FleetService`."""

    async def __init__(self, config: ServeConfig, replicas):
        info = await replicas.describe.remote()  # waits for a replica: the engine's context length
        engine = FleetEngine(config.engine, info["max_model_len"])
        self.service = FleetService(config, engine, replicas)
        problems = await self.service.start()
        for problem in problems:
            log.error("not restored: %s", problem)
        from deltaserve.server.grpc_api import GrpcFrontEnd

        self.grpc = GrpcFrontEnd(self.service, max_message_bytes=config.max_bundle_bytes + (4 << 20))
        await self.grpc.start(config.host, config.grpc_port)

    def __serve_build_asgi_app__(self):
        from deltaserve.server.http_api import create_app

        return create_app(self.service)


def build_app(
    config: ServeConfig, replicas: int, *, max_deltas_per_replica: int = 8, replica_cpus: float | None = None
):
    """The Ray Serve application: ``replicas`` engine replicas behind one ingress (``serve.run`` it)."""
    from ray import serve

    cpus = replica_cpus if replica_cpus is not None else max(len(os.sched_getaffinity(0)) / replicas, 0.01)
    replica = serve.deployment(
        replica_class(max_deltas_per_replica),
        name="EngineReplica",
        num_replicas=replicas,
        max_ongoing_requests=config.engine.max_num_seqs,
        ray_actor_options={"num_cpus": cpus},
        graceful_shutdown_timeout_s=config.grace_period_s,
    )
    ingress = serve.deployment(
        serve.ingress()(IngressBase),
        name="Ingress",
        max_ongoing_requests=max(1024, config.engine.max_num_seqs * replicas * 4),
        ray_actor_options={"num_cpus": 0},
        graceful_shutdown_timeout_s=config.grace_period_s,
    )
    # A local Ray instance: every replica on this machine, each pinned to its own slice of the cores.
    cores_shared_by = None if os.environ.get("RAY_ADDRESS") else replicas
    return ingress.bind(config, replica.bind(config, cores_shared_by))


def run(config: ServeConfig, replicas: int, *, max_deltas_per_replica: int = 8) -> None:
    """``deltaserve serve --replicas N``: a Ray instance of this machine's cores (or the cluster ``RAY_ADDRESS``
    names), the application, a ready line on stdout and ``<store>/server.json``; SIGTERM/SIGINT shut the
    application down (replicas drain for up to the grace period) and this process's Ray with it."""
    import threading

    import ray
    from ray import serve

    from deltaserve.client.process import free_port
    from deltaserve.server.app import SERVER_FILE, announce_ready

    config.store.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    cluster = os.environ.get("RAY_ADDRESS")
    if cluster:  # an existing Ray cluster: replicas go wherever it has room (the store must be shared storage)
        ray.init(address=cluster, configure_logging=False)
    else:  # a Ray instance of this machine, for this server alone
        ray.init(
            num_cpus=len(os.sched_getaffinity(0)),
            include_dashboard=False,
            object_store_memory=256 << 20,
            configure_logging=False,
        )
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        port = config.http_port or free_port()
        config = dataclasses.replace(config, grpc_port=config.grpc_port or free_port())  # the ingress binds it
        serve.start(http_options={"host": config.host, "port": port})
        app = build_app(config, replicas, max_deltas_per_replica=max_deltas_per_replica)
        serve.run(app, name=APP_NAME, route_prefix="/")
        http, grpc = f"http://{config.host}:{port}", f"{config.host}:{config.grpc_port}"
        index = config.store / INDEX_FILE
        deltas = len(json.loads(index.read_text()).get("deltas", {})) if index.exists() else 0
        info = {
            "pid": os.getpid(),
            "grpc": grpc,
            "http": http,
            "base_model": config.engine.name,
            "replicas": replicas,
            "deltas": deltas,
            "ready_seconds": round(time.perf_counter() - started, 2),
        }
        announce_ready(
            config.store,
            info,
            grpc=grpc,
            http=http,
            base=config.engine.name,
            deltas=deltas,
            replicas=replicas,
            ready=f"{info['ready_seconds']}s",
        )
        while not stop.wait(0.5):
            pass
    finally:
        log.info("shutting down Ray Serve (replicas drain for up to %.0fs)", config.grace_period_s)
        with contextlib.suppress(Exception):
            if cluster:
                serve.delete(APP_NAME)  # the cluster's other applications stay
            else:
                serve.shutdown()
        ray.shutdown()
        (config.store / SERVER_FILE).unlink(missing_ok=True)
        print("deltaserve: stopped", flush=True)
