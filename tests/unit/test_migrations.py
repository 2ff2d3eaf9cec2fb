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
    # study_id: every worker's poll (node.db.jobs.study_settling); last_received_at: status' newest series
    assert {"ix_series_state", "ix_series_study", "ix_series_last_received"} <= {
        i["name"] for i in insp.get_indexes("series")}
    assert {"ix_instances_series_revision"} <= {i["name"] for i in insp.get_indexes("instances")}
    assert {"ix_events_at", "ix_events_job_kind", "ix_events_kind"} <= {i["name"] for i in insp.get_indexes("events")}
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


def test_0004_marks_the_instances_of_purged_series_purged(engine: Engine) -> None:
    """A ledger from before 0004 recorded retention on the series only: its instances take the series' time."""
    cfg = alembic_cfg()
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0003")
    stamp = "2026-11-20 03:00:00.000000"
    with engine.begin() as conn:
        conn.exec_driver_sql("INSERT INTO studies (id, study_instance_uid, created_at) VALUES (1, '1.2', ?)", (stamp,))
        for sid, purged in ((1, stamp), (2, None)):
            conn.exec_driver_sql(
                "INSERT INTO series (id, study_id, series_instance_uid, origin, state, revision, instance_count, "
                "first_received_at, last_received_at, purged_at) VALUES (?, 1, ?, 'modality', 'complete', 1, 1, ?, ?, ?)",
                (sid, f"1.2.{sid}", stamp, stamp, purged))
            conn.exec_driver_sql(
                "INSERT INTO instances (series_id, sop_instance_uid, sop_class_uid, transfer_syntax_uid, revision, "
                "path, size_bytes, received_at) VALUES (?, ?, '1.2.840.10008.5.1.4.1.1.2', '1.2.840.10008.1.2.1', 1, "
                "'x', 1, ?)", (sid, f"1.2.{sid}.1", stamp))
    upgrade_schema(engine)
    with engine.connect() as conn:
        rows = dict(conn.exec_driver_sql("SELECT series_id, purged_at FROM instances").all())
    assert rows[2] is None and str(rows[1]).startswith("2026-11-20 03:00:00")


def test_operator_commands_never_change_the_schema_and_say_what_to_do(engine: Engine, tmp_path: Path) -> None:
    """status (run every minute by the metrics timer), retry, reanalyse and worker read the node's ledger as it
    is: an older schema is refused with the fix, never upgraded under a node that may still be the old version."""
    from node.db.session import open_database
    from node.errors import LungnodeError

    url = str(engine.url)
    engine.connect().close()  # an empty database file
    with pytest.raises(LungnodeError, match="holds no lungnode ledger yet: start the node"):
        open_database(url, must_exist=True)
    cfg = alembic_cfg()
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0003")
    head = ScriptDirectory.from_config(alembic_cfg()).get_current_head()
    with pytest.raises(LungnodeError, match=f"is at schema revision 0003; this lungnode needs {head}. Start the "
                                            "upgraded node"):
        open_database(url, must_exist=True)
    assert current_revision(engine) == "0003"
    with engine.begin() as conn:
        conn.exec_driver_sql("UPDATE alembic_version SET version_num = '0099'")
    with pytest.raises(LungnodeError, match="0099, which this lungnode does not know: it was written by a newer"):
        open_database(url, must_exist=True)
    with engine.begin() as conn:
        conn.exec_driver_sql("UPDATE alembic_version SET version_num = '0003'")
    open_database(url).dispose()  # the node itself upgrades
    open_database(url, must_exist=True).dispose()
    assert current_revision(engine) == ScriptDirectory.from_config(alembic_cfg()).get_current_head()
