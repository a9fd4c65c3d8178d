"""The data loader rejects bad task data with one typed error naming file and line."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from deltaserve.tuning.data import load_task, read_split, read_task_info
from deltaserve.tuning.errors import DataError

GOOD = {"id": "s0", "prompt": "Which digit is written here?", "target": "7", "image": "images/a.png"}


def _task(tmp_path, lines: list[str], info: dict | None = None):
    root = tmp_path / "task"
    (root / "images").mkdir(parents=True)
    Image.new("RGB", (32, 32), (200, 10, 10)).save(root / "images" / "a.png")
    (root / "images" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    meta = {
        "name": "toy",
        "description": "a toy task",
        "type": "downstream",
        "metric": "exact_match",
        "example_prompts": ["Which digit?"],
    }
    (root / "task.json").write_text(json.dumps(info if info is not None else meta))
    good = json.dumps(GOOD) + "\n" + json.dumps({**GOOD, "id": "s1", "image": None}) + "\n"
    for split in ("val", "test"):
        (root / f"{split}.jsonl").write_text(good)
    (root / "train.jsonl").write_text("\n".join(lines) + "\n")
    return root


def _line(**changes) -> str:
    record = {**GOOD, "id": "bad"}
    for key, value in changes.items():
        if value is ...:
            record.pop(key)
        else:
            record[key] = value
    return json.dumps(record)


@pytest.mark.parametrize(
    "bad_line, message",
    [
        ('{"id": "bad", "prompt": "x", ', "malformed JSON"),
        ('["a", "list"]', "expected a JSON object"),
        (_line(target=""), "empty `target`"),
        (_line(target="   "), "empty `target`"),
        (_line(target=...), "missing field `target`"),
        (_line(prompt=...), "missing field `prompt`"),
        (_line(id=3), "`id` must be a string"),
        (_line(image="images/missing.png"), "image file not found: 'images/missing.png'"),
        (_line(image="images/broken.png"), "unreadable image 'images/broken.png'"),
        (_line(image="../escape.png"), "stay inside"),
        (_line(prompt="<image>\nWhich digit?"), "reserved placeholder"),
        (_line(id="s0"), "duplicate `id` 's0' (first on line 1)"),
    ],
)
def test_bad_line_is_named_by_file_and_line(tmp_path, bad_line, message):
    root = _task(tmp_path, [json.dumps(GOOD), "", bad_line])  # line 2 is blank: skipped, still counted
    with pytest.raises(DataError) as caught:
        load_task(root)
    text = str(caught.value)
    assert f"{root / 'train.jsonl'}:3: " in text
    assert message in text
    assert len(caught.value.problems) == 1 and caught.value.problems[0].line == 3


def test_every_problem_is_reported_at_once(tmp_path):
    root = _task(tmp_path, [_line(target=""), "{nope", _line(image="images/missing.png", id="x2")])
    with pytest.raises(DataError) as caught:
        read_split(root, "train")
    assert [p.line for p in caught.value.problems] == [1, 2, 3]
    assert "3 problems" in str(caught.value)


def test_good_task_loads(tmp_path):
    root = _task(tmp_path, [json.dumps(GOOD), json.dumps({**GOOD, "id": "s1", "image": None})])
    task = load_task(root)
    assert task.name == "toy" and [s.id for s in task["train"]] == ["s0", "s1"]
    assert task["train"][0].image == root.resolve() / "images" / "a.png" and task["train"][1].image is None
    assert task["train"][0].load_image().size == (32, 32)


@pytest.mark.parametrize(
    "info, message",
    [
        ({"name": "Bad Name", "type": "general"}, "`name` must match"),
        ({"name": "toy", "type": "expert"}, "`type` must be one of"),
        ({"name": "toy", "type": "general", "metric": "bleu"}, "`metric` must be one of"),
    ],
)
def test_bad_task_json(tmp_path, info, message):
    root = _task(tmp_path, [json.dumps(GOOD)], info=info)
    with pytest.raises(DataError, match=message) as caught:
        read_task_info(root)
    assert str(root / "task.json") in str(caught.value)


def test_missing_split_file_is_named(tmp_path):
    root = _task(tmp_path, [json.dumps(GOOD)])
    (root / "val.jsonl").unlink()
    with pytest.raises(DataError, match=r"val\.jsonl: missing"):
        load_task(root)
