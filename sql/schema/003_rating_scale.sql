-- The warehouse's rating scale: what the ratings of generic files are checked against when
-- `batchrec ingest` is not given --rating-scale. The first ingest that loads explicit ratings
-- sets it (a MovieLens release's published scale, or that generic load's scale); one row.

CREATE TABLE rating_scale (
    low     DOUBLE NOT NULL,
    high    DOUBLE NOT NULL,
    step    DOUBLE,                -- steps from low; NULL: any value in low..high
    set_by  VARCHAR NOT NULL,      -- the ingest_id that set it, or 'migration 003'
    set_at  TIMESTAMP NOT NULL
);

-- A warehouse filled before this migration: the range of its ratings, in whole or half stars
-- when they all are (every MovieLens release is one of the two).
INSERT INTO rating_scale
SELECT min(rating), max(rating),
       CASE WHEN bool_and(rating = round(rating)) THEN 1
            WHEN bool_and(rating * 2 = round(rating * 2)) THEN 0.5 END,
       'migration 003', now() AT TIME ZONE 'UTC'
FROM ratings
HAVING count(rating) > 0 AND min(rating) < max(rating);
