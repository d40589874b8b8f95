-- The figures of one publish (batchrec/gate.py): the staged lists `publish_rows` (recommendations
-- layout) against what is live in `recommendations` and what was ever recommended. One row.
-- $snapshot: the candidate run's snapshot, whose item_index is the catalogue.
WITH staged AS (SELECT user_id, item_id, score FROM publish_rows),
lists AS (SELECT user_id, count(*) AS n FROM staged GROUP BY user_id),
live_lists AS (SELECT user_id, count(*) AS n FROM recommendations GROUP BY user_id),
shared AS (
    SELECT s.user_id, count(*) AS n
    FROM staged s JOIN recommendations r ON r.user_id = s.user_id AND r.item_id = s.item_id
    GROUP BY s.user_id),
jaccard AS (
    SELECT coalesce(sh.n, 0) / (a.n + b.n - coalesce(sh.n, 0)) AS j
    FROM lists a JOIN live_lists b USING (user_id) LEFT JOIN shared sh USING (user_id)),
staged_items AS (SELECT DISTINCT item_id FROM staged),
ever AS (SELECT item_id FROM recommendations UNION SELECT item_id FROM recommendation_history)
SELECT
    (SELECT count(*) FROM lists) AS users,
    (SELECT count(*) FROM staged) AS rows,
    (SELECT count(*) FROM staged_items) AS items,
    (SELECT count(*) FROM staged_items) / nullif((SELECT count(*) FROM item_index WHERE snapshot_id = $snapshot), 0)
        AS coverage,
    (SELECT count(*) FROM staged_items ANTI JOIN ever USING (item_id))
        / nullif((SELECT count(*) FROM staged_items), 0) AS new_item_share,
    (SELECT avg(j) FROM jaccard) AS overlap,
    (SELECT count(*) FROM jaccard) AS overlap_users,
    (SELECT max(n) FROM lists) AS top_n,
    (SELECT count(*) FROM staged WHERE score IS NULL OR NOT isfinite(score)) AS nonfinite,
    (SELECT count(DISTINCT item_id) FROM recommendations) AS live_items,
    (SELECT run_id FROM recommendations GROUP BY run_id ORDER BY count(*) DESC, run_id LIMIT 1) AS live_run_id
