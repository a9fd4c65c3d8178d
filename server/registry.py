"""The persisted delta registry: a store directory, an index, and the live table.

Store layout::

    <store>/index.json               {"format_version", "base", "deltas": {name: record}}
    <store>/deltas/<name>-<digest>/  one validated bundle per registered version
    <store>/staging/                 uploads and copies in progress (wiped at start)
    <store>/.index.json.<hex>.tmp    an index being written (renamed into place; removed at start)

Crash consistency: a bundle is copied and fsync'ed into ``staging/``, validated
there (never in the caller's directory, which could change under us), moved into
``deltas/``, bound to the engine, and only then is the index rewritten — atomically
(temp file + fsync + rename + fsync of the directory). Killed at any point, a
restart finds the delta either fully registered or absent; directories the index
does not name are removed at start.

Requests hold a *lease* on the version they use (:meth:`DeltaRegistry.lease`). A
replaced or unregistered version leaves the live table at once (new requests get
the new version or NOT_FOUND) and is detached from the engine when its last lease
ends.

Engine replicas (``deltaserve serve --replicas N``, :mod:`deltaserve.server.deploy_ray`) share one store. The
ingress holds the store's only writer, a registry with ``bind=False``: it validates, stores and indexes bundles
and leases versions for the requests it forwards, but binds nothing (it has no engine), and removes a retired
version's directory once no forwarded request uses it. Each replica holds a registry with ``owns_store=False``:
it binds a stored version on demand (:meth:`DeltaRegistry.load_version`, by its directory's name, the
*version key*), finds the versions the index no longer names (:meth:`DeltaRegistry.unindexed`) and releases
them (:meth:`DeltaRegistry.release`, detached once its own requests end); it never writes or deletes in the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from deltaserve.plugins import env
from deltaserve.plugins.base_spec import BaseSpec
from deltaserve.plugins.bundle import MANIFEST_FILE, Bundle, Limits, content_digest, read_bundle
from deltaserve.plugins.errors import BundleError
from deltaserve.plugins.registry import kinds
from deltaserve.plugins.manifest import path_set_problems, relpath_problem, task_name_problem
from deltaserve.server import metrics
from deltaserve.server.bindings import Binding, binding_for
from deltaserve.server.errors import InvalidRequestError, NotFoundError, ResourceExhaustedError

log = logging.getLogger(__name__)

INDEX_FILE = "index.json"
INDEX_VERSION = 1
DRAIN_TIMEOUT_S = 60.0
VERSION_KEY = re.compile(r"([a-z0-9][a-z0-9._-]{0,63})-([0-9a-f]{16})")
"""A stored version's directory name under ``deltas/``: ``<task name>-<first 16 hex digits of its content digest>``."""


def version_key(name: str, digest: str) -> str:
    """The directory name (under ``deltas/``) of version ``digest`` of task ``name``: unique per content."""
    return f"{name}-{digest.removeprefix('sha256:')[:16]}"


@dataclass
class LiveDelta:
    """One registered delta version as the server serves it."""

    name: str
    kind: str
    digest: str
    path: Path
    bundle: Bundle
    binding: Binding
    registered_at: float
    size_bytes: int
    leases: int = 0
    retired: bool = False
    drained: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def manifest(self):
        return self.bundle.manifest


def _importer(directory: Path):
    """The kind that imports ``directory`` (not a bundle), or None."""
    for cls in kinds().values():
        kind = cls()
        if kind.recognises(directory):
            return kind
    return None


async def _fault_point(point: str, task: str) -> None:
    """Test-only pause (``DELTASERVE_FAULT_PAUSE``) so crash tests can kill the server right here."""
    fault = env.fault_pause()
    if fault and fault[0] == point and fault[2] in (None, task):
        log.warning("fault injection: pausing %.0fs at `%s` of %s", fault[1], point, task)
        await asyncio.sleep(fault[1])


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _copy_synced(src: Path, dst: Path, max_bytes: int) -> None:
    """Copy a bundle directory, fsync'ing every file; bounded in size.

    Only regular files and folders: a symlink or a special file is refused by name (silently
    dropping it would register something other than what the user pointed at).
    """
    total = 0
    for root, dirs, files in os.walk(src, followlinks=False):
        rel_root = Path(root).relative_to(src)
        (dst / rel_root).mkdir(parents=True, exist_ok=True)
        odd = [
            n
            for n in (*dirs, *files)
            if (Path(root) / n).is_symlink() or not ((Path(root) / n).is_file() or (Path(root) / n).is_dir())
        ]
        if odd:
            names = ", ".join(f"`{(rel_root / n).as_posix()}`" for n in sorted(odd))
            raise InvalidRequestError(
                f"the bundle directory holds {names}: only regular files and folders are accepted (no symlinks)"
            )
        for name in files:
            s = Path(root) / name
            total += s.stat().st_size
            if total > max_bytes:
                raise ResourceExhaustedError(f"bundle is larger than the server's limit of {max_bytes} bytes")
            with open(s, "rb") as fi, open(dst / rel_root / name, "wb") as fo:
                shutil.copyfileobj(fi, fo, 1 << 20)
                fo.flush()
                os.fsync(fo.fileno())


UPLOAD = "<upload>"
"""How refusals name an uploaded bundle (its files are named relative to it)."""


class DeltaRegistry:
    """Registered deltas: persisted in ``store``, bound to ``engine``."""

    def __init__(
        self,
        store: Path,
        base_dir: Path,
        engine,
        *,
        max_bundle_bytes: int,
        limits: Limits = Limits(),
        worker=None,
        before_publish=None,
        bind: bool = True,
        owns_store: bool = True,
        remote=None,
    ):
        self.store = Path(store)
        self.remote = remote
        """:class:`~deltaserve.server.object_store.ObjectStore` the store is published to (the ingress of engine
        replicas with ``--store-url``), or None: every index write goes there first, with the versions it names."""
        self.bind = bind
        """False (the ingress of engine replicas): versions are validated, stored and indexed but bound nowhere
        here; the replicas bind them on demand."""
        self.owns_store = owns_store
        """False (an engine replica): the store belongs to another process; this registry only reads it."""
        self.before_publish = before_publish
        """``async (deltas) -> commit``: called with the next set of live deltas while it is not yet
        visible; its slow work (e.g. retraining the router) happens there, and the returned
        synchronous ``commit()`` runs right before the set is published, with no await between —
        so no request ever sees a delta the router does not know, or the reverse."""
        self.worker = worker
        """:class:`~deltaserve.server.bindings.WorkerDeltas`, or None without the worker extension."""
        self.base = BaseSpec.from_dir(base_dir)
        self.engine = engine
        self.max_bundle_bytes = max_bundle_bytes
        self.limits = limits
        self._live: dict[str, LiveDelta] = {}
        self._lock = asyncio.Lock()
        self._cleanup_tasks: set[asyncio.Task] = set()
        self._index_cache: tuple[tuple, dict] | None = None
        if owns_store:
            for sub in ("deltas", "staging"):
                (self.store / sub).mkdir(parents=True, exist_ok=True)

    # ---- reading --------------------------------------------------------------------

    def get(self, name: str) -> LiveDelta:
        try:
            return self._live[name]
        except KeyError:
            raise NotFoundError(f"no delta named `{name}`; registered: {sorted(self._live) or 'none'}") from None

    def list(self) -> list[LiveDelta]:
        return [self._live[n] for n in sorted(self._live)]

    def names(self) -> list[str]:
        return sorted(self._live)

    def lease(self, name: str):
        """Hold the current version of ``name`` for the duration of one request."""
        return self.hold(self.get(name))

    @contextlib.contextmanager
    def hold(self, delta: LiveDelta):
        """Hold ``delta`` (a version this registry bound) for the duration of one request."""
        delta.leases += 1
        try:
            yield delta
        finally:
            delta.leases -= 1
            if delta.retired and delta.leases == 0:
                delta.drained.set()

    # ---- persistence ----------------------------------------------------------------

    def _index_path(self) -> Path:
        return self.store / INDEX_FILE

    def _read_index(self) -> dict:
        try:
            index = json.loads(self._index_path().read_text())
        except FileNotFoundError:
            return {}
        if index.get("format_version") != INDEX_VERSION:
            raise RuntimeError(f"{self._index_path()}: unsupported index format {index.get('format_version')!r}")
        return index.get("deltas", {})

    def indexed(self) -> dict:
        """The index's records (name → record), read again only when the file was replaced since the last call
        (the writer replaces it atomically: a new inode)."""
        try:
            st = self._index_path().stat()
        except FileNotFoundError:
            return {}
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        if self._index_cache is None or self._index_cache[0] != stamp:
            self._index_cache = (stamp, self._read_index())
        return self._index_cache[1]

    def _write_index(self, live: dict[str, LiveDelta]) -> None:
        index = {
            "format_version": INDEX_VERSION,
            "base": {"name": self.base.name, "fingerprint": self.base.fingerprint},
            "deltas": {
                d.name: {
                    "kind": d.kind,
                    "digest": d.digest,
                    "dir": d.path.relative_to(self.store).as_posix(),
                    "registered_at": d.registered_at,
                }
                for d in live.values()
            },
        }
        data = (json.dumps(index, indent=2, sort_keys=True) + "\n").encode()
        if self.remote is not None:  # first: a failure there leaves the local index as it was
            self.remote.publish(data, self.store, [r["dir"] for r in index["deltas"].values()])
        _write_atomic(self._index_path(), data)

    async def restore(self) -> list[str]:
        """Bind every delta of the index; wipe staging and unreferenced directories. Returns problems."""
        if not self.owns_store:
            raise RuntimeError("a registry that does not own its store binds versions on demand (load_version)")
        problems = []
        shutil.rmtree(self.store / "staging", ignore_errors=True)
        (self.store / "staging").mkdir()
        for tmp in self.store.glob(f".{INDEX_FILE}.*.tmp"):  # an index write cut short before its rename
            tmp.unlink()
        if self.remote is not None:  # the bucket's index, when it has one, is the newest (written first)
            pulled = await asyncio.to_thread(self.remote.pull, self.store, versions=True)
        records = self._read_index()
        referenced = {self.store / r["dir"] for r in records.values()}
        if self.remote is not None:
            if pulled is None and records:  # a bucket new to this store: publish what the store has
                await asyncio.to_thread(self.remote.publish, self._index_path().read_bytes(), self.store,
                                        [r["dir"] for r in records.values()])  # fmt: skip
            for orphan in await asyncio.to_thread(self.remote.versions) - {p.name for p in referenced}:
                log.info("removing unreferenced version %s from %s", orphan, self.remote.url)
                await asyncio.to_thread(self.remote.delete_version, orphan)
        for entry in (self.store / "deltas").iterdir():
            if entry not in referenced:
                log.info("removing unreferenced store entry %s (an interrupted registration)", entry.name)
                shutil.rmtree(entry, ignore_errors=True)
        async with self._lock:
            for name, record in sorted(records.items()):
                started = time.perf_counter()
                try:
                    delta = await self._bind_stored(name, self.store / record["dir"], record["registered_at"])
                except Exception as exc:
                    problems.append(f"`{name}`: {exc}")
                    log.error("could not restore delta %s: %s", name, exc)
                    continue
                self._live[name] = delta
                metrics.DELTA_LOAD_SECONDS.labels(delta.kind).observe(time.perf_counter() - started)
            self._update_gauges()
        return problems

    # ---- mutations ------------------------------------------------------------------

    def new_staging_dir(self) -> Path:
        path = self.store / "staging" / uuid.uuid4().hex
        path.mkdir(parents=True)
        return path

    def write_upload(self, files: list[tuple[str, bytes]]) -> Path:
        """Write uploaded bundle files into a fresh staging directory (paths checked, size bounded)."""
        if not files:
            raise InvalidRequestError("`files` must not be empty")
        total = sum(len(data) for _, data in files)
        if total > self.max_bundle_bytes:
            raise ResourceExhaustedError(f"bundle is {total} bytes; the server's limit is {self.max_bundle_bytes}")
        if len(files) > self.limits.max_files:
            raise InvalidRequestError(
                f"`files` has {len(files)} entries; a bundle holds at most {self.limits.max_files}"
            )
        problems = [p for rel, _ in files if (p := relpath_problem(rel))]
        if not problems:
            problems = path_set_problems([rel for rel, _ in files])
        if problems:
            raise BundleError(UPLOAD, problems)
        staging = self.new_staging_dir()
        try:
            for rel, data in files:
                target = staging / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                with open(target, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return staging

    async def register(self, source: Path, name: str | None = None, *, staged: bool = False) -> LiveDelta:
        """Validate, store, bind and persist the bundle (or a directory a kind imports, e.g. a plain PEFT adapter) at ``source``.

        ``staged``: ``source`` is already a private staging directory (an upload) that may be consumed.
        Re-registering a name with the same content is a no-op; with new content it replaces the
        live version once the new one is bound.
        """
        started = time.perf_counter()
        kind = "unknown"
        try:
            async with self._lock:
                delta = await self._register_locked(Path(source), name, staged)
            kind = delta.kind
            metrics.REGISTRY_OPS.labels("register", "ok").inc()
            metrics.DELTA_LOAD_SECONDS.labels(kind).observe(time.perf_counter() - started)
            return delta
        except Exception:
            metrics.REGISTRY_OPS.labels("register", "error").inc()
            raise

    async def _register_locked(self, source: Path, name: str | None, staged: bool) -> LiveDelta:
        if not staged:
            self._check_source(source)
        staging = source if staged else self.new_staging_dir()
        try:
            if name is not None and (problem := task_name_problem(name)):
                raise InvalidRequestError(problem)  # an empty name too: never a made-up one
            if not staged:
                await asyncio.to_thread(_copy_synced, source, staging, self.max_bundle_bytes)
            importer = _importer(staging) if not (staging / MANIFEST_FILE).exists() else None
            if importer is not None:  # another tool's output, e.g. a plain PEFT adapter directory
                if name is None and staged:
                    raise InvalidRequestError(
                        f"`name` is required to register a directory that is not a bundle (a `{importer.name}` import)"
                    )
                foreign, staging = staging, self.store / "staging" / uuid.uuid4().hex
                await asyncio.to_thread(self._import, importer, foreign, staging, name or source.name)
            return await self._store_and_bind(staging, name)
        except BundleError as exc:
            # Validation ran on a staging copy: name what the client sent, never the server's directories.
            raise BundleError(UPLOAD if staged else source, exc.problems) from None
        except OSError as exc:
            if staged or not str(exc.filename or "").startswith(str(source)):
                raise  # the server's own file system failed: an internal error
            raise InvalidRequestError(
                f"`{Path(exc.filename).relative_to(source)}` of the bundle directory cannot be read: {exc.strerror}"
            ) from None
        finally:
            shutil.rmtree(staging, ignore_errors=True)  # gone already if it was moved into the store

    def _check_source(self, source: Path) -> None:
        """A bundle directory named by path (``path`` mode): an existing directory outside the store."""
        try:
            if not source.is_dir():
                raise InvalidRequestError(f"`{source}` is not a directory")
            resolved, store = source.resolve(), self.store.resolve()
        except OSError as exc:  # e.g. a name longer than the file system allows
            raise InvalidRequestError(f"`path` cannot be used: {exc.strerror}") from None
        if resolved == store or store in resolved.parents or resolved in store.parents:
            raise InvalidRequestError("`path` must not be, hold or lie inside the server's store")

    async def _store_and_bind(self, staging: Path, name: str | None) -> LiveDelta:
        bundle = await asyncio.to_thread(read_bundle, staging, self.base, self.limits)
        name = name or bundle.manifest.name
        if problem := task_name_problem(name):
            raise InvalidRequestError(problem)
        if name == self.engine.model_name:
            raise InvalidRequestError(f"`{name}` is the base model's name; choose another task name")
        digest = await asyncio.to_thread(content_digest, staging)
        current = self._live.get(name)
        if current is not None and current.digest == digest:
            return current  # idempotent
        target = self.store / "deltas" / version_key(name, digest)
        shutil.rmtree(target, ignore_errors=True)  # an orphan of an earlier attempt
        os.replace(staging, target)
        _fsync_dir(target.parent)
        await _fault_point("stored", name)
        bundle.path = target
        try:
            delta = await self._bind_stored(name, target, time.time(), bundle, digest)
        except BaseException:
            shutil.rmtree(target, ignore_errors=True)
            raise
        live = dict(self._live)
        live[name] = delta
        try:
            commit = await self._prepare_publish(live)
            await asyncio.to_thread(self._write_index, live)
        except BaseException:
            await delta.binding.unbind(self.engine)
            shutil.rmtree(target, ignore_errors=True)
            raise
        await _fault_point("indexed", name)
        commit()
        self._live = live
        if current is not None:
            self._retire(current)
        self._update_gauges()
        log.info("registered %s (%s, %s)", name, delta.kind, digest[:19])
        return delta

    def _import(self, importer, foreign: Path, out: Path, name: str) -> None:
        try:
            importer.import_directory(foreign, out, name=name, base=self.base)
        finally:
            shutil.rmtree(foreign, ignore_errors=True)

    async def _bind_stored(
        self, name: str, path: Path, registered_at: float, bundle: Bundle | None = None, digest: str | None = None
    ) -> LiveDelta:
        """Bind the stored bundle at ``path`` (validated again unless ``bundle`` is given); with ``bind=False``
        only check that its kind can be served (the replicas bind it)."""
        if bundle is None:
            bundle = await asyncio.to_thread(read_bundle, path, self.base, self.limits)
        if digest is None:
            digest = await asyncio.to_thread(content_digest, path)
        binding = binding_for(
            bundle.manifest.kind,
            name,
            digest,
            path,
            worker=self.worker,
            config=bundle.manifest.config,
            deferred=not self.bind,
        )
        await binding.bind(self.engine)
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        return LiveDelta(name, bundle.manifest.kind, digest, path, bundle, binding, registered_at, size)

    async def unregister(self, name: str) -> None:
        """Remove ``name`` now for new requests; detach it once its in-flight requests finish."""
        try:
            async with self._lock:
                delta = self.get(name)
                live = dict(self._live)
                del live[name]
                commit = await self._prepare_publish(live)
                await asyncio.to_thread(self._write_index, live)
                await _fault_point("unindexed", name)
                commit()
                self._live = live
                self._update_gauges()
            await self._detach(delta)
            metrics.REGISTRY_OPS.labels("unregister", "ok").inc()
        except Exception:
            metrics.REGISTRY_OPS.labels("unregister", "error").inc()
            raise

    async def _prepare_publish(self, live: dict[str, LiveDelta]):
        if self.before_publish is None:
            return lambda: None
        return await self.before_publish([live[n] for n in sorted(live)])

    def _retire(self, delta: LiveDelta) -> None:
        task = asyncio.create_task(self._detach(delta))
        self._cleanup_tasks.add(task)
        task.add_done_callback(self._cleanup_tasks.discard)

    async def _detach(self, delta: LiveDelta) -> None:
        delta.retired = True
        if delta.leases:
            try:
                await asyncio.wait_for(delta.drained.wait(), DRAIN_TIMEOUT_S)
            except TimeoutError:
                log.warning(
                    "delta %s still has %d requests after %ss; detaching anyway",
                    delta.name,
                    delta.leases,
                    DRAIN_TIMEOUT_S,
                )
        await delta.binding.unbind(self.engine)
        if self.owns_store:
            shutil.rmtree(delta.path, ignore_errors=True)
            if self.remote is not None and self.unindexed([delta.path.name]):  # not registered again meanwhile
                try:
                    await asyncio.to_thread(self.remote.delete_version, delta.path.name)
                except Exception as exc:  # left for the next start's clean-up
                    log.warning("could not remove %s from %s: %s", delta.path.name, self.remote.url, exc)

    # ---- a replica's versions (owns_store=False) ----------------------------------------

    async def load_version(self, key: str) -> LiveDelta:
        """Bind the stored version ``key`` (its directory under ``deltas/``), validated again, for a replica.

        The directory decides, not the index: a request the ingress forwarded just before an unregistration
        still finds its version (the ingress keeps the directory while such a request runs). Not entered in the
        live table: the caller keeps it and hands it back with :meth:`release`."""
        match = VERSION_KEY.fullmatch(key)
        path = self.store / "deltas" / key
        if match is None or not path.is_dir():
            raise NotFoundError(f"no stored delta version `{key}`")
        name, prefix = match.groups()
        record = self.indexed().get(name) or {}
        delta = await self._bind_stored(name, path, record.get("registered_at", path.stat().st_mtime))
        if delta.digest.removeprefix("sha256:")[:16] != prefix:
            await delta.binding.unbind(self.engine)
            raise NotFoundError(f"the stored delta version `{key}` does not hold the content its name says")
        log.info("loaded %s (%s) on demand", key, delta.kind)
        return delta

    def unindexed(self, keys) -> list[str]:
        """Those of ``keys`` (version keys) that the index no longer names: unregistered or replaced versions."""
        current = {Path(r["dir"]).name for r in self.indexed().values()}
        return [k for k in keys if k not in current]

    def release(self, delta: LiveDelta) -> None:
        """Detach a version bound by :meth:`load_version` once its requests end (in the background)."""
        self._retire(delta)

    def _update_gauges(self) -> None:
        counts: dict[str, int] = {}
        for d in self._live.values():
            counts[d.kind] = counts.get(d.kind, 0) + 1
        for kind in set(counts) | set(kinds()):
            metrics.DELTAS.labels(kind).set(counts.get(kind, 0))

    async def close(self) -> None:
        for task in list(self._cleanup_tasks):
            with contextlib.suppress(Exception):
                await task
