"""The README's CLI table lists exactly the commands the CLI has, with their help lines."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_cli_table_matches_the_cli():
    from deltaserve.client.cli import command_table

    text = README.read_text()
    table = text.split("<!-- cli-table", 1)[1].split("<!-- /cli-table -->", 1)[0]
    rows = dict(re.findall(r"^\| `deltaserve ([^`]+)` \| (.*?) \|$", table, flags=re.M))
    assert rows == command_table()


def test_readme_names_the_two_commands():
    text = README.read_text()
    assert "make demo" in text and "make test" in text
    assert Path(README.parent / ".ci" / "run").read_text().count("make test") == 1
