-- The warehouse contract (see DESIGN.md). Table and column names are the public SQL interface.
-- All timestamps are UTC without a zone. IDs in public tables are the source's raw ids.

CREATE TABLE schema_version (
    version     INTEGER PRIMARY KEY,
    name        VARCHAR NOT NULL,
    applied_at  TIMESTAMP NOT NULL
);

-- Raw tables, written by `batchrec ingest` -------------------------------------------------
-- One row per (user_id, item_id): a re-rating replaces the earlier one (latest ts wins).
CREATE TABLE ratings (
    user_id  BIGINT NOT NULL,
    item_id  BIGINT NOT NULL,
    rating   FLOAT,              -- NULL for implicit interactions
    ts       TIMESTAMP NOT NULL,
    source   VARCHAR NOT NULL    -- file the row came from
);

CREATE TABLE items (
    item_id  BIGINT NOT NULL,
    title    VARCHAR,
    year     INTEGER,
    genres   VARCHAR[] NOT NULL,  -- "(no genres listed)" is the empty list
    source   VARCHAR NOT NULL
);

CREATE TABLE tags (
    user_id  BIGINT NOT NULL,
    item_id  BIGINT NOT NULL,
    tag      VARCHAR NOT NULL,
    ts       TIMESTAMP NOT NULL,
    source   VARCHAR NOT NULL
);

CREATE TABLE users (
    user_id     BIGINT NOT NULL,
    gender      VARCHAR,
    age         INTEGER,
    occupation  VARCHAR,
    zip         VARCHAR,
    source      VARCHAR NOT NULL
);

CREATE TABLE ingest_log (
    ingest_id    VARCHAR NOT NULL,   -- one id per `batchrec ingest` call
    file         VARCHAR NOT NULL,
    kind         VARCHAR NOT NULL,   -- ratings / items / tags / users
    format       VARCHAR NOT NULL,   -- ml-100k, ml-1m, ml-10m, ml-csv, generic
    checksum     VARCHAR NOT NULL,   -- sha256 of the file's bytes
    rows_read    BIGINT NOT NULL,
    rows_loaded  BIGINT NOT NULL,    -- new or changed rows
    rows_rejected BIGINT NOT NULL,
    started_at   TIMESTAMP NOT NULL,
    finished_at  TIMESTAMP NOT NULL
);

CREATE TABLE quarantine (
    ingest_id  VARCHAR NOT NULL,
    file       VARCHAR NOT NULL,
    line       BIGINT NOT NULL,      -- 1-based line number in the file
    reason     VARCHAR NOT NULL,
    raw        VARCHAR,
    quarantined_at TIMESTAMP NOT NULL
);

-- Feature store, written by `batchrec features`; every row carries its snapshot_id -----------
CREATE TABLE feature_snapshots (
    snapshot_id  VARCHAR PRIMARY KEY,
    as_of        TIMESTAMP NOT NULL,   -- nothing at or after as_of is in the snapshot
    created_at   TIMESTAMP NOT NULL,
    params       JSON NOT NULL,
    row_counts   JSON NOT NULL
);

CREATE TABLE user_index (snapshot_id VARCHAR NOT NULL, user_id BIGINT NOT NULL, user_idx INTEGER NOT NULL);
CREATE TABLE item_index (snapshot_id VARCHAR NOT NULL, item_id BIGINT NOT NULL, item_idx INTEGER NOT NULL);

-- Every interaction of the snapshot in dense ids: what `train` fits on without a protocol.
CREATE TABLE interactions (
    snapshot_id VARCHAR NOT NULL,
    user_idx    INTEGER NOT NULL,
    item_idx    INTEGER NOT NULL,
    rating      FLOAT,
    ts          TIMESTAMP NOT NULL
);

CREATE TABLE user_features (
    snapshot_id  VARCHAR NOT NULL,
    user_id      BIGINT NOT NULL,
    user_idx     INTEGER NOT NULL,
    n_ratings    BIGINT NOT NULL,
    mean_rating  DOUBLE,
    std_rating   DOUBLE,
    first_ts     TIMESTAMP,
    last_ts      TIMESTAMP,
    days_active  DOUBLE,
    share_high   DOUBLE,            -- share of ratings >= 4
    n_tags       BIGINT NOT NULL
);

CREATE TABLE item_features (
    snapshot_id  VARCHAR NOT NULL,
    item_id      BIGINT NOT NULL,
    item_idx     INTEGER NOT NULL,
    n_ratings    BIGINT NOT NULL,
    mean_rating  DOUBLE,
    std_rating   DOUBLE,
    bayes_rating DOUBLE,            -- (C*m + sum) / (C + n), C and m from the snapshot
    pop_rank     INTEGER NOT NULL,  -- 1 = most rated
    first_ts     TIMESTAMP,
    last_ts      TIMESTAMP,
    year         INTEGER
);

CREATE TABLE item_genres (snapshot_id VARCHAR NOT NULL, item_idx INTEGER NOT NULL, genre VARCHAR NOT NULL);

CREATE TABLE item_tag_tfidf (
    snapshot_id VARCHAR NOT NULL,
    item_idx    INTEGER NOT NULL,
    term        VARCHAR NOT NULL,
    weight      DOUBLE NOT NULL     -- L2-normalised per item
);

-- Held-out rows per protocol. Rows of `interactions` absent here are that protocol's train part
-- (storing only valid/test rows keeps six protocols at 20M+ interactions cheap); the `splits`
-- view gives the full (protocol, part) labelling of the contract.
CREATE TABLE split_holdout (
    snapshot_id VARCHAR NOT NULL,
    protocol    VARCHAR NOT NULL,
    user_idx    INTEGER NOT NULL,
    item_idx    INTEGER NOT NULL,
    rating      FLOAT,
    ts          TIMESTAMP NOT NULL,
    part        VARCHAR NOT NULL    -- 'valid' or 'test'
);

CREATE TABLE split_protocols (
    snapshot_id VARCHAR NOT NULL,
    protocol    VARCHAR NOT NULL,
    params      JSON NOT NULL,      -- fractions, seed, cutoffs ...
    n_train     BIGINT NOT NULL,
    n_valid     BIGINT NOT NULL,
    n_test      BIGINT NOT NULL
);

CREATE VIEW splits AS
SELECT p.snapshot_id, p.protocol, i.user_idx, i.item_idx, i.rating, i.ts,
       coalesce(h.part, 'train') AS part
FROM split_protocols p
JOIN interactions i USING (snapshot_id)
LEFT JOIN split_holdout h
  ON h.snapshot_id = p.snapshot_id AND h.protocol = p.protocol
 AND h.user_idx = i.user_idx AND h.item_idx = i.item_idx;

-- Models, written by `batchrec train` -------------------------------------------------------
CREATE TABLE model_runs (
    run_id        VARCHAR PRIMARY KEY,
    model         VARCHAR NOT NULL,
    params        JSON NOT NULL,
    snapshot_id   VARCHAR NOT NULL,
    protocol      VARCHAR,            -- NULL: fitted on every interaction of the snapshot
    metrics       JSON NOT NULL,      -- validation metrics, training curve
    artifact_path VARCHAR NOT NULL,
    device        VARCHAR NOT NULL,
    fit_seconds   DOUBLE NOT NULL,
    created_at    TIMESTAMP NOT NULL
);

-- Scoring, written by `batchrec score` ------------------------------------------------------
CREATE TABLE recommendations (
    user_id    BIGINT NOT NULL,
    rank       INTEGER NOT NULL,
    item_id    BIGINT NOT NULL,
    score      FLOAT,
    run_id     VARCHAR NOT NULL,
    scored_at  TIMESTAMP NOT NULL,
    reason     VARCHAR NOT NULL
);

CREATE TABLE recommendation_history (
    user_id    BIGINT NOT NULL,
    rank       INTEGER NOT NULL,
    item_id    BIGINT NOT NULL,
    score      FLOAT,
    run_id     VARCHAR NOT NULL,
    scored_at  TIMESTAMP NOT NULL,
    reason     VARCHAR NOT NULL,
    run_date   DATE NOT NULL
);

CREATE VIEW recommendations_with_titles AS
SELECT r.user_id, r.rank, r.item_id, i.title, i.year, i.genres, r.score, r.reason, r.run_id, r.scored_at
FROM recommendations r LEFT JOIN items i USING (item_id);

-- Evaluation and jobs -----------------------------------------------------------------------
CREATE TABLE evaluations (
    run_id       VARCHAR NOT NULL,
    protocol     VARCHAR NOT NULL,
    metric       VARCHAR NOT NULL,
    k            INTEGER,            -- NULL for metrics without a cut-off (RMSE, MAE, MRR)
    value        DOUBLE,
    evaluated_at TIMESTAMP NOT NULL
);

CREATE TABLE job_runs (
    job_run_id VARCHAR NOT NULL,
    job        VARCHAR NOT NULL,
    step       VARCHAR NOT NULL,
    started    TIMESTAMP NOT NULL,
    finished   TIMESTAMP,
    status     VARCHAR NOT NULL,     -- running / ok / failed / skipped
    rows       BIGINT,
    inputs     VARCHAR,              -- fingerprint of the step's inputs, for resume
    error      VARCHAR
);
