-- One row per full publish of a run's lists and per attempt the publish gate refused
-- (batchrec/gate.py): what was (or would have been) published, how it differs from the lists it
-- replaces, and the gate's numbers. Written in the publish's own transaction.
CREATE TABLE publish_log (
    logged_at       TIMESTAMP NOT NULL,
    run_id          VARCHAR NOT NULL,   -- the candidate run
    model           VARCHAR NOT NULL,   -- its family
    status          VARCHAR NOT NULL,   -- published / gated / forced (published past a failed check)
    users           BIGINT NOT NULL,    -- users with a list
    rows            BIGINT NOT NULL,
    items           BIGINT NOT NULL,    -- distinct items across the lists
    coverage        DOUBLE,             -- items / items in the run's snapshot
    new_item_share  DOUBLE,             -- share of `items` never recommended before
    overlap         DOUBLE,             -- mean Jaccard of each user's list with their previous one
    overlap_users   BIGINT NOT NULL,    -- users in both (the mean's count)
    top_n           INTEGER,            -- longest list: overlap is overlap@top_n
    live_run_id     VARCHAR,            -- the run that was live before (most rows in recommendations)
    gate_metric     VARCHAR,            -- e.g. ndcg@10, rmse
    gate_protocol   VARCHAR,
    candidate_value DOUBLE,             -- the candidate family's measurement on its snapshot
    live_value      DOUBLE,             -- the live run's measurement when it was published
    tolerance       DOUBLE,             -- relative
    reason          VARCHAR,            -- the failed checks (gated, forced) or a note
    seconds         DOUBLE NOT NULL     -- scoring, checks and publish
);
