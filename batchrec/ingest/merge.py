"""Merge a staged file into the warehouse tables, set-wise in SQL.

* ratings: one row per (user_id, item_id); the latest ts wins, and on a tie the later file wins
  (within one file an exact tie keeps the higher rating, so the result never depends on row
  order). Rows identical to what is stored are not rewritten, so re-ingesting changes nothing.
* items, users: upsert by id; only new or changed rows are written.
* tags: exact (user_id, item_id, tag, ts) repeats are dropped.

Each merge is a staging anti-join plus DELETE ... USING and INSERT; no primary-key index (slow
and memory-hungry at 20M rows). Returns the rows written (new or changed).
"""

from __future__ import annotations

import numpy as np

from batchrec.ingest.read import Staged
from batchrec.warehouse import scalar

_KEY_LIMIT = 1 << 31  # ids below this pack two to an int64 for the duplicate check
_BLOCK = 1 << 18  # keys per block of the repeat scan


def merge(con, staged: Staged) -> int:
    kind = staged.spec.kind
    if kind == "ratings":
        _keep_latest_per_pair(con, staged.table)
        wins = "s.ts > x.ts OR (s.ts = x.ts AND s.rating::FLOAT IS DISTINCT FROM x.rating)"
        return _replace(con, "ratings", staged, ("user_id", "item_id"), ("rating", "ts"), wins)
    if kind == "tags":
        _drop_repeated_tags(con, staged.table)
        return _insert_new_tags(con, staged)
    keys = ("item_id",) if kind == "items" else ("user_id",)
    values = ("title", "year", "genres") if kind == "items" else ("gender", "age", "occupation", "zip")
    _one_row_per_key(con, staged.table, keys, values)
    wins = " OR ".join(f"s.{v} IS DISTINCT FROM x.{v}" for v in values)
    return _replace(con, kind, staged, keys, values, wins)


def _replace(con, target: str, staged: Staged, keys: tuple, values: tuple, wins: str) -> int:
    """Insert staged rows whose key is new, and replace stored rows where `wins` holds."""
    cols = ", ".join((*keys, *values))
    source = {"source_id": staged.source_id}
    if not scalar(con, f"SELECT count(*) FROM (SELECT 1 FROM {target} LIMIT 1)"):  # first load: plain append
        return con.execute(
            f"INSERT INTO {target} SELECT {cols}, $source_id FROM {staged.table}", source
        ).fetchall()[0][0]
    on = " AND ".join(f"s.{k} = x.{k}" for k in keys)
    changed = f"{staged.table}_changed"
    con.execute(f"""CREATE TEMP TABLE {changed} AS SELECT s.* FROM {staged.table} s LEFT JOIN {target} x ON {on}
                    WHERE x.{keys[0]} IS NULL OR {wins}""")
    con.execute(f"DELETE FROM {target} x USING {changed} s WHERE {on}").fetchall()
    loaded = con.execute(f"INSERT INTO {target} SELECT {cols}, $source_id FROM {changed}", source).fetchall()[
        0
    ][0]
    con.execute(f"DROP TABLE {changed}")
    return loaded


def _keep_latest_per_pair(con, table: str) -> None:
    """Collapse repeated (user_id, item_id) pairs of one file to the latest rating."""
    if not _has_duplicate_pairs(con, table):
        return
    con.execute(f"""DELETE FROM {table} WHERE rowid IN (
                        SELECT rowid FROM {table}
                        QUALIFY row_number() OVER (PARTITION BY user_id, item_id
                                                   ORDER BY ts DESC, rating DESC NULLS LAST) > 1)""").fetchall()


def _has_duplicate_pairs(con, table: str) -> bool:
    """Exact check on packed int64 keys in numpy (~5x faster than DuckDB's 20M-group hash
    aggregate; much more for files that come sorted)."""
    lo_u, hi_u, lo_i, hi_i, n = con.execute(
        f"SELECT min(user_id), max(user_id), min(item_id), max(item_id), count(*) FROM {table}"
    ).fetchall()[0]
    if n < 2:
        return False
    if min(lo_u, lo_i) >= 0 and max(hi_u, hi_i) < _KEY_LIMIT:
        keys = con.sql(f"SELECT (user_id << 32) | item_id AS k FROM {table}").to_arrow_table().column("k")
        return _repeats([chunk.to_numpy() for chunk in keys.chunks], jump=2 << 32)  # zero-copy views
    return bool(
        scalar(
            con, f"SELECT count(*) FROM (SELECT 1 FROM {table} GROUP BY user_id, item_id HAVING count(*) > 1)"
        )
    )


def _repeats(chunks: list[np.ndarray], jump: int | None = None) -> bool:
    """Whether some value occurs twice in the concatenation of `chunks`: decided in one pass when
    `_disjoint_pieces` proves there is none, else by sorting a copy (timsort, 'stable', merges a
    few long runs in a fraction of a quicksort)."""
    n = sum(len(c) for c in chunks)
    if n < 2 or _disjoint_pieces(chunks, jump):
        return False
    keys = np.concatenate(chunks)
    falls = np.count_nonzero(keys[1:] <= keys[:-1])
    keys.sort(kind="stable" if falls * 1000 < n else "quicksort")
    return bool(np.any(keys[1:] == keys[:-1]))


def _disjoint_pieces(chunks: list[np.ndarray], jump: int | None) -> bool:
    """True when the keys split into strictly increasing pieces whose value ranges do not overlap,
    which proves no key repeats (False: unknown).

    MovieLens files are sorted by (user, item) and a parallel read appends them as a few thousand
    file chunks in some order, so pieces are cut where the key falls, or rises by more than
    `jump` (for packed (user, item) keys: where the user id skips one, i.e. where one file chunk
    ends and another begins), and at block ends. Any cuts are sound; these make sorted files pass."""
    firsts, lasts, n = [], [], 0
    for chunk in chunks:
        for a in range(0, len(chunk), _BLOCK):  # cache-sized blocks: no long temporaries
            block = chunk[a : a + _BLOCK]
            step = np.diff(block)
            cut = step <= 0
            if jump is not None:
                cut |= step > jump
            starts = np.flatnonzero(cut) + 1
            firsts.append(block[np.concatenate([[0], starts])])
            lasts.append(block[np.concatenate([starts, [len(block)]]) - 1])
            n += len(block)
    firsts, lasts = np.concatenate(firsts), np.concatenate(lasts)
    if len(firsts) * 16 > n:  # short pieces: not a sorted file; the sort decides
        return False
    order = np.argsort(firsts, kind="stable")
    return bool((lasts[order][:-1] < firsts[order][1:]).all())


def _one_row_per_key(con, table: str, keys: tuple, values: tuple) -> None:
    """Items and users are small: keep one deterministic row per id."""
    con.execute(f"""CREATE OR REPLACE TEMP TABLE {table} AS SELECT * FROM {table}
                    QUALIFY row_number() OVER (PARTITION BY {", ".join(keys)} ORDER BY {", ".join(values)}) = 1""")


def _drop_repeated_tags(con, table: str) -> None:
    """Delete exact repeats of a tag application within one file. Equal 64-bit hashes are only a
    hint (found in numpy, far cheaper than a DISTINCT over the tag text); the delete is exact."""
    hashes = con.sql(f"SELECT hash(user_id, item_id, tag, ts) AS h FROM {table}").fetchnumpy()["h"]
    if not _repeats([hashes]):
        return
    con.execute(f"""DELETE FROM {table} WHERE rowid IN (
                        SELECT rowid FROM {table}
                        QUALIFY row_number() OVER (PARTITION BY user_id, item_id, tag, ts) > 1)""").fetchall()


def _insert_new_tags(con, staged: Staged) -> int:
    new = (
        ""
        if not scalar(con, "SELECT count(*) FROM (SELECT 1 FROM tags LIMIT 1)")
        else """
        WHERE NOT EXISTS (SELECT 1 FROM tags x WHERE x.user_id = s.user_id AND x.item_id = s.item_id
                                                 AND x.tag = s.tag AND x.ts = s.ts)"""
    )
    return con.execute(
        f"INSERT INTO tags SELECT s.user_id, s.item_id, s.tag, s.ts, $source_id FROM {staged.table} s {new}",
        {"source_id": staged.source_id},
    ).fetchall()[0][0]
