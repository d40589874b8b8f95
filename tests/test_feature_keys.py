"""The feature snapshot tables keep the keys declared in sql/features/tests.toml: a real snapshot
of ml-latest-small (every protocol) is built once and each declaration runs as one SQL query that
counts the rows breaking it."""

from __future__ import annotations

import tomllib

import duckdb
import pytest
from features_support import SNAPSHOT_COLUMNS

from batchrec.features import build_snapshot
from batchrec.ingest.run import ingest_path
from batchrec.warehouse import SQL_DIR, Warehouse

DECLARATIONS = tomllib.loads((SQL_DIR / "features" / "tests.toml").read_text())


def _cols(columns: list[str]) -> str:
    return ", ".join(columns)


def declared_checks() -> list[tuple[str, str]]:
    """(name, SQL counting the rows that break it) for every declaration."""
    checks = []
    for table, spec in DECLARATIONS.items():
        for key in spec.get("unique", []):
            checks.append(
                (
                    f"{table} unique ({_cols(key)})",
                    f"SELECT count(*) FROM (SELECT {_cols(key)} FROM {table} GROUP BY ALL HAVING count(*) > 1)",
                )
            )
        for column in spec.get("not_null", []):
            checks.append(
                (f"{table}.{column} not null", f"SELECT count(*) FROM {table} WHERE {column} IS NULL")
            )
        for rel in spec.get("relationships", []):
            on = " AND ".join(
                f"c.{a} = p.{b}" for a, b in zip(rel["columns"], rel["to_columns"], strict=True)
            )
            checks.append(
                (
                    f"{table} ({_cols(rel['columns'])}) in {rel['to']}",
                    f"SELECT count(*) FROM {table} c ANTI JOIN {rel['to']} p ON {on}",
                )
            )
        for column, values in spec.get("accepted_values", {}).items():
            allowed = ", ".join(f"'{v}'" for v in values)
            checks.append(
                (
                    f"{table}.{column} in ({allowed})",
                    f"SELECT count(*) FROM {table} WHERE {column} NOT IN ({allowed})",
                )
            )
    return checks


CHECKS = declared_checks()


@pytest.fixture(scope="module")
def snapshot_db(tmp_path_factory):
    """A warehouse holding one ml-latest-small snapshot with all six protocols."""
    wh = Warehouse(tmp_path_factory.mktemp("keys") / "batchrec.duckdb")
    ingest_path(wh, dataset="ml-latest-small")
    build_snapshot(wh, protocols="all")
    con = duckdb.connect(str(wh.path))
    yield con
    con.close()


def failing_rows(con, sql: str) -> int:
    return con.execute(sql).fetchone()[0]


def test_every_snapshot_table_is_declared():
    assert set(DECLARATIONS) == set(SNAPSHOT_COLUMNS) | {"feature_snapshots"}
    assert all(spec.get("unique") and spec.get("not_null") for spec in DECLARATIONS.values())


@pytest.mark.parametrize("sql", [sql for _, sql in CHECKS], ids=[name for name, _ in CHECKS])
def test_declared_check_holds(snapshot_db, sql):
    assert failing_rows(snapshot_db, sql) == 0


def test_snapshot_is_not_empty(snapshot_db):
    """The checks above pass trivially on empty tables; these hold the real data."""
    counts = dict(
        snapshot_db.execute(
            "SELECT 'interactions', count(*) FROM interactions UNION ALL SELECT 'user_index', count(*) FROM user_index "
            "UNION ALL SELECT 'protocols', count(*) FROM split_protocols"
        ).fetchall()
    )
    assert counts == {"interactions": 100_836, "user_index": 610, "protocols": 6}
    assert failing_rows(snapshot_db, "SELECT count(*) FROM split_holdout") > 0


def test_checks_catch_broken_rows(snapshot_db):
    """A duplicated interaction, a holdout row that is not an interaction and an unknown part are
    each reported by their declaration (inside a transaction that is rolled back)."""
    by_name = dict(CHECKS)
    con = snapshot_db
    con.begin()
    try:
        con.execute("INSERT INTO interactions SELECT * FROM interactions LIMIT 1")
        con.execute(
            "INSERT INTO split_holdout SELECT snapshot_id, protocol, 10_000, item_idx, rating, ts, 'later' "
            "FROM split_holdout LIMIT 1"
        )
        assert failing_rows(con, by_name["interactions unique (snapshot_id, user_idx, item_idx)"]) == 1
        assert (
            failing_rows(con, by_name["split_holdout (snapshot_id, user_idx, item_idx, ts) in interactions"])
            == 1
        )
        assert failing_rows(con, by_name["split_holdout.part in ('valid', 'test')"]) == 1
    finally:
        con.rollback()
    assert failing_rows(con, by_name["interactions unique (snapshot_id, user_idx, item_idx)"]) == 0
