"""`batchrec ingest`: detect, read, validate and merge every file of a dataset in ONE transaction.

Without --quarantine the first bad line fails the whole ingest with a one-line error and the
warehouse is left exactly as it was (ROLLBACK). With --quarantine the good rows load and every
bad line is kept in `quarantine` (file, line, reason, raw text).

What values are checked against (spec.py): timestamps may not be later than the ingest time plus
--max-future (default MAX_FUTURE); MovieLens ratings are on their release's published scale, and
generic ratings on --rating-scale, else the warehouse's scale (table `rating_scale`, set by the
first ingest that loads explicit ratings), else half stars 0.5..5. A disk that fills up ends the
ingest with one line naming the file that could not be written, and the warehouse as it was.

Idempotence: a file whose sha256 was ingested before (same kind and format) is skipped and
logged with rows_read = 0, so re-running a nightly ingest on unchanged files is cheap and
changes nothing; a changed or new file is merged (see merge.py).
"""

from __future__ import annotations

import errno
import logging
import re
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime

import duckdb

from batchrec.errors import BatchrecError
from batchrec.ingest.formats import detect
from batchrec.ingest.generic import parse_columns
from batchrec.ingest.merge import merge
from batchrec.ingest.read import NO_SPACE, stage
from batchrec.ingest.sources import ZIP_MAX_RATIO, ZIP_MAX_SIZE, ZipLimits, no_space, open_source, sha256_of
from batchrec.ingest.spec import HALF_STARS, MAX_FUTURE, FileSpec, Limits, Scale, parse_duration
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


def ingest_path(
    wh: Warehouse,
    path: str | None = None,
    dataset: str | None = None,
    fmt: str = "auto",
    quarantine: bool = False,
    columns: str | None = None,
    rating_scale: str | None = None,
    max_future: str = MAX_FUTURE,
    zip_max_size: str = ZIP_MAX_SIZE,
    zip_max_ratio: str | float = ZIP_MAX_RATIO,
) -> str:
    """Ingest a directory, zip or file (or an embedded dataset); returns a short summary."""
    mapping = parse_columns(columns)
    given_scale = Scale.parse(rating_scale) if rating_scale else None
    started = utcnow()
    latest = started + parse_duration(max_future)
    zip_limits = ZipLimits.parse(zip_max_size, zip_max_ratio)
    ingest_id = started.strftime("%Y%m%dT%H%M%S.%fZ")
    try:
        with wh.writer("ingest") as con, open_source(path, dataset, zip_limits) as source:
            con.execute("SET TimeZone = 'UTC'")  # ISO strings without an offset are UTC
            con.execute("SET preserve_insertion_order = false")  # measured: less CPU and memory for big loads
            con.execute("SET enable_progress_bar = false")  # cron logs want the summary, not a bar
            stored_scale = _stored_scale(con)
            limits = Limits(latest, given_scale or stored_scale or HALF_STARS)
            fmt, specs = detect(con, source, fmt, mapping, limits)
            if given_scale and fmt != "generic":
                raise BatchrecError(
                    f"--rating-scale applies to generic files (expected no --rating-scale with "
                    f"{fmt}: its ratings are checked on the release's published scale)"
                )
            # Checksums are computed on a thread (hashlib releases the GIL) while DuckDB reads.
            hasher = ThreadPoolExecutor(max_workers=1)
            try:
                checksums = [hasher.submit(sha256_of, spec.path) for spec in specs]
                with transaction(con):
                    results = [
                        _ingest_file(con, spec, n, ingest_id, quarantine, checksums[n])
                        for n, spec in enumerate(specs)
                    ]
                    if stored_scale is None:
                        _store_first_scale(con, results, ingest_id, started)
            finally:
                hasher.shutdown(cancel_futures=True)
            refresh_serving(wh, con)
    except duckdb.Error as exc:
        if NO_SPACE not in str(exc):
            raise
        written = re.search(r'file "([^"]+)"', str(exc))  # DuckDB names the file it could not write
        raise no_space(written[1] if written else wh.path) from None
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
        raise no_space(exc.filename or wh.path) from None
    return _summary(ingest_id, fmt, source.label, results)


def _stored_scale(con) -> Scale | None:
    row = con.execute("SELECT low, high, step FROM rating_scale").fetchall()
    return Scale(*row[0]) if row else None


def _store_first_scale(con, results: list[FileResult], ingest_id: str, started: datetime) -> None:
    """The scale of the first file that loaded explicit ratings becomes the warehouse's."""
    scale = next((r.spec.scale for r in results if r.spec.scale and r.rows_loaded), None)
    if scale is not None and scalar(con, "SELECT count(rating) FROM ratings"):
        con.execute(
            "INSERT INTO rating_scale VALUES (?, ?, ?, ?, ?)",
            [scale.low, scale.high, scale.step, ingest_id, started],
        ).fetchall()


def _ingest_file(
    con, spec: FileSpec, n: int, ingest_id: str, quarantine: bool, checksum: Future
) -> FileResult:
    started = utcnow()
    # A file can only repeat an earlier one if its kind was ingested before; otherwise (a first
    # load) reading need not wait for the checksum.
    seen_kind = scalar(
        con, "SELECT count(*) FROM ingest_log WHERE kind = ? AND format = ?", [spec.kind, spec.format]
    )
    seen = seen_kind and scalar(
        con,
        "SELECT count(*) FROM ingest_log WHERE checksum = ? AND kind = ? AND format = ?",
        [checksum.result(), spec.kind, spec.format],
    )
    if seen:
        result = FileResult(spec, 0, 0, 0, skipped=True)
    else:
        source_id = _source_id(con, spec.label)
        staged = stage(con, spec, n, source_id)
        if staged.n_bad and not quarantine:
            line, reason = con.execute(
                f"SELECT line, reason FROM {staged.bad} ORDER BY line LIMIT 1"
            ).fetchall()[0]
            others = staged.n_bad - 1
            more = (
                (
                    f"; {others:,} more bad line{'s' if others > 1 else ''}: --quarantine loads the good rows "
                    f"and keeps the bad ones"
                )
                if others
                else ""
            )
            raise BatchrecError(f"{spec.label}:{line}: {reason}{more}")
        loaded = merge(con, staged)
        if staged.n_bad:
            con.execute(
                f"INSERT INTO quarantine SELECT ?, ?, line, reason, raw, ? FROM {staged.bad}",
                [ingest_id, spec.label, utcnow()],
            ).fetchall()
        con.execute(f"DROP TABLE {staged.table}")
        con.execute(f"DROP TABLE {staged.bad}")
        result = FileResult(spec, staged.rows_read, loaded, staged.n_bad)
    con.execute(
        "INSERT INTO ingest_log VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [
            ingest_id,
            spec.label,
            spec.kind,
            spec.format,
            checksum.result(),
            result.rows_read,
            result.rows_loaded,
            result.rows_rejected,
            started,
            utcnow(),
        ],
    ).fetchall()
    log.info(
        "%s %s: %d read, %d loaded, %d rejected%s",
        spec.kind,
        spec.label,
        result.rows_read,
        result.rows_loaded,
        result.rows_rejected,
        " (unchanged, skipped)" if result.skipped else "",
    )
    return result


def _source_id(con, file: str) -> int:
    """The id of `file` in `sources` (what the raw tables' source_id refers to); a file seen for the
    first time gets the next one."""
    con.execute(
        "INSERT INTO sources SELECT (SELECT coalesce(max(source_id), 0) + 1 FROM sources), $file "
        "WHERE NOT EXISTS (SELECT 1 FROM sources WHERE file = $file)",
        {"file": file},
    ).fetchall()
    return scalar(con, "SELECT source_id FROM sources WHERE file = ?", [file])


def _summary(ingest_id: str, fmt: str, label: str, results: list[FileResult]) -> str:
    lines = [f"ingest {ingest_id}: {label} ({fmt})"]
    for r in results:
        what = (
            "unchanged since an earlier ingest (same sha256), skipped"
            if r.skipped
            else f"{r.rows_read:,} read, {r.rows_loaded:,} new or changed, {r.rows_rejected:,} rejected"
        )
        lines.append(f"  {r.spec.kind:<8} {r.spec.label}: {what}")
    rejected = sum(r.rows_rejected for r in results)
    if rejected:
        lines.append(
            f"  {rejected:,} bad lines kept: SELECT * FROM quarantine WHERE ingest_id = '{ingest_id}'"
        )
    return "\n".join(lines)
