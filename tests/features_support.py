"""Raw tables for the feature store tests: hand-made rows, or ml-latest-small read by DuckDB.

Rows go straight into the raw tables with SQL (independent of `batchrec ingest`).
"""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path

from batchrec.features import latest_snapshot_id
from batchrec.warehouse import Warehouse

ML_SMALL = Path(__file__).resolve().parent.parent / "batchrec" / "datasets" / "ml-latest-small"
DAY0 = datetime(2020, 1, 1)

# Every snapshot table with the columns compared between builds (all but snapshot_id).
SNAPSHOT_COLUMNS = {
    "user_index": "user_id, user_idx",
    "item_index": "item_id, item_idx",
    "interactions": "user_idx, item_idx, rating, ts",
    "user_features": "user_id, user_idx, n_ratings, mean_rating, std_rating, first_ts, last_ts, days_active, share_high, n_tags",
    "item_features": "item_id, item_idx, n_ratings, mean_rating, std_rating, bayes_rating, pop_rank, first_ts, last_ts, year",
    "item_genres": "item_idx, genre",
    "item_tag_tfidf": "item_idx, term, weight",
    "split_holdout": "protocol, user_idx, item_idx, rating, ts, part",
    "split_protocols": "protocol, params, n_train, n_valid, n_test",
}


def day(n: float) -> datetime:
    return DAY0 + timedelta(days=n)


def add_rows(wh: Warehouse, ratings=(), tags=(), items=()) -> None:
    """ratings: (user_id, item_id, rating, ts); tags: (user_id, item_id, tag, ts);
    items: (item_id, title, year, genres)."""
    with wh.writer("test") as con:
        if ratings:
            con.executemany("INSERT INTO ratings VALUES (?, ?, ?, ?, 0)", [list(r) for r in ratings])
        if tags:
            con.executemany("INSERT INTO tags VALUES (?, ?, ?, ?, 0)", [list(t) for t in tags])
        if items:
            con.executemany("INSERT INTO items VALUES (?, ?, ?, ?, 0)", [list(i) for i in items])


def make_warehouse(tmp_path: Path, ratings=(), tags=(), items=()) -> Warehouse:
    wh = Warehouse(tmp_path / "wh" / "batchrec.duckdb")
    add_rows(wh, ratings, tags, items)
    return wh


def load_ml_small(wh: Warehouse) -> None:
    """ml-latest-small's ratings, tags and movies into the raw tables (unix seconds -> UTC)."""
    with wh.writer("test") as con:
        con.execute(f"""INSERT INTO ratings
            SELECT userId, movieId, rating, make_timestamp(timestamp * 1000000), 0
            FROM read_csv('{ML_SMALL / "ratings.csv"}')""")
        con.execute(f"""INSERT INTO tags
            SELECT userId, movieId, tag, make_timestamp(timestamp * 1000000), 0
            FROM read_csv('{ML_SMALL / "tags.csv"}', quote = '"')""")
        con.execute(f"""INSERT INTO items
            SELECT movieId, title, try_cast(regexp_extract(title, '\\((\\d{{4}})\\)\\s*$', 1) AS INTEGER),
                   CASE WHEN genres = '(no genres listed)' THEN []::VARCHAR[] ELSE string_split(genres, '|') END,
                   0
            FROM read_csv('{ML_SMALL / "movies.csv"}', quote = '"')""")


def latest(wh: Warehouse) -> str:
    with wh.connect(read_only=True) as con:
        return latest_snapshot_id(con)


def snapshot_rows(wh: Warehouse, snapshot_id: str) -> dict[str, list[tuple]]:
    """Every table's rows of one snapshot (without snapshot_id), sorted, plus its row counts."""
    with wh.connect(read_only=True) as con:
        out = {
            table: sorted(
                con.execute(f"SELECT {cols} FROM {table} WHERE snapshot_id = ?", [snapshot_id]).fetchall(),
                key=repr,
            )
            for table, cols in SNAPSHOT_COLUMNS.items()
        }
        out["row_counts"] = con.execute(
            "SELECT row_counts FROM feature_snapshots WHERE snapshot_id = ?", [snapshot_id]
        ).fetchall()
    return out


def query(wh: Warehouse, sql: str, params=None) -> list[tuple]:
    with wh.connect(read_only=True) as con:
        return con.execute(sql, params or []).fetchall()
