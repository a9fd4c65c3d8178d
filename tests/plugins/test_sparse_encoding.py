"""The `sparse` kind's encodings on plain tensors: exact round trips, sizes, the writer's choice, layout checks."""

from __future__ import annotations

import math

import pytest
import torch

from deltaserve.plugins.sparse.encoding import ENCODINGS, decode, encode, layout_problems, smallest

# (shape, indices): padding bits in the last mask byte, steps of exactly 65535 and 65536 (one escape),
# 200_000 (three escapes), the first and last entries, no entry at all.
PATTERNS = {
    "padded": ((2, 5), [0, 3, 9]),
    "escapes": ((300_000,), [65534, 131069, 196605, 199_999, 299_999]),
    "ends": ((64, 8), [0, 511]),
    "empty": ((4, 4), []),
    "full": ((3, 3), list(range(9))),
}


def roundtrip(encoding, shape, indices, values):
    parts = encode(encoding, indices, values, shape)
    tensors = {f"P.{part}": t for part, t in parts.items()}
    assert layout_problems(tensors, "P", encoding, shape) == []
    return decode(tensors, "P", {"encoding": encoding}), parts


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("pattern", sorted(PATTERNS))
@pytest.mark.parametrize("encoding", ENCODINGS)
def test_every_encoding_round_trips_exactly(encoding, pattern, dtype):
    shape, positions = PATTERNS[pattern]
    indices = torch.tensor(positions, dtype=torch.int64)
    values = (torch.randn(len(positions), generator=torch.Generator().manual_seed(0)) + 3.0).to(dtype)  # none is 0
    (got_indices, got_values), parts = roundtrip(encoding, shape, indices, values)
    assert got_indices.dtype == torch.int64 and torch.equal(got_indices, indices)
    assert got_values.dtype == dtype and torch.equal(got_values, values)
    v, nnz, numel = values.element_size(), len(positions), math.prod(shape)
    steps = torch.diff(indices, prepend=torch.tensor([-1]))
    expected_bytes = {
        "indices64": nnz * (8 + v),
        "indices32": nnz * (4 + v),
        "gaps16": 2 * (nnz + int(((steps - 1) // 65535).sum())) + nnz * v,
        "bitmask": math.ceil(numel / 8) + nnz * v,
        "dense": numel * v,
    }[encoding]
    assert sum(t.nbytes for t in parts.values()) == expected_bytes


def test_gaps16_codes_with_escapes():
    codes = encode("gaps16", torch.tensor([65534, 131069, 196605]), torch.ones(3), (200_000,))["gaps"]
    assert codes.dtype == torch.uint16
    assert codes.tolist() == [65535, 65535, 0, 1]  # a step of 65535 is one code; 65536 is an escape, then 1


def test_bitmask_bit_order():
    mask = encode("bitmask", torch.tensor([0, 3, 9]), torch.ones(3), (2, 5))["mask"]
    assert mask.tolist() == [0b00001001, 0b00000010]  # bit i % 8 of byte i // 8, least significant first


def test_dense_keeps_the_changed_entries_and_refuses_a_zero_difference():
    (indices, values), parts = roundtrip("dense", (2, 3), torch.tensor([1, 4]), torch.tensor([-0.5, 2.0]))
    assert parts["values"].tolist() == [[0.0, -0.5, 0.0], [0.0, 2.0, 0.0]]
    assert indices.tolist() == [1, 4] and values.tolist() == [-0.5, 2.0]
    assert encode("dense", torch.tensor([1, 4]), torch.tensor([0.0, 2.0]), (2, 3)) is None
    assert encode("dense", torch.tensor([1, 4]), torch.tensor([-0.0, 2.0]), (2, 3)) is None
    # the others carry a zero difference as it is
    (_, values), _ = roundtrip("bitmask", (2, 3), torch.tensor([1, 4]), torch.tensor([0.0, 2.0]))
    assert values.tolist() == [0.0, 2.0]


def spider_like(numel: int, density: float, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    indices = torch.randperm(numel, generator=gen)[: int(numel * density)].sort().values
    return indices, torch.randn(indices.numel(), generator=gen)


@pytest.mark.parametrize(
    ("numel", "density", "expected"),
    [
        (49_152, 0.53, "bitmask"),  # float32: 0.125 + 0.53·4 < 4 bytes per entry (dense) < 0.53·12 (int64 indices)
        (49_152, 0.97, "dense"),  # 0.125 + 0.97·4 > 4
        (49_152, 0.01, "gaps16"),  # 6 bytes per changed entry, the mask alone would be 12.5
        (49_152, 0.001, "gaps16"),
        (10_000_000, 0.000_003, "indices32"),  # average step ≈ 330k: 5 escapes per entry cost more than 4 bytes
    ],
)
def test_writer_picks_the_fewest_bytes(numel, density, expected):
    indices, values = spider_like(numel, density)
    encoding, parts = smallest(indices, values, (numel,))
    assert encoding == expected
    sizes = {e: sum(t.nbytes for t in p.values()) for e in ENCODINGS if (p := encode(e, indices, values, (numel,)))}
    assert sum(t.nbytes for t in parts.values()) == min(sizes.values())


def test_a_zero_difference_is_never_stored_dense():
    indices, values = spider_like(49_152, 0.97)
    values[7] = 0.0
    assert smallest(indices, values, (49_152,))[0] == "bitmask"


def test_ties_go_to_the_earlier_encoding():
    assert smallest(torch.tensor([], dtype=torch.int64), torch.tensor([]), (4096,))[0] == "indices32"


@pytest.mark.parametrize(
    ("encoding", "tensors", "shape", "problem"),
    [
        ("bitmask", {"P.mask": torch.tensor([0, 0b100], dtype=torch.uint8)}, (10,), "`P.mask` has bits set beyond the parameter's 10 entries"),
        ("bitmask", {"P.mask": torch.tensor([1], dtype=torch.uint8)}, (10,), "`P.mask` has 1 bytes, expected ceil(10 / 8) = 2"),
        ("indices32", {"P.indices": torch.tensor([0], dtype=torch.int32)}, (2**31 + 1,), "too many for `indices32`"),
        ("gaps16", {"P.gaps": torch.tensor([[1]], dtype=torch.uint16)}, (10,), "`P.gaps` must be a 1-D uint16 tensor, got U16 [1, 1]"),
    ],
)  # fmt: skip
def test_layout_problems(encoding, tensors, shape, problem):
    tensors = {"P.values": torch.ones(1), **tensors}
    problems = layout_problems(tensors, "P", encoding, shape)
    assert len(problems) == 1 and problem in problems[0], problems
