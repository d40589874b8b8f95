"""Snapshot operations: point-in-time (no leakage), determinism, retention, atomicity, errors."""

from __future__ import annotations

from datetime import timedelta

import pytest
from click.testing import CliRunner
from features_support import (
    SNAPSHOT_COLUMNS,
    add_rows,
    day,
    latest,
    load_ml_small,
    make_warehouse,
    query,
    snapshot_rows,
)

import batchrec.features.snapshots as snapshots
from batchrec.cli import main
from batchrec.errors import BatchrecError
from batchrec.features import build_snapshot, latest_snapshot_id, resolve_snapshot

SMALL = [(1, 10, 4.0, day(1)), (1, 20, 3.0, day(2)), (2, 10, 5.0, day(3)), (2, 30, 2.0, day(4))]


def test_no_leakage_and_determinism(tmp_path):
    wh = make_warehouse(tmp_path)
    load_ml_small(wh)
    as_of = "2015-01-01T00:00:00"
    build_snapshot(wh, as_of=as_of)
    first = latest(wh)
    build_snapshot(wh, as_of=as_of)
    second = latest(wh)
    reference = snapshot_rows(wh, first)
    assert snapshot_rows(wh, second) == reference  # determinism: same data, same parameters
    assert all(reference[table] for table in SNAPSHOT_COLUMNS)  # every table has rows to compare

    # Data at or after as_of: ratings of known users on new and rated items, new users, tags of
    # known and new terms on tagged items, a rating exactly at as_of.
    cut = query(wh, "SELECT as_of FROM feature_snapshots WHERE snapshot_id = ?", [first])[0][0]
    user, item = query(
        wh, "SELECT user_id, item_id FROM ratings WHERE ts < ? ORDER BY ts DESC LIMIT 1", [cut]
    )[0]
    tagged = query(wh, "SELECT item_id FROM tags WHERE ts < ? LIMIT 1", [cut])[0][0]
    add_rows(
        wh,
        ratings=[
            (user, 1, 0.5, cut),
            (user, 999999, 5.0, cut + timedelta(days=1)),
            (1, 2, 1.0, cut + timedelta(days=2)),
            (90001, item, 5.0, cut + timedelta(seconds=1)),
            (90002, tagged, 1.0, cut + timedelta(days=400)),
        ],
        tags=[
            (user, tagged, "brand new term", cut),
            (user, tagged, "funny", cut + timedelta(days=3)),
            (90001, item, "atmospheric", cut + timedelta(days=5)),
        ],
    )
    build_snapshot(wh, as_of=as_of)
    assert snapshot_rows(wh, latest(wh)) == reference


def test_retention_prunes_old_snapshots_and_says_so(tmp_path):
    wh = make_warehouse(tmp_path, SMALL)
    ids = []
    for _ in range(3):
        summary = build_snapshot(wh, as_of=day(5).isoformat(), protocols="random,user_temporal", keep=2)
        ids.append(latest(wh))
    assert f"pruned 1 older snapshot(s) beyond --keep 2: {ids[0]}" in summary
    for table in (*SNAPSHOT_COLUMNS, "feature_snapshots"):
        kept = {s for (s,) in query(wh, f"SELECT DISTINCT snapshot_id FROM {table}")}
        assert kept <= set(ids[1:]) and ids[0] not in kept, table
    listing = CliRunner().invoke(main, ["--warehouse", str(wh.path), "features", "list"])
    assert listing.exit_code == 0
    lines = listing.output.strip().splitlines()
    assert lines[0].split()[:3] == ["snapshot_id", "as_of", "created_at"]
    assert [line.split()[0] for line in lines[1:]] == [ids[2], ids[1]]  # newest first
    assert lines[1].split()[-1] == "random,user_temporal"
    with wh.connect(read_only=True) as con:
        assert latest_snapshot_id(con) == resolve_snapshot(con, "latest") == ids[2]
        assert resolve_snapshot(con, ids[1]) == ids[1]
        with pytest.raises(BatchrecError, match="unknown feature snapshot"):
            resolve_snapshot(con, ids[0])


def test_failure_part_way_leaves_no_half_snapshot(tmp_path, monkeypatch):
    wh = make_warehouse(tmp_path, SMALL)
    build_snapshot(wh, as_of=day(5).isoformat(), protocols="random")
    before = {
        table: query(wh, f"SELECT count(*) FROM {table}")
        for table in (*SNAPSHOT_COLUMNS, "feature_snapshots")
    }

    def broken(*args, **kwargs):
        raise KeyboardInterrupt  # as if interrupted after the first tables were written

    monkeypatch.setattr(snapshots, "build_item_tag_tfidf", broken)
    with pytest.raises(KeyboardInterrupt):
        build_snapshot(wh, as_of=day(5).isoformat(), protocols="random")
    after = {table: query(wh, f"SELECT count(*) FROM {table}") for table in before}
    assert after == before


def test_protocol_choice_and_recorded_params(tmp_path):
    wh = make_warehouse(tmp_path, SMALL)
    summary = build_snapshot(
        wh,
        as_of=day(5).isoformat(),
        protocols="user_temporal, random",
        params=("user_temporal.test_frac=0.5", "tfidf.min_df=3"),
    )
    assert "random " in summary and "user_temporal " in summary
    rows = query(wh, "SELECT protocol, params->>'test_frac' FROM split_protocols ORDER BY protocol")
    assert rows == [("random", "0.1"), ("user_temporal", "0.5")]
    recorded = query(wh, "SELECT params->>'tfidf.min_df', params->'protocols' FROM feature_snapshots")[0]
    assert recorded == ("3", '["random","user_temporal"]')


def _cli(wh_path, *args):
    result = CliRunner().invoke(main, ["--warehouse", str(wh_path), "features", *args])
    return result.exit_code, result.stderr.strip()


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--protocols", "random,nope"],
            "error: unknown protocol 'nope' (valid: random, user_random, user_temporal, "
            "global_temporal, leave_last_n_positive, as_of, or all)",
        ),
        (["--param", "nope=1"], "error: unknown parameter 'nope' (valid keys: seed, bayes_c, tfidf.min_df"),
        (
            ["--param", "random.test_frac=1.5"],
            "error: bad value for parameter random.test_frac: '1.5' (expected a fraction in [0, 1))",
        ),
        (
            ["--param", "tfidf.min_df=zero"],
            "error: bad value for parameter tfidf.min_df: 'zero' (expected an integer >= 1)",
        ),
        (["--param", "seed"], "error: bad parameter 'seed': expected KEY=VALUE"),
        (
            ["--param", "user_random.valid_frac=0.5", "--param", "user_random.test_frac=0.5"],
            "error: bad values for parameters user_random.valid_frac + user_random.test_frac",
        ),
        (["--as-of", "yesterday"], "error: --as-of: cannot read 'yesterday' as a timestamp"),
        (
            ["--as-of", "2019-06-01"],
            "error: no ratings before 2019-06-01 00:00:00; earliest is 2020-01-02 00:00:00",
        ),
    ],
)
def test_cli_errors_are_one_line(tmp_path, args, message):
    wh = make_warehouse(tmp_path, SMALL)
    code, err = _cli(wh.path, *args)
    assert code != 0 and err.startswith(message) and "\n" not in err
    assert query(wh, "SELECT count(*) FROM feature_snapshots") == [(0,)]


def test_cli_empty_warehouse(tmp_path):
    missing = tmp_path / "none" / "batchrec.duckdb"
    assert _cli(missing) == (1, "error: no ratings in the warehouse: run `batchrec ingest` first")
    assert not missing.exists()
    empty = make_warehouse(tmp_path)  # schema, no ratings
    assert _cli(empty.path) == (1, "error: no ratings in the warehouse: run `batchrec ingest` first")


def test_cli_builds_and_lists(tmp_path):
    wh = make_warehouse(tmp_path, SMALL)
    code = CliRunner().invoke(main, ["--warehouse", str(wh.path), "features", "list"])
    assert code.exit_code == 0 and "no feature snapshots yet" in code.output
    result = CliRunner().invoke(main, ["--warehouse", str(wh.path), "features", "--protocols", "all"])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("snapshot s") and "2 users, 3 items, 4 interactions" in result.stdout
    assert query(wh, "SELECT count(*) FROM split_protocols") == [(6,)]
