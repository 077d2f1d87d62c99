"""Docs that match the code: the README's settings table is generated from the settings."""

from __future__ import annotations

from pathlib import Path

from service.settings import describe_settings

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_documents_every_setting_exactly() -> None:
    text = README.read_text()
    start = text.index("<!-- settings-table:start -->\n") + len("<!-- settings-table:start -->\n")
    end = text.index("<!-- settings-table:end -->")
    assert text[start:end].strip() == describe_settings().strip(), (
        "README settings table is stale: run `python scripts/sync_readme.py`"
    )


def test_readme_has_a_two_command_quick_start() -> None:
    text = README.read_text()
    quick = text[text.index("## Quick start") :]
    block = quick[quick.index("```sh") + 5 : quick.index("```", quick.index("```sh") + 5)]
    commands = [line.split("#")[0].strip() for line in block.strip().splitlines()]
    assert commands == ["make demo", "make test"]
