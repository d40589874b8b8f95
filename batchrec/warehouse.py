"""The DuckDB warehouse: where it lives, schema migration, the writer lock, atomic publishing.

Every step reads tables and writes tables through here. Two rules keep the warehouse safe:

* one logical writer at a time: `Warehouse.lock()` takes an exclusive `flock` on
  `<warehouse>.lock` (released by the kernel even on kill -9) and records who holds it, so a
  second writer fails at once with "warehouse is busy (held by ...)";
* every replacement is atomic: rows are built under a staging name (or in a transaction) and
  swapped in one transaction, so readers see the old contents or the new, never a mix, and a
  failed or killed run leaves the previous contents in place.

DuckDB itself allows one read-write process per file, so long computations (training, scoring)
hold the logical lock but open the DuckDB file only for the short reads and the final publish.
"""

from __future__ import annotations

import fcntl
import os
import re
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import duckdb

from batchrec.errors import BatchrecError, WarehouseBusy

if (
    TYPE_CHECKING
):  # DuckDB's .pl() imports polars when a query needs it: commands that never do start 0.25 s sooner
    import polars as pl

DEFAULT_PATH = Path("warehouse") / "batchrec.duckdb"
ENV_VAR = "BATCHREC_WAREHOUSE"


def sql_dir() -> Path:
    """The SQL folder (schema migrations, feature store): `sql/` at the top of the repository,
    installed by the wheel as the package data `batchrec/sql`. A checkout (editable or on
    PYTHONPATH) has no `batchrec/sql` and reads the top-level folder: both read the same files."""
    package = Path(__file__).resolve().parent
    installed = package / "sql"
    return installed if installed.is_dir() else package.parent / "sql"


SQL_DIR = sql_dir()
SCHEMA_DIR = SQL_DIR / "schema"

_HELD_LOCKS: set[str] = set()  # warehouse files whose writer lock this process holds
_LOCK_LINE = 256  # bytes of the holder line in the lock file
_COMMITTED: list[str] = []  # what this process has committed, for an interrupted command's last line
_MIGRATION_NAME = re.compile(r"^(\d+)_[\w-]+\.sql$")


def resolve_path(path: str | os.PathLike | None = None) -> Path:
    """Explicit path, else $BATCHREC_WAREHOUSE, else warehouse/batchrec.duckdb."""
    return Path(path or os.environ.get(ENV_VAR) or DEFAULT_PATH)


def migrations() -> list[tuple[int, Path]]:
    """Schema files in run order, as (version, path)."""
    found = []
    for f in SCHEMA_DIR.glob("*.sql"):
        m = _MIGRATION_NAME.match(f.name)
        if m:
            found.append((int(m.group(1)), f))
    return sorted(found)


def utcnow() -> datetime:
    """Naive UTC timestamp: every TIMESTAMP in the warehouse is UTC without a zone."""
    return datetime.now(UTC).replace(tzinfo=None)


def _translate(exc: duckdb.Error, path: Path) -> BatchrecError:
    text = str(exc)
    if "lock" in text.lower():
        # "... Conflicting lock is held in /usr/bin/python3 (PID 123) by user x. However, you would
        # be able to open this database in read-only mode, e.g. by using the -readonly parameter in
        # the CLI. See also ...": the holder only, not DuckDB's advice for its own CLI
        holder = re.search(r"held in (.*?\(PID \d+\))", text)
        who = holder.group(1).strip() if holder else "another process"
        return WarehouseBusy(f"warehouse is busy (held by {who}): {path}: retry when it has finished")
    return BatchrecError(f"cannot open warehouse {path}: {text.splitlines()[0]}")


def artifact_root(uri: str | os.PathLike) -> Path | str:
    """The folder an `--artifacts` URI names: a local path (or file:// URI) as a Path; an
    object-store URI (s3://bucket/prefix, see batchrec.storage) as the URI itself."""
    text = str(uri)
    if text.startswith("file://"):
        return Path(text[len("file://") :])
    if "://" in text:
        scheme = text.split("://", 1)[0]
        if scheme != "s3":
            raise BatchrecError(
                f"--artifacts {text}: unsupported scheme {scheme}:// "
                "(expected a path, a file:// URI or s3://bucket/prefix)"
            )
        return text.rstrip("/")
    return Path(text)


class Warehouse:
    """A warehouse file plus what belongs to it, named after its stem so that two warehouses in
    one folder never share anything: `<stem>.artifacts/` (model artifacts, unless `artifacts`
    points elsewhere: another folder, or an object store as a URI string), `<stem>.shards/` (sharded scoring output), `<stem>.serving.duckdb` (the
    read-only copy readers use, see serving.py)."""

    def __init__(self, path: str | os.PathLike | None = None, artifacts: str | os.PathLike | None = None):
        self.path = resolve_path(path)
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        stem = self.path.stem
        self.artifacts_dir = (
            artifact_root(artifacts) if artifacts else self.path.with_name(f"{stem}.artifacts")
        )
        self.shards_dir = self.path.with_name(f"{stem}.shards")
        self.serving_path = self.path.with_name(f"{stem}.serving.duckdb")

    def __repr__(self) -> str:
        return f"Warehouse({str(self.path)!r})"

    # -- the logical writer lock ------------------------------------------------------------
    @contextmanager
    def lock(self, command: str) -> Iterator[None]:
        """Hold the exclusive writer lock for the duration of one command.

        Re-entrant within a process, so a job (`batchrec run`) can hold it across its steps while
        each step takes it again as it would when run alone.
        """
        key = str(self.path.resolve())
        if key in _HELD_LOCKS:
            yield
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 512, 0).decode(errors="replace").strip() or "another process"
                raise WarehouseBusy(f"warehouse is busy (held by {holder}): {self.path}") from None
            stamp = utcnow().isoformat(timespec="seconds")
            holder = f"pid {os.getpid()} on {socket.gethostname()}: batchrec {command} since {stamp}Z"
            # Overwritten in place at a fixed size, never truncated first: on a full disk the
            # existing lock file's block is reused, so the command gets to report what ran out.
            line = holder.encode()[: _LOCK_LINE - 1].ljust(_LOCK_LINE - 1) + b"\n"
            try:
                os.pwrite(fd, line, 0)
                os.ftruncate(fd, _LOCK_LINE)
            except OSError as exc:
                raise OSError(exc.errno, exc.strerror, str(self.lock_path)) from None
            _HELD_LOCKS.add(key)
            try:
                yield
            finally:
                _HELD_LOCKS.discard(key)
        finally:
            os.close(fd)  # closing the descriptor releases the flock

    @contextmanager
    def lock_of_parent(self, command: str) -> Iterator[None]:
        """Work under the writer lock the parent process holds (a command that started this
        process as one of its workers, e.g. rank 0 of `train --nproc`), re-entrant like `lock`.
        Checked, not assumed: the lock file must be locked and name the parent as its holder."""
        key = str(self.path.resolve())
        parent = os.getppid()
        fd = os.open(self.lock_path, os.O_RDONLY) if self.lock_path.exists() else None
        try:
            held = False
            if fd is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                    fcntl.flock(fd, fcntl.LOCK_UN)
                except BlockingIOError:
                    held = True
            holder = os.pread(fd, 512, 0).decode(errors="replace").strip() if fd is not None else ""
            if not (held and holder.startswith(f"pid {parent} on {socket.gethostname()}:")):
                raise BatchrecError(
                    f"batchrec {command}: expected the parent process (pid {parent}) to hold the "
                    f"writer lock of {self.path}, but it is held by {holder or 'nobody'}"
                )
        finally:
            if fd is not None:
                os.close(fd)
        _HELD_LOCKS.add(key)
        try:
            yield
        finally:
            _HELD_LOCKS.discard(key)

    # -- connections ------------------------------------------------------------------------
    @contextmanager
    def connect(self, read_only: bool = False) -> Iterator[duckdb.DuckDBPyConnection]:
        """Open the DuckDB file; read-write opens create and migrate it."""
        if read_only and not self.path.exists():
            raise BatchrecError(f"no warehouse at {self.path}: run `batchrec ingest` first")
        if not read_only:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            con = duckdb.connect(str(self.path), read_only=read_only)
        except duckdb.Error as exc:
            raise _translate(exc, self.path) from None
        try:
            if read_only:
                self._check_version(con)
            else:
                self.migrate(con)
            yield con
        finally:
            con.close()

    @contextmanager
    def writer(self, command: str) -> Iterator[duckdb.DuckDBPyConnection]:
        """The usual write path: writer lock plus a read-write connection."""
        with self.lock(command), self.connect() as con:
            yield con

    # -- schema -----------------------------------------------------------------------------
    def _applied_version(self, con: duckdb.DuckDBPyConnection) -> int:
        exists = con.execute(
            "SELECT count(*) FROM information_schema.tables WHERE table_name = 'schema_version'"
        ).fetchall()[0][0]
        if not exists:
            return 0
        return con.execute("SELECT coalesce(max(version), 0) FROM schema_version").fetchall()[0][0]

    def _check_version(self, con: duckdb.DuckDBPyConnection) -> int:
        known = migrations()[-1][0]
        have = self._applied_version(con)
        if have > known:
            raise BatchrecError(
                f"warehouse {self.path} has schema version {have}, newer than this batchrec "
                f"understands ({known}): upgrade batchrec before using it"
            )
        return have

    def migrate(self, con: duckdb.DuckDBPyConnection) -> None:
        """Apply every schema file the warehouse has not applied yet, each in its own transaction.

        By set, not by the highest version: branches number their migrations independently, so a
        warehouse may already hold 005 when 004 arrives with a merge."""
        if self._check_version(con):
            applied = {v for (v,) in con.execute("SELECT version FROM schema_version").fetchall()}
        else:
            applied = set()
        for version, path in migrations():
            if version in applied:
                continue
            with transaction(con, f"schema migration {path.stem}"):
                con.execute(path.read_text())
                con.execute("INSERT INTO schema_version VALUES (?, ?, ?)", [version, path.stem, utcnow()])


# DuckDB settings of a connection that may read the warehouse file and nothing else: no file,
# network or environment access (COPY TO, EXPORT, read_csv, glob, ATTACH, INSTALL/LOAD) and no
# extension auto-loading; `open_readonly_sandboxed` then locks the configuration, so no
# SET/PRAGMA/RESET can undo any of it.
SANDBOX_CONFIG = {
    "enable_external_access": False,
    "autoinstall_known_extensions": False,
    "autoload_known_extensions": False,
    "allow_community_extensions": False,
}


@contextmanager
def open_readonly_sandboxed(path: str | os.PathLike) -> Iterator[duckdb.DuckDBPyConnection]:
    """A read-only connection to the DuckDB file at `path` that can reach nothing else (see
    SANDBOX_CONFIG): what `batchrec sql` runs an analyst's query on."""
    path = Path(path)
    if not path.exists():
        raise BatchrecError(f"no warehouse at {path}: run `batchrec ingest` first")
    try:
        con = duckdb.connect(str(path), read_only=True, config=SANDBOX_CONFIG)
    except duckdb.Error as exc:
        raise _translate(exc, path) from None
    try:
        con.execute("SET enable_progress_bar = false")  # a bar on stdout would break --format csv
        con.execute("SET lock_configuration = true")  # from here on no SET, RESET or PRAGMA
        yield con
    finally:
        con.close()


# -- helpers every step uses ---------------------------------------------------------------
@contextmanager
def transaction(
    con: duckdb.DuckDBPyConnection, what: str = "a change to the warehouse"
) -> Iterator[duckdb.DuckDBPyConnection]:
    """BEGIN ... COMMIT, or ROLLBACK on any exception (including KeyboardInterrupt).

    `what` the transaction publishes is remembered once it commits (`committed()`), so a command
    stopped later can say truthfully what it had already changed."""
    con.execute("BEGIN TRANSACTION")
    try:
        yield con
    except BaseException:
        con.execute("ROLLBACK")
        raise
    con.execute("COMMIT")
    _COMMITTED.append(what)


def committed() -> list[str]:
    """What this process has committed so far (see `transaction`), oldest first."""
    return list(_COMMITTED)


def publish_table(con: duckdb.DuckDBPyConnection, name: str, query: str, params: dict | None = None) -> int:
    """Replace table `name` with the result of `query`, atomically.

    The rows are built under `<name>__staging` outside the swap transaction (the slow part), then
    one transaction drops the old table and renames the staging one. Returns the row count.
    """
    staging = f"{name}__staging"
    con.execute(f"DROP TABLE IF EXISTS {staging}")
    con.sql(f"CREATE TABLE {staging} AS {query}", params=params or {})
    with transaction(con, f"table {name}"):
        con.execute(f"DROP TABLE IF EXISTS {name}")
        con.execute(f"ALTER TABLE {staging} RENAME TO {name}")
    return scalar(con, f"SELECT count(*) FROM {name}")


def scalar(con: duckdb.DuckDBPyConnection, sql: str, params: dict | list | None = None):
    """First column of the first row (or None). Fetches everything, which DuckDB 2 requires
    before the connection can run another statement."""
    result = con.sql(sql, params=params) if isinstance(params, dict) else con.execute(sql, params or [])
    rows = result.fetchall()
    return rows[0][0] if rows else None


def query_pl(con: duckdb.DuckDBPyConnection, sql: str, params: dict | None = None) -> pl.DataFrame:
    """Run a query and return a Polars frame (zero-copy through Arrow)."""
    return con.sql(sql, params=params or {}).pl()


def table_exists(con: duckdb.DuckDBPyConnection, name: str) -> bool:
    return bool(scalar(con, "SELECT count(*) FROM information_schema.tables WHERE table_name = ?", [name]))


def run_sql_file(con: duckdb.DuckDBPyConnection, path: Path, params: dict | None = None) -> None:
    """Run one SQL file; `$name` placeholders are bound from params (DuckDB named parameters)."""
    text = path.read_text()
    for statement in con.extract_statements(text):
        con.sql(
            statement.query, params={k: v for k, v in (params or {}).items() if f"${k}" in statement.query}
        )


def command_line() -> str:
    return " ".join(Path(a).name if i == 0 else a for i, a in enumerate(sys.argv))
