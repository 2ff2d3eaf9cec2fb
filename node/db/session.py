"""Engine and sessions: one engine per process, schema brought to head by Alembic at start.

SQLite is opened in WAL mode with ``synchronous=NORMAL``: a commit survives a crash of the process
(SIGKILL included) at once, and one fsync of the log is saved per received instance. After a power
loss the last commits may be rolled back, which loses nothing acknowledged: every instance file is
fsynced before its acknowledgement, and start-up reconciliation records any spool file without a
row. Every transaction begins IMMEDIATE, so concurrent writers queue on the busy timeout instead of
failing with "database is locked".
"""

from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from node.db.models import utcnow
from node.errors import LungnodeError
from node.logs import kv

log = logging.getLogger(__name__)
MIGRATIONS = Path(__file__).parent / "migrations"
#: A machine whose clock is this far from the database server's is named at start (``clock_skew``).
CLOCK_SKEW_WARN_S = 5.0


def _sqlite_pragmas(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # we issue BEGIN ourselves
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        # Straight to the driver: this runs for every transaction, the receive path's included.
        conn.connection.driver_connection.execute("BEGIN IMMEDIATE")


#: libpq settings of every PostgreSQL connection. Without a connect timeout, a server host that is switched off (no
#: refusal, only silence) holds each try, and a job's heartbeat, for about two minutes; keepalives find a
#: connection a firewall dropped while idle; the application name tells the DBA whose sessions these are.
POSTGRES_CONNECT: dict[str, str | int] = {
    "connect_timeout": 10, "application_name": "lungnode",
    "keepalives": 1, "keepalives_idle": 60, "keepalives_interval": 10, "keepalives_count": 3,
}


def make_engine(url: str) -> Engine:
    """Create the process's engine; makes the SQLite file's folder when needed."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            try:
                Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise LungnodeError(
                    f"cannot create the folder of the database {parsed.database}: {exc.strerror}. "
                    f"Check storage.database_url."
                ) from exc
        engine = create_engine(url, connect_args={"timeout": 30})
        _sqlite_pragmas(engine)
        return engine
    # A url's own query (?connect_timeout=5) wins over these defaults.
    connect_args = {k: v for k, v in POSTGRES_CONNECT.items() if k not in parsed.query}
    try:
        return create_engine(url, pool_pre_ping=True, connect_args=connect_args)
    except ModuleNotFoundError as exc:
        raise LungnodeError(
            f"the database driver for {parsed.drivername} is not installed ({exc.name}). For PostgreSQL: "
            f".venv/bin/pip install -e '.[postgres]' and use postgresql+psycopg://..."
        ) from exc


def db_reason(exc: SQLAlchemyError) -> str:
    """A database error in a few words for a log line: the driver's message for an operational fault (a full
    disk, a server down, a lock), else the error's class; never a statement or its values (patient data)."""
    orig = getattr(exc, "orig", None)
    if isinstance(exc, OperationalError) and orig is not None:
        lines = str(orig).strip().splitlines()
        return (lines[0][:160] if lines else "") or type(orig).__name__
    return type(exc).__name__


def open_database(url: str, *, must_exist: bool = False) -> Engine:
    """The engine, schema brought up to date, or a LungnodeError that says what to check.

    ``must_exist``: for operator commands (status, retry, reanalyse, worker), which must read the node's own
    database: run from another folder with the default SQLite URL they would otherwise create an empty one there
    and report an empty node. They never change its schema either (the metrics timer runs ``status`` every
    minute, beside a node that may still be the older version): only the node upgrades it, at its start.
    """
    parsed = make_url(url)
    if must_exist and parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        path = Path(parsed.database).resolve()
        if not path.is_file():
            raise LungnodeError(
                f"no database at {path} (storage.database_url {url}): this command reads the node's database. "
                f"Give the node's configuration with --config FILE, or run it from the node's working folder."
            )
    engine = make_engine(url)
    try:
        if must_exist:
            _check_schema(engine)
        else:
            upgrade_schema(engine)
    except SQLAlchemyError as exc:
        engine.dispose()
        raise LungnodeError(
            f"cannot open the database {engine.url.render_as_string(hide_password=True)}: "
            f"{exc.__class__.__name__}: {getattr(exc, 'orig', None) or exc}. Check storage.database_url, and the "
            f"free space and permissions where the database lives."
        ) from exc
    except LungnodeError:
        engine.dispose()
        raise
    return engine


#: The PostgreSQL advisory lock ``serve`` holds on its ledger (any 64-bit number: these bytes spell "lungnode").
SERVE_LOCK_KEY = 0x6C756E676E6F6465


def claim_ledger(engine: Engine) -> Connection | None:
    """PostgreSQL: hold this ``serve``'s advisory lock on a connection of its own (``release_ledger`` when the
    node stops), or raise when another node holds it. Two nodes on one ledger (with different spools) would each,
    at start, take the other's open associations and running jobs for a crash's leftovers. None for SQLite: one
    machine, whose spool lock (``node.receive.spool.claim_spool``) covers it."""
    if engine.dialect.name != "postgresql":
        return None
    conn = engine.connect()
    try:
        held = conn.scalar(text("SELECT pg_try_advisory_lock(:key)"), {"key": SERVE_LOCK_KEY})
        conn.commit()  # the lock is the session's and stays; an open transaction would hold back VACUUM for days
    except BaseException:
        conn.close()
        raise
    if held:
        return conn
    conn.close()
    raise LungnodeError(f"another lungnode serve is using the database {engine.url.render_as_string(hide_password=True)}"
                        " (its session is in pg_stat_activity with application_name lungnode): stop it first, or give "
                        "this node its own storage.database_url")


def release_ledger(conn: Connection) -> None:
    """Give the lock of ``claim_ledger`` back (its connection returns to the pool; a node that died loses it with
    its session)."""
    try:
        conn.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": SERVE_LOCK_KEY})
        conn.commit()
    except SQLAlchemyError:
        conn.invalidate()  # the session is gone or unusable: so is its lock
    finally:
        conn.close()


def clock_skew_s(engine: Engine, now: dt.datetime | None = None) -> float | None:
    """Seconds this machine's UTC clock (``now``) is behind the PostgreSQL server's; None for SQLite (one machine).

    Leases, heartbeats and a study's settling compare times written by different machines: a worker whose clock
    is two minutes off takes another's live job for stalled (``workers.lease_s``) and runs it twice."""
    if engine.dialect.name != "postgresql":
        return None
    with engine.connect() as conn:
        server = conn.scalar(text("SELECT now() AT TIME ZONE 'UTC'"))
    local = (now or utcnow()).replace(tzinfo=None)
    return (server - local).total_seconds()


def warn_on_clock_skew(engine: Engine, now: dt.datetime | None = None) -> None:
    """One WARNING at start when this machine's clock is off the database server's: the fix is NTP on both."""
    try:
        skew = clock_skew_s(engine, now)
    except SQLAlchemyError:
        return  # the caller's own use of the database says what is wrong with it
    if skew is not None and abs(skew) > CLOCK_SKEW_WARN_S:
        log.warning(kv("clock_skew", database_ahead_s=f"{skew:+.1f}", reference="the database server's clock",
                       effect="leases, heartbeats and study settling compare times across machines",
                       fix="synchronise both clocks (NTP/chrony)"))


def _check_schema(engine: Engine) -> None:
    """Refuse a database whose schema is not the one this version writes, saying which version fixes it."""
    from alembic.migration import MigrationContext
    from alembic.script import ScriptDirectory

    script = ScriptDirectory.from_config(_alembic_config())
    with engine.connect() as conn:
        current = MigrationContext.configure(conn).get_current_revision()
    head = script.get_current_head()
    if current == head:
        return
    where = engine.url.render_as_string(hide_password=True)
    if current is None:
        raise LungnodeError(f"the database {where} holds no lungnode ledger yet: start the node (lungnode serve "
                            "creates it), or give the node's configuration with --config FILE")
    known = {rev.revision for rev in script.walk_revisions()}
    if current in known:
        raise LungnodeError(f"the database {where} is at schema revision {current}; this lungnode needs {head}. "
                            "Start the upgraded node (lungnode serve brings the ledger up to date at start), then "
                            "run this again")
    raise LungnodeError(f"the database {where} is at schema revision {current}, which this lungnode does not know: "
                        "it was written by a newer version. Run this command with that version")


def _alembic_config() -> Any:
    from alembic.config import Config as AlembicConfig

    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    return cfg


def upgrade_schema(engine: Engine) -> None:
    """Bring the schema to the newest Alembic revision (no-op when already there)."""
    from alembic import command

    cfg = _alembic_config()
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)
