"""Migrations round-trip on both databases, and match the tables exactly."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Engine, inspect

from service.persistence import migrate
from service.persistence.database import make_engine
from service.persistence.tables import Base
from tests.conftest import scratch_postgres


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    if request.param == "sqlite":
        engine = make_engine(f"sqlite:///{tmp_path / 'm.db'}")
        yield engine
        engine.dispose()
        return
    with scratch_postgres() as url:
        engine = make_engine(url)
        yield engine
        engine.dispose()


def tables(engine: Engine) -> set[str]:
    return set(inspect(engine).get_table_names()) - {"alembic_version"}


def test_upgrade_downgrade_upgrade_is_clean(empty_database: Engine) -> None:
    expected = {t.name for t in Base.metadata.sorted_tables}
    migrate.upgrade(empty_database)
    assert tables(empty_database) == expected
    migrate.downgrade(empty_database, "base")
    assert tables(empty_database) == set()
    migrate.upgrade(empty_database)
    assert tables(empty_database) == expected


def test_autogenerate_finds_no_drift_between_tables_and_migrations(empty_database: Engine) -> None:
    migrate.upgrade(empty_database)
    with empty_database.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        diff = compare_metadata(context, Base.metadata)
    assert diff == []
