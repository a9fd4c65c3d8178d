"""The fleet's store in an S3-compatible bucket (``server/object_store.py``): the ingress's registry publishes to it,
a new ingress restores from it, failures change nothing. Real registry, real bundles, a real S3 HTTP server on
127.0.0.1 (``s3_server``); no engine (the ingress's registry binds nothing). Replicas reading from the bucket:
``test_ray_serve.py::test_replicas_read_the_store_from_a_bucket``."""

from __future__ import annotations

import json

import pytest

from helpers import make_lora_bundle

MiB = 1 << 20


def _registry(tiny_base, store, url):
    from deltaserve.server.config import EngineConfig
    from deltaserve.server.deploy_ray import FleetEngine
    from deltaserve.server.object_store import ObjectStore
    from deltaserve.server.registry import DeltaRegistry

    engine = FleetEngine(EngineConfig(model=str(tiny_base)), 512)
    return DeltaRegistry(store, tiny_base, engine, max_bundle_bytes=64 * MiB, bind=False, remote=ObjectStore(url))


def _objects(url: str) -> dict[str, bytes]:
    from deltaserve.server.object_store import ObjectStore

    remote = ObjectStore(url)
    keys = [o["Key"] for o in remote.client.list_objects_v2(Bucket=remote.bucket).get("Contents", [])]
    return {k: remote.client.get_object(Bucket=remote.bucket, Key=k)["Body"].read() for k in keys}


def _files(directory) -> dict[str, bytes]:
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


async def test_registrations_reach_the_bucket_and_a_new_ingress_restores_them(tiny_base, tmp_path, s3_url):
    bundle = make_lora_bundle(tiny_base, tmp_path / "bundle", name="bucketed", seed=5)
    first = _registry(tiny_base, tmp_path / "a", s3_url)
    assert await first.restore() == []
    delta = await first.register(bundle)
    objects = _objects(s3_url)
    index = json.loads(objects["fleet/index.json"])
    assert list(index["deltas"]) == ["bucketed"]
    assert objects["fleet/index.json"] == (tmp_path / "a" / "index.json").read_bytes()
    version = f"fleet/{index['deltas']['bucketed']['dir']}/"
    assert {k[len(version) :]: v for k, v in objects.items() if k.startswith(version)} == _files(delta.path)

    # A new ingress (an empty store directory on another machine) finds every registration in the bucket.
    second = _registry(tiny_base, tmp_path / "b", s3_url)
    assert await second.restore() == []
    assert second.names() == ["bucketed"]
    assert _files(second.get("bucketed").path) == _files(delta.path)

    # Unregistered: gone from the bucket's index, then its files (once no request holds it).
    await first.unregister("bucketed")
    objects = _objects(s3_url)
    assert json.loads(objects["fleet/index.json"])["deltas"] == {}
    assert not [k for k in objects if k.startswith(version)], sorted(objects)
    third = _registry(tiny_base, tmp_path / "c", s3_url)
    assert await third.restore() == [] and third.names() == []


async def test_an_unusable_bucket_is_a_503_and_changes_nothing(tiny_base, tmp_path, s3_url):
    from deltaserve.server.errors import UnavailableError, status_of

    bundle = make_lora_bundle(tiny_base, tmp_path / "bundle", name="nowhere", seed=6)
    registry = _registry(tiny_base, tmp_path / "store", s3_url.replace("s3://", "s3://no-such-bucket-", 1))
    with pytest.raises(UnavailableError) as refused:  # at start: the bucket's index cannot be read
        await registry.restore()
    assert "no-such-bucket" in str(refused.value) and status_of(refused.value)[1] == 503
    registry = _registry(tiny_base, tmp_path / "store", s3_url)
    await registry.restore()
    registry.remote.bucket = "no-such-bucket"  # the bucket goes away while the server runs
    with pytest.raises(UnavailableError):
        await registry.register(bundle)
    assert registry.names() == []
    assert not (tmp_path / "store" / "index.json").exists()
    assert list((tmp_path / "store" / "deltas").iterdir()) == []


async def test_orphans_are_removed_and_unsafe_names_refused(tiny_base, tmp_path, s3_url):
    from deltaserve.server.errors import UnavailableError
    from deltaserve.server.object_store import ObjectStore

    remote = ObjectStore(s3_url)
    orphan = "cut-short-0123456789abcdef"  # the files of an upload that never reached the index
    remote.client.put_object(Bucket=remote.bucket, Key=f"fleet/deltas/{orphan}/manifest.json", Body=b"{}")
    registry = _registry(tiny_base, tmp_path / "store", s3_url)
    await registry.restore()
    assert orphan not in remote.versions()

    evil = "evil-0123456789abcdef"
    remote.client.put_object(Bucket=remote.bucket, Key=f"fleet/deltas/{evil}/../../../escaped", Body=b"x")
    with pytest.raises(UnavailableError, match="unsafe"):
        remote.fetch_version(evil, tmp_path / "cache")
    assert not (tmp_path / "cache" / "deltas" / evil).exists() and not list(tmp_path.rglob("escaped"))
