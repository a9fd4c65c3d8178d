"""Bad bundles: each breaks one thing in a valid bundle; read_bundle raises ONE BundleError naming it."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from deltaserve.plugins.bundle import Limits, read_bundle
from deltaserve.plugins.errors import BundleError, DeltaServeError

SPARSE_FILE, BN_FILE, LORA_FILE, LORA_CONFIG = (
    "delta.safetensors",
    "adapter.safetensors",
    "adapter_model.safetensors",
    "adapter_config.json",
)
P = "language_model.model.layers.3.mlp.down_proj.weight"  # a parameter the sparse bundle touches
BN_MODULE = "language_model.model.layers.0.mlp.down_proj"


# --- editing helpers: change one thing, keep everything else consistent --------------------------


def edit_manifest(bundle: Path, edit) -> None:
    manifest = json.loads((bundle / "delta.json").read_text())
    edit(manifest)
    (bundle / "delta.json").write_text(json.dumps(manifest))


def add_file(bundle: Path, rel: str, data: bytes, listed: bool = True) -> None:
    (bundle / rel).parent.mkdir(parents=True, exist_ok=True)
    (bundle / rel).write_bytes(data)
    if listed:  # a correct hash: the file itself must be the problem
        edit_manifest(bundle, lambda m: m["files"].__setitem__(rel, hashlib.sha256(data).hexdigest()))


def edit_tensors(bundle: Path, rel: str, edit) -> None:
    tensors = load_file(str(bundle / rel))
    edit(tensors)
    save_file(tensors, str(bundle / rel))
    add_file(bundle, rel, (bundle / rel).read_bytes())


def edit_json_file(bundle: Path, rel: str, edit) -> None:
    obj = json.loads((bundle / rel).read_text())
    edit(obj)
    add_file(bundle, rel, json.dumps(obj).encode())


class Evil:
    """Unpickling this creates the marker file: proof that code from the bundle ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


# --- the cases: (kind of the valid bundle, how to break it, distinctive substring) ---------------

CASES = {
    "unknown_kind": ("sparse", lambda b: edit_manifest(b, lambda m: m.__setitem__("kind", "nope")), "unknown kind `nope`; known kinds: `bottleneck`, `lora`, `sparse`"),
    "missing_manifest": ("sparse", lambda b: (b / "delta.json").unlink(), "missing manifest `delta.json`"),
    "malformed_json": ("sparse", lambda b: (b / "delta.json").write_text('{"name": "colours",'), "`delta.json` is not valid JSON"),
    "manifest_not_object": ("sparse", lambda b: (b / "delta.json").write_text("[1, 2]"), "`delta.json` must be a JSON object"),
    "missing_field": ("sparse", lambda b: edit_manifest(b, lambda m: m.pop("method")), "`method` must be an object"),
    "format_version": ("sparse", lambda b: edit_manifest(b, lambda m: m.__setitem__("format_version", 3)), "`format_version` must be 1 or 2, got 3"),
    "wrong_fingerprint": ("sparse", lambda b: edit_manifest(b, lambda m: m["base"].__setitem__("fingerprint", "sha256:" + "0" * 64)), "base fingerprint mismatch"),
    "sha256_mismatch": ("sparse", lambda b: edit_manifest(b, lambda m: m["files"].__setitem__(SPARSE_FILE, "0" * 64)), f"sha256 mismatch for `{SPARSE_FILE}`"),
    "missing_tensor": ("sparse", lambda b: edit_tensors(b, SPARSE_FILE, lambda t: t.pop(f"{P}.values")), f"missing tensor `{P}.values`"),
    "extra_tensor": ("sparse", lambda b: edit_tensors(b, SPARSE_FILE, lambda t: t.__setitem__("smuggled", torch.zeros(3))), "unexpected tensor `smuggled`"),
    "wrong_shape": ("bottleneck", lambda b: edit_tensors(b, BN_FILE, lambda t: t.__setitem__(f"{BN_MODULE}.down.weight", torch.zeros(8, 100))), f"`{BN_MODULE}.down.weight` has shape [8, 100], expected [8, 128]"),
    "wrong_dtype": ("sparse", lambda b: edit_tensors(b, SPARSE_FILE, lambda t: t.__setitem__(f"{P}.values", t[f"{P}.values"].half())), f"`{P}.values` has dtype F16, the base parameter is F32"),
    "index_out_of_range": ("sparse-v1", lambda b: edit_tensors(b, SPARSE_FILE, lambda t: t[f"{P}.indices"].__setitem__(-1, 128 * 384)), f"index out of range in `{P}.indices`"),
    "duplicate_index": ("sparse-v1", lambda b: edit_tensors(b, SPARSE_FILE, lambda t: t[f"{P}.indices"].__setitem__(1, t[f"{P}.indices"][0])), f"duplicate index in `{P}.indices`"),
    "unsorted_index": ("sparse-v1", lambda b: edit_tensors(b, SPARSE_FILE, lambda t: t[f"{P}.indices"].__setitem__(slice(0, 2), t[f"{P}.indices"][:2].flip(0).clone())), f"unsorted indices in `{P}.indices`"),
    "v1_with_encoding": ("sparse-v1", lambda b: edit_manifest(b, lambda m: m["config"]["params"][P].__setitem__("encoding", "indices64")), f"`config.params.{P}.encoding` needs `format_version` 2"),
    "v1_int32_indices": ("sparse-v1", lambda b: edit_tensors(b, SPARSE_FILE, lambda t: t.__setitem__(f"{P}.indices", t[f"{P}.indices"].int())), f"`{P}.indices` must be a 1-D int64 tensor, got I32"),
    "encoding_unknown": ("sparse", lambda b: edit_manifest(b, lambda m: m["config"]["params"][P].__setitem__("encoding", "zip")), f"`config.params.{P}.encoding` must be one of `bitmask`, `dense`, `gaps16`, `indices32`, `indices64`, got 'zip'"),
    "encoding_missing": ("sparse", lambda b: edit_manifest(b, lambda m: m["config"]["params"][P].pop("encoding")), f"`config.params.{P}.encoding` must be one of"),
    "param_entry_extra_field": ("sparse", lambda b: edit_manifest(b, lambda m: m["config"]["params"][P].__setitem__("codec", "x")), f"unexpected field `config.params.{P}.codec`"),
    "encoding_mislabelled": ("sparse:bitmask", lambda b: edit_manifest(b, lambda m: m["config"]["params"][P].__setitem__("encoding", "indices32")), f"missing tensor `{P}.indices`"),
    "indices32_wrong_dtype": ("sparse:indices32", lambda b: edit_tensors(b, SPARSE_FILE, lambda t: t.__setitem__(f"{P}.indices", t[f"{P}.indices"].long())), f"`{P}.indices` must be a 1-D int32 tensor, got I64"),
    "indices32_negative": ("sparse:indices32", lambda b: edit_tensors(b, SPARSE_FILE, lambda t: t[f"{P}.indices"].__setitem__(0, -1)), f"index out of range in `{P}.indices`: indices must lie in [0, 49152)"),
    "indices32_duplicate": ("sparse:indices32", lambda b: edit_tensors(b, SPARSE_FILE, lambda t: t[f"{P}.indices"].__setitem__(1, t[f"{P}.indices"][0])), f"duplicate index in `{P}.indices`"),
    "gaps16_past_the_end": ("sparse:gaps16", lambda b: edit_tensors(b, SPARSE_FILE, lambda t: t[f"{P}.gaps"].__setitem__(-1, 65535)), f"index out of range in `{P}.gaps`"),
    "gaps16_trailing_escape": ("sparse:gaps16", lambda b: edit_tensors(b, SPARSE_FILE, lambda t: t.__setitem__(f"{P}.gaps", torch.cat([t[f"{P}.gaps"], torch.zeros(1, dtype=torch.uint16)]))), f"`{P}.gaps` ends with the escape code 0"),
    "gaps16_signed": ("sparse:gaps16", lambda b: edit_tensors(b, SPARSE_FILE, lambda t: t.__setitem__(f"{P}.gaps", t[f"{P}.gaps"].to(torch.int16))), f"`{P}.gaps` must be a 1-D uint16 tensor, got I16"),
    "bitmask_length": ("sparse:bitmask", lambda b: edit_tensors(b, SPARSE_FILE, lambda t: t.__setitem__(f"{P}.mask", t[f"{P}.mask"][:-1].clone())), f"`{P}.mask` has 6143 bytes, expected ceil(49152 / 8) = 6144"),
    "bitmask_popcount": ("sparse:bitmask", lambda b: edit_tensors(b, SPARSE_FILE, lambda t: t[f"{P}.mask"].__setitem__(0, 255)), f"`{P}.mask` has"),
    "bitmask_2d": ("sparse:bitmask", lambda b: edit_tensors(b, SPARSE_FILE, lambda t: t.__setitem__(f"{P}.mask", t[f"{P}.mask"].view(96, 64))), f"`{P}.mask` must be a 1-D uint8 tensor, got U8 [96, 64]"),
    "values_2d": ("sparse:bitmask", lambda b: edit_tensors(b, SPARSE_FILE, lambda t: t.__setitem__(f"{P}.values", t[f"{P}.values"].view(1, -1))), f"`{P}.values` must be 1-D, got shape [1, "),
    "values_count": ("sparse:indices32", lambda b: edit_tensors(b, SPARSE_FILE, lambda t: t.__setitem__(f"{P}.values", t[f"{P}.values"][:-1].clone())), f"`{P}.values` has 4914 entries, `{P}.indices` has 4915 entries"),
    "dense_shape": ("sparse:dense", lambda b: edit_tensors(b, SPARSE_FILE, lambda t: t.__setitem__(f"{P}.values", t[f"{P}.values"].reshape(-1))), f"`{P}.values` has shape [49152], expected the parameter's [128, 384] (dense)"),
    "dense_nnz": ("sparse:dense", lambda b: edit_tensors(b, SPARSE_FILE, lambda t: t[f"{P}.values"].view(-1).__setitem__(t[f"{P}.values"].view(-1).nonzero()[0], 0.0)), f"`config.params.{P}.nnz` is 4915, `{P}.values` has 4914 non-zero entries"),
    "dense_int": ("sparse:dense", lambda b: edit_tensors(b, SPARSE_FILE, lambda t: t.__setitem__(f"{P}.values", t[f"{P}.values"].sign().int())), f"`{P}.values` must be F16, BF16, F32 or F64 (dense), got I32"),
    "nnz_mismatch": ("sparse", lambda b: edit_manifest(b, lambda m: m["config"]["params"][P].__setitem__("nnz", 1)), f"`config.params.{P}.nnz` is 1"),
    "nan_values": ("sparse", lambda b: edit_tensors(b, SPARSE_FILE, lambda t: t[f"{P}.values"].__setitem__(0, float("nan"))), f"tensor `{P}.values` in `{SPARSE_FILE}` contains NaN/Inf"),
    "inf_values": ("bottleneck", lambda b: edit_tensors(b, BN_FILE, lambda t: t[f"{BN_MODULE}.up.bias"].__setitem__(0, float("inf"))), "contains NaN/Inf"),
    "pickle_bin_file": ("sparse", lambda b: add_file(b, "extra.bin", pickle.dumps({"w": 1})), "pickle-type file `extra.bin` is not allowed; deltas are safetensors only"),
    "pickle_as_json": ("sparse", lambda b: add_file(b, "notes.json", pickle.dumps([1, 2])), "file `notes.json` is a pickle/zip archive"),
    "torch_zip_as_png": ("sparse", lambda b: add_file(b, "examples/circle.png", _torch_saved()), "file `examples/circle.png` is a pickle/zip archive"),
    "other_extension": ("sparse", lambda b: add_file(b, "run.py", b"print('hi')\n"), "file `run.py` has a type that is not allowed"),
    "name_with_slash": ("sparse", lambda b: edit_manifest(b, lambda m: m.__setitem__("name", "colours/evil")), "`name` 'colours/evil' is not a valid task name"),
    "name_with_dotdot": ("sparse", lambda b: edit_manifest(b, lambda m: m.__setitem__("name", "colours..evil")), "`name` 'colours..evil' is not a valid task name"),
    "unlisted_file": ("sparse", lambda b: add_file(b, "notes.md", b"hello\n", listed=False), "extra file `notes.md` is not listed in `files`"),
    "missing_file": ("sparse", lambda b: (b / "README.md").unlink(), "file `README.md` is listed in `files` but missing"),
    "path_escape": ("sparse", lambda b: edit_manifest(b, lambda m: m["files"].__setitem__("../outside.md", "0" * 64)), "unsafe path `../outside.md`"),
    "symlink": ("sparse", lambda b: os.symlink("/etc/hostname", b / "link.md"), "symlink `link.md` is not allowed"),
    "example_image_unlisted": ("sparse", lambda b: edit_manifest(b, lambda m: m["task"]["examples"].append({"text": "x", "image": "nowhere.png"})), "`task.examples[1].image` `nowhere.png` must be a PNG/JPEG listed in `files`"),
    "corrupt_safetensors": ("sparse", lambda b: add_file(b, SPARSE_FILE, (b / SPARSE_FILE).read_bytes()[:-100]), f"`{SPARSE_FILE}` is not a valid safetensors file"),
    "lora_config_not_json": ("lora", lambda b: add_file(b, LORA_CONFIG, b'{"r": 4,'), f"file `{LORA_CONFIG}` is not valid JSON"),
    "bottleneck_activation": ("bottleneck", lambda b: edit_manifest(b, lambda m: m["config"].__setitem__("activation", "swish")), "`config.activation` must be one of"),
    "lora_dora": ("lora", lambda b: edit_json_file(b, LORA_CONFIG, lambda c: c.__setitem__("use_dora", True)), "`use_dora` is set: DoRA is not supported"),
    "lora_rank": ("lora", lambda b: edit_json_file(b, LORA_CONFIG, lambda c: c.__setitem__("r", 8)), "LoRA rank of `language_model.model.layers.0.self_attn.q_proj` is 4/4 (A/B), `r` is 8"),
    "lora_incomplete_pair": ("lora", lambda b: edit_tensors(b, LORA_FILE, lambda t: t.pop("base_model.model.model.language_model.layers.1.self_attn.v_proj.lora_B.weight")), "the LoRA pair of `language_model.model.layers.1.self_attn.v_proj` has no `lora_B`"),
    "lora_wrong_dims": ("lora", lambda b: edit_tensors(b, LORA_FILE, lambda t: t.__setitem__("base_model.model.model.language_model.layers.0.self_attn.v_proj.lora_B.weight", torch.zeros(128, 4))), "LoRA of `language_model.model.layers.0.self_attn.v_proj` maps 128 → 128, the base module maps 128 → 64"),
    "lora_vision_target": ("lora", lambda b: _add_vision_lora(b), "LoRA target `vision_tower.vision_model.encoder.layers.0.self_attn.q_proj` is outside the language model"),
}  # fmt: skip


def _torch_saved() -> bytes:
    import io

    buf = io.BytesIO()
    torch.save({"w": torch.zeros(2)}, buf)
    return buf.getvalue()


def _add_vision_lora(bundle: Path) -> None:
    prefix = "base_model.model.model.vision_tower.encoder.layers.0.self_attn.q_proj"

    def add(t):
        t[f"{prefix}.lora_A.weight"], t[f"{prefix}.lora_B.weight"] = torch.zeros(4, 64), torch.zeros(64, 4)

    edit_tensors(bundle, LORA_FILE, add)
    target = "vision_tower.vision_model.encoder.layers.0.self_attn.q_proj"
    edit_manifest(bundle, lambda m: m["config"].__setitem__("modules", sorted(m["config"]["modules"] + [target])))


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_bundle_is_rejected_with_one_error(case, bundle_copy, base_spec):
    kind, breaker, expected = CASES[case]
    bundle = bundle_copy(kind)
    read_bundle(bundle, base=base_spec)  # valid before the edit
    breaker(bundle)
    with pytest.raises(BundleError) as info:
        read_bundle(bundle, base=base_spec)
    assert isinstance(info.value, DeltaServeError)
    assert expected in str(info.value), info.value.problems
    assert str(info.value).startswith(f"invalid delta bundle {bundle}: ")
    # One break, one problem (no follow-up noise) — except where one edit really breaks several things.
    assert len(info.value.problems) == 1 or case in CONSEQUENTIAL, info.value.problems


# every LoRA pair mismatches `r`; nnz also changes the density; extra bits are extra positions without values;
# another encoding's tensors are both missing and unexpected
CONSEQUENTIAL = {"lora_rank", "nnz_mismatch", "bitmask_popcount", "encoding_mislabelled"}


def test_file_above_size_limit(bundle_copy, base_spec):
    bundle = bundle_copy("sparse")
    size = (bundle / SPARSE_FILE).stat().st_size
    with pytest.raises(BundleError, match=rf"file `{SPARSE_FILE}` is {size} bytes, above the limit of 1000"):
        read_bundle(bundle, base=base_spec, limits=Limits(max_file_bytes=1000))
    with pytest.raises(BundleError, match="bytes in total, above the limit of 2000"):
        read_bundle(bundle, base=base_spec, limits=Limits(max_total_bytes=2000))
    with pytest.raises(BundleError, match="`delta.json` is .* bytes, above the limit of 100"):
        read_bundle(bundle, base=base_spec, limits=Limits(max_manifest_bytes=100))
    with pytest.raises(BundleError, match="more than 2 files and folders"):
        read_bundle(bundle, base=base_spec, limits=Limits(max_files=2))


@pytest.mark.parametrize("where", ["extra.bin", "notes.json", SPARSE_FILE])
def test_validation_never_unpickles(where, bundle_copy, base_spec, tmp_path):
    # The payload is real: unpickling it here does create a marker.
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(Evil(probe)))
    assert probe.exists()
    marker = tmp_path / "pwned"
    bundle = bundle_copy("sparse")
    add_file(bundle, where, pickle.dumps(Evil(marker)))
    with pytest.raises(BundleError):
        read_bundle(bundle, base=base_spec)
    assert not marker.exists()


def test_all_problems_are_reported_at_once(bundle_copy, base_spec):
    bundle = bundle_copy("sparse")
    edit_manifest(bundle, lambda m: m["base"].__setitem__("fingerprint", "sha256:" + "1" * 64))
    edit_manifest(bundle, lambda m: m.__setitem__("name", "Bad Name"))
    add_file(bundle, "weights.pt", b"\x80\x04K\x01.")
    edit_tensors(bundle, SPARSE_FILE, lambda t: t.__setitem__("smuggled", torch.zeros(1)))
    edit_manifest(bundle, lambda m: m["files"].__setitem__("README.md", "f" * 64))
    with pytest.raises(BundleError) as info:
        read_bundle(bundle, base=base_spec)
    message = str(info.value)
    for expected in (
        "base fingerprint mismatch",
        "not a valid task name",
        "pickle-type file `weights.pt`",
        "unexpected tensor `smuggled`",
        "sha256 mismatch for `README.md`",
    ):
        assert expected in message
    assert len(info.value.problems) == 5, info.value.problems


def test_not_a_directory(tmp_path):
    with pytest.raises(BundleError, match="is not a directory"):
        read_bundle(tmp_path / "absent")


def test_without_base_the_fingerprint_is_not_checked(bundle_copy):
    bundle = bundle_copy("sparse")
    edit_manifest(bundle, lambda m: m["base"].__setitem__("fingerprint", "sha256:" + "0" * 64))
    assert read_bundle(bundle).manifest.base.fingerprint == "sha256:" + "0" * 64
