"""The synthetic world: deterministic, disjoint splits, routable prompts, loadable by the data loader."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from deltaserve.tuning.cache import tree_hash
from deltaserve.tuning.data import SPLITS, load_task, load_tasks
from deltaserve.tuning.world import DOWNSTREAM_TASKS, GENERAL_TASKS, TASKS, WorldConfig, build_world
from deltaserve.tuning.world.relations import relation
from deltaserve.tuning.world.spec import split_of

SMALL = WorldConfig(general_train=24, downstream_train=24, val=6, test=8)


@pytest.fixture(scope="module")
def small_world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world") / "a"
    build_world(out, SMALL)
    return out


def test_same_seed_gives_identical_files(small_world, tmp_path):
    build_world(tmp_path / "b", SMALL)
    assert tree_hash(tmp_path / "b") == tree_hash(small_world)
    build_world(tmp_path / "c", replace(SMALL, seed=1))
    assert tree_hash(tmp_path / "c") != tree_hash(small_world)


def test_has_general_and_two_downstream_tasks(small_world):
    tasks = load_tasks(small_world)
    assert set(tasks) == {t.name for t in TASKS}
    assert (
        {n for n, t in tasks.items() if t.info.type == "downstream"} == set(DOWNSTREAM_TASKS) >= {"digits", "relations"}
    )
    assert len(GENERAL_TASKS) >= 6
    assert any(s.image is None for t in tasks.values() for s in t["train"]), "text-only general tasks exist"
    assert {n: t.info.metric for n, t in tasks.items() if t.info.metric != "exact_match"} == {"caption": "token_f1"}
    for task in tasks.values():
        assert task.info.example_prompts
        for split in SPLITS:
            assert task[split], (task.name, split)


def _keys(task, split):
    """What makes a sample the same sample: its prompt and its image bytes."""
    return {(s.prompt, s.image.read_bytes() if s.image else b"") for s in task[split]}


def test_splits_are_disjoint(small_world):
    for name in (t.name for t in TASKS):
        task = load_task(small_world / name)
        train, val, test = (_keys(task, s) for s in SPLITS)
        assert not (train & test) and not (train & val) and not (val & test), name


def test_scene_splits_are_disjoint_by_content():
    # A caption names every object, so it is the scene's content: no test scene is a training scene.
    caption = next(t for t in TASKS if t.name == "caption")
    train = {s.target for s in caption.generate("train", 600, 0)}
    test = {s.target for s in caption.generate("test", 150, 0)}
    assert not train & test
    assert split_of("top left:red:circle", 0) == split_of("top left:red:circle", 0)


def test_downstream_prompts_differ_from_general_prompts(small_world):
    tasks = load_tasks(small_world)
    general = {s.prompt for n in GENERAL_TASKS for sp in SPLITS for s in tasks[n][sp]}
    for name in DOWNSTREAM_TASKS:
        prompts = {s.prompt for sp in SPLITS for s in tasks[name][sp]}
        assert not prompts & general, name
        assert len(prompts) > 1, f"{name}: several phrasings, not one exact string"


def test_samples_are_well_formed(small_world):
    digits = load_task(small_world / "digits")
    assert {s.target for s in digits["train"]} <= set("0123456789")
    image = digits["train"][0].load_image()
    assert image.size == (32, 32) and image.mode == "RGB"
    line = json.loads((small_world / "caption" / "train.jsonl").read_text().splitlines()[0])
    assert set(line) == {"id", "prompt", "target", "image"} and line["image"].startswith("images/")
    assert relation("top left", "bottom right") == "above left"
    assert relation("top right", "top left") == "right"


@pytest.mark.parametrize("module", ["digits", "relations", "general", "text"])
def test_phrasings_are_many_and_split_by_phrasing(module):
    import importlib

    from deltaserve.tuning.world.spec import phrasings_of

    mod = importlib.import_module(f"deltaserve.tuning.world.{module}")
    for name, phrasings in ((n, getattr(mod, n)) for n in dir(mod) if n.endswith("PROMPTS")):
        assert len(phrasings) >= 16 and len(set(phrasings)) == len(phrasings), name
        splits = {split: set(phrasings_of(name, phrasings, split, 0)) for split in SPLITS}
        assert set().union(*splits.values()) == set(phrasings), name
        assert (
            all(splits[s] for s in SPLITS)
            and not (splits["train"] & (splits["val"] | splits["test"]))
            and not splits["val"] & splits["test"]
        ), name


def test_test_prompts_are_worded_unlike_any_training_prompt(small_world):
    digits = load_task(small_world / "digits")
    assert not {s.prompt for s in digits["test"]} & {s.prompt for s in digits["train"]}
