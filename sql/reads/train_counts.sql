-- Interactions a run's model was fitted on, per user and per item of snapshot $s: the snapshot's
-- counts (user_features / item_features) minus protocol $p's holdout (valid + test); $p NULL is a
-- run fitted on every interaction. kind is 'user' or 'item'; every indexed user and item has a row.
WITH held AS (
    SELECT user_idx, item_idx FROM split_holdout WHERE snapshot_id = $s AND protocol = $p
), held_users AS (
    SELECT user_idx AS idx, count(*) AS n FROM held GROUP BY 1
), held_items AS (
    SELECT item_idx AS idx, count(*) AS n FROM held GROUP BY 1
)
SELECT 'user' AS kind, f.user_idx AS idx, f.n_ratings - coalesce(h.n, 0) AS n
FROM user_features f LEFT JOIN held_users h ON h.idx = f.user_idx
WHERE f.snapshot_id = $s
UNION ALL
SELECT 'item' AS kind, f.item_idx AS idx, f.n_ratings - coalesce(h.n, 0) AS n
FROM item_features f LEFT JOIN held_items h ON h.idx = f.item_idx
WHERE f.snapshot_id = $s
