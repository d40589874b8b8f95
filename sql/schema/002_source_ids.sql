-- Raw tables name the file each row came from by a small integer id into `sources`, instead of
-- repeating the file name in every row: writing that VARCHAR cost about a third of the CPU of a
-- 20M-rating ingest. `<table>_with_source` views give the rows with the file name, as before.

CREATE TABLE sources (
    source_id  INTEGER PRIMARY KEY,      -- 1, 2, ... in order of first ingest
    file       VARCHAR NOT NULL UNIQUE   -- the file as ingest_log.file and quarantine.file name it
);

-- Every file ingested so far (ingest_log) or named by a row, numbered by first ingest.
INSERT INTO sources
SELECT row_number() OVER (ORDER BY min(first_ingested) NULLS LAST, file)::INTEGER, file
FROM (
    SELECT file, started_at AS first_ingested FROM ingest_log
    UNION ALL SELECT DISTINCT source, NULL FROM ratings
    UNION ALL SELECT DISTINCT source, NULL FROM items
    UNION ALL SELECT DISTINCT source, NULL FROM tags
    UNION ALL SELECT DISTINCT source, NULL FROM users
)
GROUP BY file;

-- Each raw table is rebuilt with source_id in place of source (DuckDB cannot make a column
-- added to a filled table NOT NULL within one transaction).
CREATE TABLE ratings_002 (
    user_id    BIGINT NOT NULL,
    item_id    BIGINT NOT NULL,
    rating     FLOAT,                -- NULL for implicit interactions
    ts         TIMESTAMP NOT NULL,
    source_id  INTEGER NOT NULL      -- sources.source_id of the file the row came from
);
INSERT INTO ratings_002
SELECT r.user_id, r.item_id, r.rating, r.ts, s.source_id FROM ratings r JOIN sources s ON s.file = r.source;
DROP TABLE ratings;
ALTER TABLE ratings_002 RENAME TO ratings;

CREATE TABLE items_002 (
    item_id    BIGINT NOT NULL,
    title      VARCHAR,
    year       INTEGER,
    genres     VARCHAR[] NOT NULL,   -- "(no genres listed)" is the empty list
    source_id  INTEGER NOT NULL
);
INSERT INTO items_002
SELECT i.item_id, i.title, i.year, i.genres, s.source_id FROM items i JOIN sources s ON s.file = i.source;
DROP TABLE items;
ALTER TABLE items_002 RENAME TO items;

CREATE TABLE tags_002 (
    user_id    BIGINT NOT NULL,
    item_id    BIGINT NOT NULL,
    tag        VARCHAR NOT NULL,
    ts         TIMESTAMP NOT NULL,
    source_id  INTEGER NOT NULL
);
INSERT INTO tags_002
SELECT t.user_id, t.item_id, t.tag, t.ts, s.source_id FROM tags t JOIN sources s ON s.file = t.source;
DROP TABLE tags;
ALTER TABLE tags_002 RENAME TO tags;

CREATE TABLE users_002 (
    user_id     BIGINT NOT NULL,
    gender      VARCHAR,
    age         INTEGER,
    occupation  VARCHAR,
    zip         VARCHAR,
    source_id   INTEGER NOT NULL
);
INSERT INTO users_002
SELECT u.user_id, u.gender, u.age, u.occupation, u.zip, s.source_id FROM users u JOIN sources s ON s.file = u.source;
DROP TABLE users;
ALTER TABLE users_002 RENAME TO users;

-- The rows with the name of their file, for analysts: e.g.
--   SELECT source, count(*) FROM ratings_with_source GROUP BY source;
-- (ingest_log and quarantine join on file = source for checksums, times and rejected lines).
CREATE VIEW ratings_with_source AS
SELECT r.user_id, r.item_id, r.rating, r.ts, r.source_id, s.file AS source
FROM ratings r LEFT JOIN sources s USING (source_id);

CREATE VIEW items_with_source AS
SELECT i.item_id, i.title, i.year, i.genres, i.source_id, s.file AS source
FROM items i LEFT JOIN sources s USING (source_id);

CREATE VIEW tags_with_source AS
SELECT t.user_id, t.item_id, t.tag, t.ts, t.source_id, s.file AS source
FROM tags t LEFT JOIN sources s USING (source_id);

CREATE VIEW users_with_source AS
SELECT u.user_id, u.gender, u.age, u.occupation, u.zip, u.source_id, s.file AS source
FROM users u LEFT JOIN sources s USING (source_id);
