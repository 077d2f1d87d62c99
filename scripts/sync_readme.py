"""Rewrite the README's settings table from the settings' own descriptions."""

from __future__ import annotations

from pathlib import Path

from service.settings import describe_settings

START, END = "<!-- settings-table:start -->\n", "<!-- settings-table:end -->"


def main() -> None:
    readme = Path(__file__).resolve().parents[1] / "README.md"
    text = readme.read_text()
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{START}{describe_settings()}\n{END}{tail}")


if __name__ == "__main__":
    main()
