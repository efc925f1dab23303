"""The local results store: every probe result, kept the moment it arrives.

One SQLite file beside the caches (`<home>/results.sqlite`). Each `add` is one committed transaction on a
connection of its own, so a build that crashes or a device that drops right after never takes an arrived
result with it, and any number of threads, asyncio tasks and processes may add at once: WAL lets readers run
beside the one writer, and a busy timeout makes writers queue instead of failing. Rows are never deleted or
rewritten; failed attempts go to a table of their own so a failure can never pass for a measurement.

Every row keeps the whole ProbeResult as JSON (raw samples, device, runtime versions, job settings); the
columns beside it are copies for filtering and listing.
"""

from __future__ import annotations

import fcntl
import json
import re
import sqlite3
import time
from contextlib import closing
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from edge_deploy.pipeline.errors import InputError
from edge_deploy.pipeline.results import ProbeResult
from edge_deploy.pipeline.userfiles import shown

STORE_NAME = "results.sqlite"
SCHEMA_VERSION = 1
# Twenty jobs finishing together each hold the write lock for milliseconds; a writer still waiting after this
# long means something else keeps the file locked.
BUSY_TIMEOUT_S = 30.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS results (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    recorded_at TEXT NOT NULL,
    device TEXT NOT NULL,
    artifact_sha256 TEXT NOT NULL,
    artifact_label TEXT NOT NULL,
    bundle TEXT,
    role TEXT NOT NULL,
    target TEXT NOT NULL,
    precision TEXT NOT NULL,
    runtime TEXT,
    started_at TEXT,
    p50_ms REAL,
    p90_ms REAL,
    fps REAL,
    watts REAL,
    config_json TEXT,
    result_json TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS results_by_device ON results (device, started_at);
CREATE INDEX IF NOT EXISTS results_by_artifact ON results (artifact_sha256);
CREATE INDEX IF NOT EXISTS results_by_bundle ON results (bundle, started_at);
CREATE TABLE IF NOT EXISTS failures (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    recorded_at TEXT NOT NULL,
    device TEXT NOT NULL,
    artifact_sha256 TEXT NOT NULL,
    bundle TEXT,
    error TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS failures_by_device ON failures (device, recorded_at);
"""

_SHA256 = re.compile(r"[0-9a-f]{64}")
_HEX = re.compile(r"[0-9a-f]+")


@dataclass(frozen=True)
class StoredResult:
    """One stored probe result and what it was a measurement of."""

    id: int
    recorded_at: str  # when the host stored it (UTC)
    device: str
    artifact_sha256: str
    artifact_label: str
    bundle: str | None
    role: str  # "artifact", or "reference" for the FP32 reference probed beside it
    target: str
    precision: str
    runtime: str | None
    started_at: str | None  # when the device job started (UTC), as the result says
    p50_ms: float | None
    p90_ms: float | None
    fps: float | None
    watts: float | None
    config: dict | None
    result: ProbeResult

    @property
    def when(self) -> str:
        return self.started_at or self.recorded_at

    def power_text(self) -> str:
        status = self.result.power.get("status")
        if status == "unavailable":
            return "unavailable"
        if status == "measured" and self.watts is not None:
            return f"{self.watts:g} W"
        return "not reported"

    def to_json(self) -> dict:
        return {"id": self.id, "recorded_at": self.recorded_at, "started_at": self.started_at,
                "device": self.device, "artifact_sha256": self.artifact_sha256,
                "artifact_label": self.artifact_label, "bundle": self.bundle, "role": self.role,
                "target": self.target, "precision": self.precision, "runtime": self.runtime,
                "p50_ms": self.p50_ms, "p90_ms": self.p90_ms, "fps": self.fps, "watts": self.watts,
                "power": self.power_text(), "config": self.config, "result": self.result.to_json()}


@dataclass(frozen=True)
class StoredFailure:
    """A device job that ended without a result: kept so an interrupted run is visible, never as a number."""

    id: int
    recorded_at: str
    device: str
    artifact_sha256: str
    bundle: str | None
    error: str

    def to_json(self) -> dict:
        return {"id": self.id, "recorded_at": self.recorded_at, "device": self.device,
                "artifact_sha256": self.artifact_sha256, "bundle": self.bundle, "error": self.error}


def default_store(home: Path) -> "ResultStore":
    return ResultStore(Path(home) / STORE_NAME)


class ResultStore:
    """Append-only. WAL needs a local file system: on a network share, point DEPLOY_HOME at a local folder."""

    def __init__(self, path: Path):
        self.path = Path(path)

    # ---- writing ----

    def add(self, result: ProbeResult, *, device: str, artifact_sha256: str, artifact_label: str, target: str,
            precision: str, bundle: str | None, role: str = "artifact", config: dict | None = None) -> int:
        """Stores one result in its own committed transaction; returns its row id."""
        sha = _checked_sha256(artifact_sha256)
        if not device:
            raise ValueError("a stored result needs the device's name")
        latency = result.latency_ms or {}
        power = result.power or {}
        watts = power.get("average_watts") if power.get("status") == "measured" else None
        row = (_utc_text(time.time()), device, sha, artifact_label, bundle, role, target, precision,
               result.runtime, _utc_or_none(result.started_at), _number(latency.get("p50")),
               _number(latency.get("p90")), _number(result.fps), _number(watts),
               None if config is None else json.dumps(config, sort_keys=True, default=str),
               json.dumps(result.to_json()))
        with self._writing() as connection:
            cursor = connection.execute(
                "INSERT INTO results (recorded_at, device, artifact_sha256, artifact_label, bundle, role, target, "
                "precision, runtime, started_at, p50_ms, p90_ms, fps, watts, config_json, result_json) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", row)
            return cursor.lastrowid

    def add_failure(self, *, device: str, artifact_sha256: str, bundle: str | None, error: str) -> int:
        """Records a job that ended without a result (timeout, dropped device, failed runner)."""
        sha = _checked_sha256(artifact_sha256)
        with self._writing() as connection:
            cursor = connection.execute(
                "INSERT INTO failures (recorded_at, device, artifact_sha256, bundle, error) VALUES (?, ?, ?, ?, ?)",
                (_utc_text(time.time()), device, sha, bundle, error))
            return cursor.lastrowid

    # ---- reading ----

    def query(self, device: str | None = None, artifact: str | None = None, bundle: str | None = None,
              since: datetime | str | None = None) -> list[StoredResult]:
        """Stored results, oldest first; `artifact` is a sha256 prefix, `since` compares with when the job started."""
        where, values = self._filters(device, artifact, bundle, since, "COALESCE(started_at, recorded_at)")
        rows = self._reading(
            "SELECT id, recorded_at, device, artifact_sha256, artifact_label, bundle, role, target, precision, "
            "runtime, started_at, p50_ms, p90_ms, fps, watts, config_json, result_json FROM results"
            f"{where} ORDER BY COALESCE(started_at, recorded_at), id", values)
        return [StoredResult(*row[:15], json.loads(row[15]) if row[15] else None,
                             ProbeResult.from_json(json.loads(row[16]))) for row in rows]

    def failures(self, device: str | None = None, artifact: str | None = None, bundle: str | None = None,
                 since: datetime | str | None = None) -> list[StoredFailure]:
        where, values = self._filters(device, artifact, bundle, since, "recorded_at")
        rows = self._reading("SELECT id, recorded_at, device, artifact_sha256, bundle, error FROM failures"
                             f"{where} ORDER BY recorded_at, id", values)
        return [StoredFailure(*row) for row in rows]

    @staticmethod
    def _filters(device, artifact, bundle, since, time_column: str) -> tuple[str, list]:
        clauses, values = [], []
        if device is not None:
            clauses.append("device = ?")
            values.append(device)
        if artifact is not None:
            prefix = artifact.strip().lower()
            if not _HEX.fullmatch(prefix) or len(prefix) > 64:
                raise InputError(f"{artifact!r} is not the start of a sha256 (hex digits 0-9, a-f)")
            clauses.append("substr(artifact_sha256, 1, ?) = ?")
            values += [len(prefix), prefix]
        if bundle is not None:
            clauses.append("bundle = ?")
            values.append(bundle)
        if since is not None:
            clauses.append(f"{time_column} >= ?")
            values.append(_utc_text(since))
        return (" WHERE " + " AND ".join(clauses)) if clauses else "", values

    # ---- the file ----

    def _connect(self) -> sqlite3.Connection:
        # Autocommit mode: every transaction is opened explicitly, so none is left half-open by the module.
        connection = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
        # A power cut right after `add` returned must not take the row with it; NORMAL would, under WAL.
        connection.execute("PRAGMA synchronous=FULL")
        return connection

    def _writing(self):
        return _Transaction(self)

    def _reading(self, sql: str, values: list) -> list[tuple]:
        if not self.path.exists():
            return []  # nothing stored yet; listing creates no file
        try:
            with closing(self._connect()) as connection:
                if not self._check_schema(connection):
                    return []
                return connection.execute(sql, values).fetchall()
        except sqlite3.Error as exc:
            raise self._unusable(exc) from None

    def _check_schema(self, connection: sqlite3.Connection) -> bool:
        """False for an empty file; an error for a SQLite file that is not a store, or one from a newer version."""
        tables = {name for (name,) in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if not tables:
            return False
        if "schema_version" not in tables or "results" not in tables:
            raise InputError(f"{shown(self.path)} is an SQLite file but not an edge-deploy results store; move it "
                             "aside (new results start a fresh store)")
        found = connection.execute("SELECT MAX(version) FROM schema_version").fetchone()[0]
        if found is not None and found > SCHEMA_VERSION:
            raise InputError(f"results store {shown(self.path)} was written by a newer edge-deploy (schema {found}, "
                             f"this one reads up to {SCHEMA_VERSION}); upgrade edge-deploy")
        return True

    def _create_schema(self, connection: sqlite3.Connection) -> None:
        # Inside the caller's write transaction, so two processes starting a store at once create it once.
        # Statement by statement: executescript would commit the open transaction first.
        for statement in filter(str.strip, _SCHEMA.split(";")):
            connection.execute(statement)
        if connection.execute("SELECT COUNT(*) FROM schema_version").fetchone()[0] == 0:
            connection.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))

    def _unusable(self, exc: sqlite3.Error) -> InputError:
        message = str(exc)
        if isinstance(exc, sqlite3.OperationalError) and "locked" in message:
            return InputError(f"results store {shown(self.path)} stayed locked by another process for "
                              f"{BUSY_TIMEOUT_S:.0f} s; try again when it has finished")
        if isinstance(exc, sqlite3.OperationalError) and "readonly" in message:
            return InputError(f"results store {shown(self.path)} is read-only; new results cannot be kept")
        if isinstance(exc, sqlite3.OperationalError) and "unable to open" in message:
            return InputError(f"results store {shown(self.path)} cannot be opened (a folder, or no permission to "
                              "read and write it and its folder)")
        return InputError(f"results store {shown(self.path)} is damaged or not an SQLite file ({message}); move it "
                          "aside (new results start a fresh store)")


class _Transaction:
    """One write: BEGIN IMMEDIATE takes the write lock up front, so a busy store makes writers wait their turn
    (an upgrade from a read lock would fail at once instead of waiting out the busy timeout)."""

    def __init__(self, store: ResultStore):
        self.store = store
        self.connection: sqlite3.Connection | None = None
        self.writer_lock = None

    def _take_writer_lock(self) -> None:
        """Writers take turns on a lock file first. SQLite's own busy handler is not consulted everywhere: two
        processes creating a store at once (the switch to WAL) or upgrading locks can get "database is locked" at
        once instead of waiting, which would turn a result that arrived into an error."""
        store = self.store
        self.writer_lock = open(store.path.with_name(store.path.name + ".lock"), "a")
        deadline = time.monotonic() + BUSY_TIMEOUT_S
        while True:
            try:
                fcntl.flock(self.writer_lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise InputError(f"results store {shown(store.path)} stayed locked by another process for "
                                     f"{BUSY_TIMEOUT_S:.0f} s; try again when it has finished") from None
                time.sleep(0.01)

    def __enter__(self) -> sqlite3.Connection:
        store = self.store
        try:
            store.path.parent.mkdir(parents=True, exist_ok=True)
            self._take_writer_lock()
        except OSError as exc:
            self._close()
            raise InputError(f"cannot write results store {shown(store.path)} or its folder "
                             f"({exc.strerror or type(exc).__name__})") from None
        except BaseException:
            self._close()
            raise
        try:
            self.connection = store._connect()
            # Persistent in the file; repeated, it changes nothing.
            self.connection.execute("PRAGMA journal_mode=WAL")
            self.connection.execute("BEGIN IMMEDIATE")
            if not store._check_schema(self.connection):
                store._create_schema(self.connection)
        except sqlite3.Error as exc:
            self._close()
            raise store._unusable(exc) from None
        except BaseException:
            self._close()
            raise
        return self.connection

    def __exit__(self, kind, value, traceback) -> None:
        try:
            if kind is None:
                self.connection.execute("COMMIT")
            else:
                self.connection.execute("ROLLBACK")
        except sqlite3.Error as exc:
            if kind is None:
                raise self.store._unusable(exc) from None
        finally:
            self._close()
        if isinstance(value, sqlite3.Error):
            raise self.store._unusable(value) from None

    def _close(self) -> None:
        if self.connection is not None:
            self.connection.close()
            self.connection = None
        if self.writer_lock is not None:
            self.writer_lock.close()  # drops the flock
            self.writer_lock = None


def p50_changes(results: list[StoredResult]) -> dict[int, float | None]:
    """Per result id, the p50's change in percent against the previous result with a p50 of the same device,
    bundle and role (positive: slower). None when there is nothing to compare with.

    The reference's own history is separate from the artifact's, or an INT8 artifact would be compared with the
    FP32 reference probed a minute before it. Results without a bundle compare by artifact label instead.
    """
    previous: dict[tuple, float] = {}
    changes: dict[int, float | None] = {}
    for stored in sorted(results, key=lambda r: (r.when, r.id)):
        lineage = stored.bundle if stored.bundle is not None else ("label", stored.artifact_label)
        key = (stored.device, stored.role, lineage)
        before = previous.get(key)
        if stored.p50_ms is None:
            changes[stored.id] = None
            continue
        changes[stored.id] = (stored.p50_ms - before) / before * 100.0 if before else None
        previous[key] = stored.p50_ms
    return changes


def _checked_sha256(value: str) -> str:
    sha = str(value).lower()
    if not _SHA256.fullmatch(sha):
        raise ValueError(f"not a sha256 hex digest: {value!r}")
    return sha


def _number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _utc_text(moment: datetime | str | float) -> str:
    """One sortable UTC form for every time the store compares: 2026-01-05T14:03:11Z."""
    if isinstance(moment, (int, float)):
        moment = datetime.fromtimestamp(moment, timezone.utc)
    elif isinstance(moment, str):
        try:
            moment = datetime.fromisoformat(moment)
        except ValueError:
            raise InputError(f"{moment!r} is not a date and time (expected ISO 8601, e.g. 2026-01-05T14:03:00Z)") \
                from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)  # the store's times are UTC; a bare time is taken as UTC
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _utc_or_none(text: str | None) -> str | None:
    if not text:
        return None
    try:
        return _utc_text(text)
    except InputError:
        return None  # kept as the device wrote it in the full result; the listing falls back to the store time
