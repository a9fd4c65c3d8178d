"""The fleet's delta store in an S3-compatible bucket: ``deltaserve serve --replicas N --store-url s3://bucket/prefix``.

Engine replicas read the deltas the ingress registered. By default they share the store directory (shared storage
across machines); with ``--store-url`` the ingress also *publishes* the store to an object store, and each replica
reads from there into a private cache directory — for fleets without a shared file system. The layout under the
prefix mirrors the store directory's:

    <prefix>/index.json                     the index (the same bytes as <store>/index.json)
    <prefix>/deltas/<task>-<digest16>/...   each indexed version's files
    <prefix>/replicas/<replica>.json|.prom  each replica's status and Prometheus snapshot (``StatusBoard``)

Consistency: the ingress uploads a version's files before the index that names it and deletes them only after the
index stopped naming them and no forwarded request still uses them (S3 reads are strongly consistent, so a reader
that sees an index finds its versions). A replica downloads a version into ``<cache>/staging`` and renames it into
``<cache>/deltas/`` only when complete; its registry then validates the bundle again (safetensors and JSON only),
as it does from a shared directory. The ingress keeps its own store directory as today: at start it takes the
bucket's index and versions when the bucket has an index (so a new ingress machine restores every registration),
else it publishes what it has.

The client is boto3 (``pip install 'deltaserve[s3]'``); endpoint, region and credentials come from the standard
AWS configuration (``AWS_ENDPOINT_URL`` for MinIO, Ceph or any other S3-compatible store, ``AWS_ACCESS_KEY_ID``…).
Errors of the object store reach clients as 503 (:class:`~deltaserve.server.errors.UnavailableError`).
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import uuid
from pathlib import Path

from deltaserve.server.errors import UnavailableError

SCHEME = "s3://"
INDEX = "index.json"
DELTAS = "deltas"


def parse_url(url: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` → (bucket, ``some/prefix/``); the prefix may be empty."""
    if not url.startswith(SCHEME) or not url[len(SCHEME) :].split("/", 1)[0]:
        raise ValueError(f"a store URL is s3://<bucket>[/<prefix>], not {url!r}")
    bucket, _, prefix = url[len(SCHEME) :].partition("/")
    prefix = prefix.strip("/")
    return bucket, f"{prefix}/" if prefix else ""


def _unavailable(fn):
    """The object store's failures (unreachable endpoint, missing bucket, denied) as 503s naming the store."""

    @functools.wraps(fn)
    def wrapper(self, *args, **kwargs):
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(self, *args, **kwargs)
        except (BotoCoreError, ClientError) as exc:
            raise UnavailableError(f"the delta store {self.url} cannot be used: {exc}") from None

    return wrapper


class ObjectStore:
    """One bucket prefix holding a delta store (see the module docstring)."""

    def __init__(self, url: str):
        import boto3
        from botocore.config import Config

        self.url = url
        self.bucket, self.prefix = parse_url(url)
        self.client = boto3.client("s3", config=Config(retries={"max_attempts": 3, "mode": "standard"}))

    def _key(self, *parts: str) -> str:
        return self.prefix + "/".join(parts)

    def _list(self, *parts: str) -> list[str]:
        """Object keys under ``<prefix>/<parts>/``."""
        keys = []
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self._key(*parts) + "/"
        )
        for page in pages:
            keys += [o["Key"] for o in page.get("Contents", [])]
        return keys

    # ---- the index and versions (written by the ingress) ---------------------------------------------------

    def read_index(self) -> bytes | None:
        return self.get(INDEX)

    @_unavailable
    def versions(self) -> set[str]:
        """Version keys with objects in the bucket."""
        start = len(self._key(DELTAS)) + 1
        return {k[start:].split("/", 1)[0] for k in self._list(DELTAS)}

    @_unavailable
    def publish(self, index: bytes, store: Path, dirs: list[str]) -> None:
        """Upload the versions ``dirs`` (paths relative to ``store``, ``deltas/<key>``) the bucket's index does not
        name yet (those it names were uploaded whole before it named them; others may be the remains of an upload
        cut short, and are uploaded again), then ``index``."""
        current = self.read_index()
        present = {Path(r["dir"]).name for r in json.loads(current).get("deltas", {}).values()} if current else set()
        for rel in dirs:
            local = store / rel
            if local.name in present:
                continue  # content-addressed: a version's files never change
            for path in sorted(p for p in local.rglob("*") if p.is_file()):
                self.client.upload_file(str(path), self.bucket, self._key(rel, path.relative_to(local).as_posix()))
        self.put(index, INDEX)

    @_unavailable
    def delete_version(self, key: str) -> None:
        keys = self._list(DELTAS, key)
        for i in range(0, len(keys), 1000):
            self.client.delete_objects(
                Bucket=self.bucket, Delete={"Objects": [{"Key": k} for k in keys[i : i + 1000]], "Quiet": True}
            )

    # ---- reading into a local store directory (replicas; a new ingress) -------------------------------------

    @_unavailable
    def fetch_version(self, key: str, store: Path) -> Path:
        """``<store>/deltas/<key>``, downloaded unless present; complete or absent (staged, then renamed)."""
        target = store / DELTAS / key
        if target.is_dir():
            return target
        keys = self._list(DELTAS, key)
        staging = store / "staging" / f"{key}.{uuid.uuid4().hex}"
        try:
            base = self._key(DELTAS, key) + "/"
            for k in keys:
                rel = Path(k[len(base) :])
                if rel.is_absolute() or ".." in rel.parts:
                    raise UnavailableError(f"the delta store {self.url} holds an unsafe object name {k!r}")
                (staging / rel).parent.mkdir(parents=True, exist_ok=True)
                self.client.download_file(self.bucket, k, str(staging / rel))
            if keys:
                target.parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.rename(staging, target)
                except OSError:
                    if not target.is_dir():  # else: another download of the same content won
                        raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return target

    def pull(self, store: Path, *, versions: bool) -> bytes | None:
        """Copy the bucket's index into ``store`` (atomically; ``None`` and nothing written when the bucket has
        none), with every version it names when ``versions``."""
        from deltaserve.server.registry import _write_atomic

        index = self.read_index()
        if index is None:
            return None
        if versions:
            for record in json.loads(index).get("deltas", {}).values():
                self.fetch_version(Path(record["dir"]).name, store)
        _write_atomic(store / INDEX, index)
        return index

    # ---- single objects (replica statuses) ----------------------------------------------------------------

    @_unavailable
    def get(self, *parts: str) -> bytes | None:
        """The object ``<prefix>/<parts>``, or None when there is none."""
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(*parts))["Body"].read()
        except self.client.exceptions.NoSuchKey:
            return None

    @_unavailable
    def put(self, body: bytes, *parts: str) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self._key(*parts), Body=body)

    @_unavailable
    def delete(self, *parts: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._key(*parts))

    @_unavailable
    def names(self, *parts: str) -> list[str]:
        """Names of the objects under ``<prefix>/<parts>/``."""
        start = len(self._key(*parts)) + 1
        return [k[start:] for k in self._list(*parts)]
