"""``deltaserve tune`` / ``deltaserve eval`` through the real click commands: bad input names file and line,
and nothing is written to ``--out``; ``cached_delta`` tunes once."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import pytest
from click.testing import CliRunner

from deltaserve.client.cli import main
from deltaserve.tuning.world import WorldConfig, build_world

FAST = ["--steps", "2", "--batch-size", "4", "--last-n-layers", "1", "--quiet"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-world")
    build_world(
        root / "all", WorldConfig(general_train=4, downstream_train=8, val=2, test=2), tasks=("digits", "colour")
    )
    (root / "general").mkdir()
    shutil.move(str(root / "all" / "colour"), str(root / "general" / "colour"))
    return {"digits": root / "all" / "digits", "general": root / "general"}


@pytest.fixture
def digits(world, tmp_path):
    """A private, writable copy of the digits task."""
    return shutil.copytree(world["digits"], tmp_path / "digits")


def _tune(base, data, out, *extra, general=None):
    args = ["tune", "--base", str(base), "--data", str(data), "--method", "spider", "--out", str(out), *FAST]
    args += ["--general-data", str(general)] if general else ["--no-general"]
    return CliRunner().invoke(main, args + list(extra))


def _edit_line(path, number: int, edit) -> None:
    lines = path.read_text().splitlines()
    lines[number - 1] = edit(lines[number - 1])
    path.write_text("\n".join(lines) + "\n")


def _nothing_written(out) -> bool:
    return not out.exists() and not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]


@pytest.fixture(scope="module")
def tuned(tiny_base, world, tmp_path_factory):
    """``deltaserve tune`` once per module: (bundle directory, the command's JSON report)."""
    out = tmp_path_factory.mktemp("cli-bundle") / "out"
    result = _tune(tiny_base, world["digits"], out, "--name", "my-digits", general=world["general"])
    assert result.exit_code == 0, result.output
    return out, json.loads(result.stdout)


@pytest.mark.parametrize(
    ("method", "flag", "value", "recorded"),
    [
        ("lora", "--lora-rank", 4, {"r": 4, "lora_alpha": 8.0}),
        ("bottleneck", "--bottleneck-width", 6, {"bottleneck_dim": 6}),
    ],
)
def test_lora_rank_and_bottleneck_width_reach_the_bundle(tiny_base, world, tmp_path, method, flag, value, recorded):
    from safetensors import safe_open

    out = tmp_path / "out"
    args = ["tune", "--base", str(tiny_base), "--data", str(world["digits"]), "--method", method, "--out", str(out)]
    result = CliRunner().invoke(main, [*args, *FAST, "--no-general", flag, str(value)])
    assert result.exit_code == 0, result.output
    hyper = json.loads((out / "delta.json").read_text())["method"]["hyperparameters"]
    assert {k: hyper[k] for k in recorded} == recorded, hyper
    if method == "lora":  # the PEFT adapter itself, which vLLM loads
        assert json.loads((out / "adapter_config.json").read_text())["r"] == value
    # the factors' shapes: every tensor has the rank / width as one dimension
    (weights,) = [p for p in out.rglob("*.safetensors")]
    with safe_open(str(weights), "pt") as f:
        shapes = [f.get_slice(k).get_shape() for k in f.keys()]
    assert shapes and all(value in shape for shape in shapes if len(shape) == 2), shapes


def test_tune_writes_a_bundle_and_eval_reads_it(tuned, tiny_base, world):
    out, report = tuned
    assert report["out"] == str(out) and {"target", "general", "h"} <= set(report["metrics"])
    manifest = json.loads((out / "delta.json").read_text())
    assert manifest["name"] == "my-digits" and manifest["kind"] == "sparse" and manifest["method"]["name"] == "spider"
    assert manifest["task"]["examples"] and manifest["task"]["description"]

    evaluated = CliRunner().invoke(
        main,
        [
            "eval",
            "--base",
            str(tiny_base),
            "--bundle",
            str(out),
            "--data",
            str(world["digits"]),
            "--general-data",
            str(world["general"]),
        ],
    )
    assert evaluated.exit_code == 0, evaluated.output
    scores = json.loads(evaluated.stdout)
    assert scores["kind"] == "sparse" and scores["target_task"] == "digits"
    assert scores["target"] == report["metrics"]["target"] and scores["general"] == report["metrics"]["general"]


@pytest.mark.parametrize(
    "line, edit, message",
    [
        (
            2,
            lambda line: json.dumps({**json.loads(line), "image": "images/nope.png"}),
            "image file not found: 'images/nope.png'",
        ),
        (3, lambda line: json.dumps({**json.loads(line), "target": ""}), "empty `target`"),
        (4, lambda line: line[:-5], "malformed JSON"),
    ],
    ids=["missing-image", "empty-target", "malformed-line"],
)
def test_bad_data_names_file_and_line_and_writes_nothing(tiny_base, digits, tmp_path, line, edit, message):
    _edit_line(digits / "train.jsonl", line, edit)
    out = tmp_path / "out"
    result = _tune(tiny_base, digits, out)
    assert result.exit_code == 1, result.output
    assert f"{digits / 'train.jsonl'}:{line}: {message}" in result.output
    assert _nothing_written(out)


def test_deleted_image_file_is_named_too(tiny_base, digits, tmp_path):
    first = json.loads((digits / "test.jsonl").read_text().splitlines()[0])
    (digits / first["image"]).unlink()
    out = tmp_path / "out"
    result = _tune(tiny_base, digits, out)
    assert result.exit_code == 1 and f"{digits / 'test.jsonl'}:1: image file not found" in result.output
    assert _nothing_written(out)


def test_unknown_method_is_refused(tiny_base, world, tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(
        main,
        ["tune", "--base", str(tiny_base), "--data", str(world["digits"]), "--method", "prompt", "--out", str(out)],
    )
    assert result.exit_code == 2 and "'prompt' is not one of" in result.output and "spider" in result.output
    assert _nothing_written(out)

    from deltaserve.tuning.tune import tune

    with pytest.raises(ValueError, match="unknown tuning method `prompt`; known methods: `spider`"):
        tune(tiny_base, world["digits"], "prompt", out)
    assert _nothing_written(out)


def test_base_of_an_unknown_family_is_named(world, tmp_path):
    out = tmp_path / "out"
    result = _tune(world["digits"], world["digits"], out)  # the data directory given as the base
    assert result.exit_code == 1 and f"{world['digits'] / 'config.json'}: missing" in result.output
    other = tmp_path / "bert"
    other.mkdir()
    (other / "config.json").write_text('{\n  "hidden_size": 8,\n  "model_type": "bert"\n}\n')
    result = _tune(other, world["digits"], out)
    assert (
        result.exit_code == 1
        and f"{other / 'config.json'}:3: `model_type` must be one of llava, qwen2_vl, qwen2_5_vl, got 'bert'"
        in result.output
    )
    assert _nothing_written(out)


def test_bundle_of_another_base_is_refused_with_its_line(tuned, world, tmp_path):
    from deltaserve.tuning.base.factory import build_base

    bundle = tuned[0]
    other = build_base(tmp_path / "other-base", seed=1)
    result = CliRunner().invoke(
        main, ["eval", "--base", str(other), "--bundle", str(bundle), "--data", str(world["digits"]), "--no-general"]
    )
    assert result.exit_code == 1, result.output
    line = next(
        i for i, text in enumerate((bundle / "delta.json").read_text().splitlines(), start=1) if '"fingerprint"' in text
    )
    assert f"{bundle / 'delta.json'}:{line}: base fingerprint mismatch" in result.output


def test_existing_out_and_failures_after_training_leave_nothing(tiny_base, world, tmp_path, monkeypatch):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    result = _tune(tiny_base, world["digits"], taken)
    assert result.exit_code == 1 and "exists and is not an empty directory" in result.output
    assert [p.name for p in taken.iterdir()] == ["keep.txt"]

    from deltaserve.plugins import writer

    def broken(path, data):
        raise OSError("disk full")

    monkeypatch.setattr(writer, "_write_synced", broken)  # fails inside the bundle writer, after training
    out = tmp_path / "out"
    result = _tune(tiny_base, world["digits"], out)
    assert result.exit_code != 0 and _nothing_written(out)


def test_cached_delta_tunes_once(tiny_base, world, monkeypatch):
    from deltaserve.tuning import tune as tune_module
    from deltaserve.tuning.tune import TuneConfig, cached_delta

    config = TuneConfig(steps=2, batch_size=4, last_n_layers=1, examples=3)
    first = cached_delta(
        tiny_base, world["digits"], "bottleneck", config=config, general_dir=world["general"], progress=False
    )
    assert (first / "delta.json").is_file() and json.loads((first.parent / "tune.json").read_text())[
        "method"
    ] == "bottleneck"

    def no_tuning(*args, **kwargs):
        raise AssertionError("a cache hit must not tune")

    monkeypatch.setattr(tune_module, "tune", no_tuning)
    assert (
        cached_delta(
            tiny_base, world["digits"], "bottleneck", config=config, general_dir=world["general"], progress=False
        )
        == first
    )
    with pytest.raises(AssertionError, match="must not tune"):
        cached_delta(
            tiny_base,
            world["digits"],
            "bottleneck",
            config=replace(config, lr=1e-2),
            general_dir=world["general"],
            progress=False,
        )


def test_cli_method_names_match_the_methods():
    from deltaserve.client.cli_tune import METHOD_NAMES
    from deltaserve.tuning.methods import METHODS

    assert METHOD_NAMES == tuple(METHODS)
