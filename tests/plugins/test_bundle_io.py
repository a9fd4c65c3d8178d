"""Writing bundles (atomic, validated, no overwrite by accident), manifests round-trip, content digests."""

from __future__ import annotations

import hashlib
import json
import re

import pytest
import torch

from deltaserve.plugins.bundle import Limits, Manifest, content_digest, read_bundle, write_bundle
from deltaserve.plugins.errors import BundleError
from deltaserve.plugins.sparse import sparse_from_dense, write_sparse_bundle

P = "language_model.model.layers.0.self_attn.o_proj.weight"


def small_deltas():
    w0 = torch.zeros(128, 128)
    w = w0.clone()
    w[3, 5], w[100, 0] = 0.5, -1.25
    return sparse_from_dense({P: w0}, {P: w})


def test_sparse_from_dense_keeps_only_changes():
    w0 = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.ones(4)}
    w = {"a": w0["a"].clone(), "b": w0["b"].clone()}
    w["a"][1, 2] += 2.0
    w["a"][0, 0] -= 1.0
    deltas = sparse_from_dense(w0, w)
    assert list(deltas) == ["a"]  # unchanged "b" is left out
    indices, values = deltas["a"]
    assert indices.tolist() == [0, 5] and indices.dtype == torch.int64
    assert values.tolist() == [-1.0, 2.0]


def test_write_refuses_overwrite_and_is_atomic(tmp_path, base_spec):
    out = tmp_path / "bundles" / "task"
    write_sparse_bundle(out, name="task", base=base_spec, deltas=small_deltas())
    first = content_digest(out)
    with pytest.raises(FileExistsError):
        write_sparse_bundle(out, name="task", base=base_spec, deltas=small_deltas())
    deltas = small_deltas()
    deltas[P][1][0] = 0.75
    write_sparse_bundle(out, name="task", base=base_spec, deltas=deltas, overwrite=True)
    assert content_digest(out) != first
    assert sorted(p.name for p in out.parent.iterdir()) == ["task"]  # no temp or old directories left
    assert json.loads((out / "delta.json").read_text())["config"]["params"][P] == {
        "shape": [128, 128],
        "nnz": 2,
        "encoding": "gaps16",
    }


def test_invalid_content_is_never_published(tmp_path, base_spec):
    out = tmp_path / "task"
    deltas = small_deltas()
    deltas[P][1][0] = float("nan")
    with pytest.raises(BundleError, match="contains NaN/Inf") as info:
        write_sparse_bundle(out, name="task", base=base_spec, deltas=deltas)
    assert info.value.path == str(out)
    assert not out.exists() and list(tmp_path.iterdir()) == []
    with pytest.raises(BundleError, match="not a valid task name"):
        write_sparse_bundle(out, name="../task", base=base_spec, deltas=small_deltas())
    with pytest.raises(BundleError, match="does not exist in the base"):
        write_sparse_bundle(out, name="task", base=base_spec, deltas={"nope.weight": small_deltas()[P]})


@pytest.mark.parametrize(("density", "encoding"), [(0.53, "bitmask"), (0.97, "dense"), (0.001, "gaps16")])
def test_writer_stores_the_smallest_encoding(density, encoding, tmp_path, base_spec):
    numel = 128 * 128
    gen = torch.Generator().manual_seed(0)
    indices = torch.randperm(numel, generator=gen)[: int(numel * density)].sort().values
    out = write_sparse_bundle(
        tmp_path / "b", name="b", base=base_spec, deltas={P: (indices, torch.randn(indices.numel(), generator=gen))}
    )
    manifest = json.loads((out / "delta.json").read_text())
    assert manifest["format_version"] == 2 and manifest["config"]["params"][P]["encoding"] == encoding
    payload = {"bitmask": numel // 8 + 4 * indices.numel(), "dense": 4 * numel, "gaps16": None}[encoding]
    if payload is not None:  # the file is the payload plus its JSON header
        size = (out / "delta.safetensors").stat().st_size
        assert payload < size < payload + 512 and size < 12 * indices.numel()  # format 1: 12 bytes per entry


def test_writer_refuses_positions_it_cannot_encode(tmp_path, base_spec):
    indices, values = small_deltas()[P]
    for bad, problem in (
        (indices.flip(0), f"unsorted indices in `{P}.indices`"),
        (torch.tensor([7, 7]), f"duplicate index in `{P}.indices`"),
        (torch.tensor([7, 128 * 128]), f"index out of range in `{P}.indices`"),
        (indices[:1], f"`{P}`: indices and values must be 1-D tensors of the same length"),
    ):
        with pytest.raises(BundleError, match=re.escape(problem)):
            write_sparse_bundle(tmp_path / "b", name="b", base=base_spec, deltas={P: (bad, values)})
    assert not (tmp_path / "b").exists()


def test_format_version_is_the_oldest_that_reads_the_bundle(pristine):
    versions = {
        kind: json.loads((path / "delta.json").read_text())["format_version"] for kind, path in pristine.items()
    }
    assert versions == {"sparse": 2, "sparse-v1": 1, "lora": 1, "bottleneck": 1}
    v1, v2 = ((pristine[k] / "delta.safetensors").stat().st_size for k in ("sparse-v1", "sparse"))
    assert v2 < 0.5 * v1  # 10% density, float32: mask + values ≈ 5.25 bytes per entry instead of 12


def test_write_into_empty_directory(tmp_path, base_spec):
    out = tmp_path / "task"
    out.mkdir()
    write_sparse_bundle(out, name="task", base=base_spec, deltas=small_deltas())
    assert read_bundle(out, base=base_spec).manifest.config["density"] == pytest.approx(2 / (128 * 128))


def test_manifest_round_trip(pristine):
    text = (pristine["sparse"] / "delta.json").read_text()
    manifest = Manifest.from_json(text)
    assert manifest.task.examples[0].image == "examples/circle.png"
    assert manifest.method.name == "spider" and manifest.task.metrics == {"accuracy": 0.5}
    assert Manifest.from_json(manifest.to_json()) == manifest
    assert json.loads(manifest.to_json()) == json.loads(text)
    with pytest.raises(BundleError, match="unexpected field `surprise`"):
        Manifest.from_json(json.dumps({**json.loads(text), "surprise": 1}))


def test_content_digest_covers_every_file(bundle_copy):
    bundle = bundle_copy("sparse")
    digest = content_digest(bundle)
    assert digest.startswith("sha256:") and content_digest(bundle) == digest
    (bundle / "README.md").write_bytes(b"# changed\n")
    assert content_digest(bundle) != digest


def test_generic_writer_with_bytes_and_limits(tmp_path, base_spec):
    out = write_bundle(
        tmp_path / "b", name="b", kind="sparse", base=base_spec, validate=False,
        config={}, files={"notes.md": b"x" * 10},
    )  # fmt: skip
    assert json.loads((out / "delta.json").read_text())["files"]["notes.md"] == hashlib.sha256(b"x" * 10).hexdigest()
    with pytest.raises(BundleError, match="`config.params` must be a non-empty object"):
        read_bundle(out, limits=Limits())
