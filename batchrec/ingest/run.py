"""`batchrec ingest`: detect, read, validate and merge every file of a dataset in ONE transaction.

Without --quarantine the first bad line fails the whole ingest with a one-line error and the
warehouse is left exactly as it was (ROLLBACK). With --quarantine the good rows load and every
bad line is kept in `quarantine` (file, line, reason, raw text).

Idempotence: a file whose sha256 was ingested before (same kind and format) is skipped and
logged with rows_read = 0, so re-running a nightly ingest on unchanged files is cheap and
changes nothing; a changed or new file is merged (see merge.py).
"""

from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from batchrec.errors import BatchrecError
from batchrec.ingest.formats import FileSpec, detect
from batchrec.ingest.generic import parse_columns
from batchrec.ingest.merge import merge
from batchrec.ingest.read import stage
from batchrec.ingest.sources import open_source, sha256_of
from batchrec.serving import refresh as refresh_serving
from batchrec.warehouse import Warehouse, scalar, transaction, utcnow

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FileResult:
    spec: FileSpec
    rows_read: int
    rows_loaded: int
    rows_rejected: int
    skipped: bool = False


def ingest_path(wh: Warehouse, path: str | None = None, dataset: str | None = None, fmt: str = "auto",
                quarantine: bool = False, columns: str | None = None) -> str:
    """Ingest a directory, zip or file (or an embedded dataset); returns a short summary."""
    mapping = parse_columns(columns)
    ingest_id = utcnow().strftime("%Y%m%dT%H%M%S.%fZ")
    with wh.writer("ingest") as con, open_source(path, dataset) as source:
        con.execute("SET TimeZone = 'UTC'")  # ISO strings without an offset are UTC
        con.execute("SET preserve_insertion_order = false")  # measured: less CPU and memory for big loads
        con.execute("SET enable_progress_bar = false")  # cron logs want the summary, not a bar
        layout = detect(con, source, fmt, mapping)
        # Checksums are computed on a thread (hashlib releases the GIL) while DuckDB reads.
        hasher = ThreadPoolExecutor(max_workers=1)
        try:
            checksums = [hasher.submit(sha256_of, spec.path) for spec in layout.files]
            with transaction(con):
                results = [_ingest_file(con, spec, n, ingest_id, quarantine, checksums[n])
                           for n, spec in enumerate(layout.files)]
        finally:
            hasher.shutdown(cancel_futures=True)
        refresh_serving(wh, con)
    return _summary(ingest_id, layout.format, source.label, results)


def _ingest_file(con, spec: FileSpec, n: int, ingest_id: str, quarantine: bool, checksum: Future) -> FileResult:
    started = utcnow()
    # A file can only repeat an earlier one if its kind was ingested before; otherwise (a first
    # load) reading need not wait for the checksum.
    seen_kind = scalar(con, "SELECT count(*) FROM ingest_log WHERE kind = ? AND format = ?", [spec.kind, spec.format])
    seen = seen_kind and scalar(con, "SELECT count(*) FROM ingest_log WHERE checksum = ? AND kind = ? AND format = ?",
                                [checksum.result(), spec.kind, spec.format])
    if seen:
        result = FileResult(spec, 0, 0, 0, skipped=True)
    else:
        source_id = _source_id(con, spec.label)
        # A first load of ratings or tags (the big files) is read straight into the empty table: no copy.
        direct = spec.kind in ("ratings", "tags") and not scalar(
            con, f"SELECT count(*) FROM (SELECT 1 FROM {spec.kind} LIMIT 1)")
        staged = stage(con, spec, n, source_id, into=spec.kind if direct else None)
        if staged.n_bad and not quarantine:
            line, reason = con.execute(f"SELECT line, reason FROM {staged.bad} ORDER BY line LIMIT 1").fetchall()[0]
            others = staged.n_bad - 1
            more = (f" (and {others:,} more bad line{'s' if others > 1 else ''}; --quarantine loads the good rows "
                    f"and keeps the bad ones)") if others else ""
            raise BatchrecError(f"{spec.label}:{line}: {reason}{more}")
        loaded = merge(con, staged)
        if staged.n_bad:
            con.execute(f"INSERT INTO quarantine SELECT ?, ?, line, reason, raw, ? FROM {staged.bad}",
                        [ingest_id, spec.label, utcnow()]).fetchall()
        if not staged.direct:
            con.execute(f"DROP TABLE {staged.table}")
        con.execute(f"DROP TABLE {staged.bad}")
        result = FileResult(spec, staged.rows_read, loaded, staged.n_bad)
    con.execute("INSERT INTO ingest_log VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [ingest_id, spec.label, spec.kind, spec.format, checksum.result(), result.rows_read, result.rows_loaded,
                 result.rows_rejected, started, utcnow()]).fetchall()
    log.info("%s %s: %d read, %d loaded, %d rejected%s", spec.kind, spec.label, result.rows_read,
             result.rows_loaded, result.rows_rejected, " (unchanged, skipped)" if result.skipped else "")
    return result


def _source_id(con, file: str) -> int:
    """The id of `file` in `sources` (what the raw tables' source_id refers to); a file seen for the
    first time gets the next one."""
    con.execute("INSERT INTO sources SELECT (SELECT coalesce(max(source_id), 0) + 1 FROM sources), $file "
                "WHERE NOT EXISTS (SELECT 1 FROM sources WHERE file = $file)", {"file": file}).fetchall()
    return scalar(con, "SELECT source_id FROM sources WHERE file = ?", [file])


def _summary(ingest_id: str, fmt: str, label: str, results: list[FileResult]) -> str:
    lines = [f"ingest {ingest_id}: {label} ({fmt})"]
    for r in results:
        what = ("unchanged since an earlier ingest (same sha256), skipped" if r.skipped else
                f"{r.rows_read:,} read, {r.rows_loaded:,} new or changed, {r.rows_rejected:,} rejected")
        lines.append(f"  {r.spec.kind:<8} {r.spec.label}: {what}")
    rejected = sum(r.rows_rejected for r in results)
    if rejected:
        lines.append(f"  {rejected:,} bad lines kept: SELECT * FROM quarantine WHERE ingest_id = '{ingest_id}'")
    return "\n".join(lines)
