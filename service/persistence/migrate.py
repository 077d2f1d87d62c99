"""Alembic, driven from code: `kdguard migrate`, start-up auto-migration, tests."""

from __future__ import annotations

import os
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine

MIGRATIONS = Path(
    os.environ.get("KDGUARD_MIGRATIONS", Path(__file__).resolve().parents[2] / "migrations")
)


def alembic_config(engine: Engine) -> Config:
    if not (MIGRATIONS / "env.py").is_file():
        raise FileNotFoundError(f"no Alembic environment at {MIGRATIONS} (set KDGUARD_MIGRATIONS)")
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", engine.url.render_as_string(hide_password=False))
    return config


def upgrade(engine: Engine, revision: str = "head") -> None:
    with engine.begin() as connection:
        config = alembic_config(engine)
        config.attributes["connection"] = connection
        command.upgrade(config, revision)


def downgrade(engine: Engine, revision: str) -> None:
    with engine.begin() as connection:
        config = alembic_config(engine)
        config.attributes["connection"] = connection
        command.downgrade(config, revision)
