"""The ledger file's schema, its version and the migrations between versions.

The version lives in SQLite's ``PRAGMA user_version``. Version 1 is the
schema of the first releases, which never set the pragma: a file with our
tables and ``user_version = 0`` is version 1. ``open_ledger_db`` refuses, with
one clear message, a file that is not SQLite, fails its integrity check, holds
another program's tables, or was written by a newer agent.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from agent.errors import JoulewardError

SCHEMA_VERSION = 2
LEDGER_FILE = "ledger.sqlite3"

# Version 1, exactly as the first releases created it.
_SCHEMA_V1 = """
CREATE TABLE IF NOT EXISTS node_energy (
    domain TEXT NOT NULL, device TEXT NOT NULL, source TEXT NOT NULL,
    energy_j REAL NOT NULL, PRIMARY KEY (domain, device, source));
CREATE TABLE IF NOT EXISTS domain_totals (
    domain TEXT PRIMARY KEY, idle_j REAL NOT NULL, unattributed_j REAL NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY, name TEXT NOT NULL, kind TEXT NOT NULL, namespace TEXT NOT NULL,
    labels TEXT NOT NULL, first_seen REAL NOT NULL, last_seen REAL NOT NULL,
    finished_at REAL, cpu_s REAL NOT NULL, registration TEXT);
CREATE TABLE IF NOT EXISTS job_energy (
    job_id TEXT NOT NULL, domain TEXT NOT NULL, energy_j REAL NOT NULL,
    PRIMARY KEY (job_id, domain));
CREATE TABLE IF NOT EXISTS job_work (
    job_id TEXT NOT NULL, unit TEXT NOT NULL, count REAL NOT NULL,
    PRIMARY KEY (job_id, unit));
CREATE TABLE IF NOT EXISTS counters (
    zone_id TEXT PRIMARY KEY, raw_uj INTEGER NOT NULL, max_range_uj INTEGER NOT NULL,
    boot_id TEXT NOT NULL, monotonic_s REAL NOT NULL);
CREATE TABLE IF NOT EXISTS job_emissions (job_id TEXT PRIMARY KEY, emissions_g REAL NOT NULL);
CREATE TABLE IF NOT EXISTS node_emissions (id INTEGER PRIMARY KEY CHECK (id = 0), emissions_g REAL NOT NULL);
"""

# Version 2: which jobs have series of their own and what the overflow
# aggregate holds (so neither is rebuilt differently after a restart), the
# agent's own counters, and an index for listing jobs newest first.
_MIGRATE_1_TO_2 = """
CREATE TABLE exposition (
    job_id TEXT PRIMARY KEY, state TEXT NOT NULL CHECK (state IN ('exported', 'overflow')),
    baseline TEXT);
CREATE TABLE overflow (
    id INTEGER PRIMARY KEY CHECK (id = 0), retired TEXT NOT NULL, floor TEXT NOT NULL);
CREATE TABLE agent_counters (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS jobs_by_last_seen ON jobs (last_seen);
"""

MIGRATIONS: dict[int, str] = {1: _MIGRATE_1_TO_2}  # from version -> script to the next
OUR_TABLES = {"node_energy", "domain_totals", "jobs", "job_energy", "job_work", "counters"}
FRESH_START_HINT = "start afresh with `jouleward run --fresh-ledger` (the old file is kept beside it)"


class LedgerError(JoulewardError, RuntimeError):
    """The ledger's SQLite file cannot be opened, read or written."""


class LedgerBusy(LedgerError):
    """The ledger could not be written right now (locked, disk full); nothing was changed."""


def _tables(db: sqlite3.Connection) -> set[str]:
    return {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


def schema_version(db: sqlite3.Connection) -> int:
    """0 for an empty file, 1 for the first releases' schema, else user_version."""
    version = int(db.execute("PRAGMA user_version").fetchone()[0])
    if version:
        return version
    tables = _tables(db)
    if not tables:
        return 0
    if OUR_TABLES <= tables:
        return 1
    raise LedgerError(f"holds tables that are not a jouleward ledger's ({', '.join(sorted(tables)[:5])})")


def migrate(db: sqlite3.Connection) -> int:
    """Bring the file to SCHEMA_VERSION in one transaction; returns the version it had."""
    found = schema_version(db)
    if found > SCHEMA_VERSION:
        raise LedgerError(_newer(found))
    if found == SCHEMA_VERSION:
        return found
    db.execute("BEGIN IMMEDIATE")
    try:
        scripts = [_SCHEMA_V1] if found == 0 else []
        scripts += [MIGRATIONS[v] for v in range(max(found, 1), SCHEMA_VERSION)]
        for script in scripts:
            for statement in script.split(";"):
                if statement.strip():
                    db.execute(statement)
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise
    return found


def _newer(version: int) -> str:
    return f"was written by a newer jouleward (ledger schema {version}; this version reads up to {SCHEMA_VERSION})"


def _check_integrity(db: sqlite3.Connection) -> None:
    check = db.execute("PRAGMA quick_check").fetchone()[0]
    if check != "ok":
        raise LedgerError(f"is damaged ({check})")


@contextmanager
def _refusing(db: sqlite3.Connection, where: str, hint: str) -> Iterator[None]:
    """Any failure of the file becomes one LedgerError naming it (and the connection is closed)."""
    try:
        yield
    except sqlite3.DatabaseError as exc:
        db.close()
        reason = "is not a jouleward ledger (not an SQLite file)" if "not a database" in str(exc) else f"failed: {exc}"
        raise LedgerError(f"{where} {reason}{hint}") from None
    except LedgerError as exc:
        db.close()
        raise LedgerError(f"{where} {exc}{hint}") from None


def open_ledger_db(state_dir: Path, busy_timeout_s: float) -> sqlite3.Connection:
    """The ledger's connection, migrated to the current schema; raises LedgerError with one clear message."""
    path = state_dir / LEDGER_FILE
    where = f"the ledger {path}"
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=busy_timeout_s)
    except (OSError, sqlite3.Error) as exc:
        raise LedgerError(f"cannot open {where}: {exc}") from None
    with _refusing(db, where, f"; {FRESH_START_HINT}"):
        db.row_factory = sqlite3.Row
        _check_integrity(db)
        db.execute("PRAGMA journal_mode=WAL")
        # WAL with synchronous=NORMAL: a commit survives the process being
        # killed; a power loss may lose the last commits, never the file.
        db.execute("PRAGMA synchronous=NORMAL")
        migrate(db)
    return db


def move_aside(state_dir: Path, suffix: str) -> Path | None:
    """Rename the ledger (and its WAL files) to ``ledger.sqlite3.<suffix>``; returns the new path."""
    path = state_dir / LEDGER_FILE
    if not path.exists():
        return None
    kept = path.with_name(f"{LEDGER_FILE}.{suffix}")
    for extra in ("-wal", "-shm"):
        side = path.with_name(LEDGER_FILE + extra)
        if side.exists():
            side.rename(kept.with_name(kept.name + extra))
    path.rename(kept)
    return kept


def open_ledger_db_read_only(state_dir: Path) -> sqlite3.Connection:
    """A read-only connection for commands that only read (``jobs``, ``report``):
    never migrates or creates anything; refuses what ``open_ledger_db`` refuses."""
    path = state_dir / LEDGER_FILE
    where = f"the ledger {path}"
    if not path.is_file():
        raise LedgerError(f"no ledger in {state_dir} (--state-dir)")
    try:
        db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, check_same_thread=False, timeout=1.0)
    except sqlite3.Error as exc:
        raise LedgerError(f"cannot open {where}: {exc}") from None
    with _refusing(db, where, ""):
        db.row_factory = sqlite3.Row
        _check_integrity(db)
        version = schema_version(db)
        if version > SCHEMA_VERSION:
            raise LedgerError(_newer(version))
        if version == 0:
            raise LedgerError("is empty")
    return db
