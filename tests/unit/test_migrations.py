"""Alembic migrations: upgrading an empty database creates exactly the schema of node/db/models.py."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config as AlembicConfig
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, inspect

from node.db.models import Base
from node.db.session import MIGRATIONS, make_engine, upgrade_schema


@pytest.fixture
def engine(tmp_path: Path) -> Engine:
    eng = make_engine(f"sqlite:///{tmp_path / 'sub' / 'ledger.sqlite'}")  # the folder is created too
    yield eng
    eng.dispose()


def alembic_cfg() -> AlembicConfig:
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    return cfg


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def test_single_head() -> None:
    heads = ScriptDirectory.from_config(alembic_cfg()).get_heads()
    assert len(heads) == 1, heads


def test_upgrade_on_empty_db_matches_models(engine: Engine) -> None:
    upgrade_schema(engine)
    tables = set(inspect(engine).get_table_names())
    assert tables == set(Base.metadata.tables) | {"alembic_version"}
    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True, "compare_server_default": True})
        diff = compare_metadata(ctx, Base.metadata)
    assert diff == [], f"models and migrations differ: {diff}"
    assert current_revision(engine) == ScriptDirectory.from_config(alembic_cfg()).get_current_head()


def test_indexes_and_unique_constraints_exist(engine: Engine) -> None:
    upgrade_schema(engine)
    insp = inspect(engine)
    assert {"ix_series_state"} <= {i["name"] for i in insp.get_indexes("series")}
    assert {"ix_instances_series_revision"} <= {i["name"] for i in insp.get_indexes("instances")}
    assert {"ix_events_at", "ix_events_job_kind"} <= {i["name"] for i in insp.get_indexes("events")}
    uniques = {tuple(u["column_names"]) for u in insp.get_unique_constraints("jobs")}
    assert ("series_id", "revision") in uniques
    assert ("sop_instance_uid",) in {tuple(u["column_names"]) for u in insp.get_unique_constraints("instances")}


def test_upgrade_twice_is_a_noop(engine: Engine) -> None:
    upgrade_schema(engine)
    first = current_revision(engine)
    upgrade_schema(engine)
    assert current_revision(engine) == first is not None


def test_downgrade_to_base_and_up_again(engine: Engine) -> None:
    upgrade_schema(engine)
    cfg = alembic_cfg()
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "base")
    assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
    upgrade_schema(engine)
    assert set(inspect(engine).get_table_names()) == set(Base.metadata.tables) | {"alembic_version"}
