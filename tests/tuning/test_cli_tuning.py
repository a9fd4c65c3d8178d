"""``deltaserve data build|check`` and ``deltaserve base pretrain`` through the real click commands."""

from __future__ import annotations

import json
from dataclasses import replace

from click.testing import CliRunner

from deltaserve.client.cli import main
from deltaserve.plugins.fingerprint import fingerprint
from deltaserve.tuning import pretrain as pretrain_module
from deltaserve.tuning.data import load_tasks
from deltaserve.tuning.world import TASKS

SIZES = ["--general-train", "4", "--downstream-train", "4", "--val", "2", "--test", "2"]


def test_data_build_writes_every_task(tmp_path):
    out = tmp_path / "data"
    result = CliRunner().invoke(main, ["data", "build", "--out", str(out), "--seed", "3", *SIZES])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert set(report["tasks"]) == {t.name for t in TASKS}
    tasks = load_tasks(out)
    assert all(len(t["train"]) <= 4 and t["test"] for t in tasks.values())
    assert [p.name for p in tmp_path.iterdir()] == ["data"], "no temporary directory left behind"

    again = CliRunner().invoke(main, ["data", "build", "--out", str(out), *SIZES])
    assert again.exit_code != 0 and "not empty" in again.output


def test_data_check_names_file_and_line(tmp_path):
    out = tmp_path / "data"
    assert CliRunner().invoke(main, ["data", "build", "--out", str(out), *SIZES]).exit_code == 0
    ok = CliRunner().invoke(main, ["data", "check", str(out / "digits")])
    assert ok.exit_code == 0 and json.loads(ok.output)["digits"]["train"] == 4
    train = out / "digits" / "train.jsonl"
    lines = train.read_text().splitlines()
    lines[2] = json.dumps({**json.loads(lines[2]), "target": ""})
    train.write_text("\n".join(lines) + "\n")
    bad = CliRunner().invoke(main, ["data", "check", str(out / "digits")])
    assert bad.exit_code == 1 and f"{train}:3: empty `target`" in bad.output


def test_base_pretrain_is_cached_and_writes_out(tmp_path, monkeypatch):
    tiny = pretrain_module.PretrainConfig(
        steps=2,
        batch_size=4,
        warmup_steps=1,
        world=pretrain_module.WorldConfig(general_train=4, downstream_train=1, val=1, test=2),
    )
    monkeypatch.setattr(pretrain_module, "PretrainConfig", lambda seed=0: replace(tiny, seed=seed))
    first = CliRunner().invoke(main, ["base", "pretrain", "--out", str(tmp_path / "a"), "--quiet", "--seed", "5"])
    assert first.exit_code == 0, first.output
    second = CliRunner().invoke(main, ["base", "pretrain", "--out", str(tmp_path / "b"), "--quiet", "--seed", "5"])
    assert second.exit_code == 0, second.output
    a, b = json.loads(first.output), json.loads(second.output)
    assert not a["cached"] and b["cached"]
    assert a["fingerprint"] == b["fingerprint"] == fingerprint(tmp_path / "b")
    assert set(a["scores"]) == set(b["scores"]) and a["general_score"] == b["general_score"]


def test_failed_pretrain_writes_nothing(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(pretrain_module, "pretrain", broken)
    result = CliRunner().invoke(main, ["base", "pretrain", "--out", str(tmp_path / "out"), "--quiet"])
    assert result.exit_code != 0 and not (tmp_path / "out").exists()
