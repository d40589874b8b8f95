-- leave_last_n_positive: each user's interactions in time order (ts, then item_idx); a positive
-- is rating >= $positive_threshold (an implicit interaction, rating NULL, counts as positive).
-- Test: every interaction from the $n_last-th last positive on. Valid: from the
-- ($n_last + $n_valid)-th last positive up to the test part. Users with fewer than $n_last
-- positives stay wholly in train; those with fewer than $n_last + $n_valid get no valid rows.
INSERT INTO split_holdout
WITH last_positives AS (
    -- each user's last $n_last + $n_valid positives, latest first (a top-n aggregate, no sort)
    SELECT user_idx, max(time_key(ts, item_idx), $n_last + $n_valid) AS keys
    FROM snap_interactions
    WHERE rating IS NULL OR rating >= $positive_threshold
    GROUP BY user_idx
), bounds AS (
    SELECT user_idx,
           keys[$n_last] AS test_from,
           keys[CASE WHEN len(keys) >= $n_last + $n_valid THEN $n_last + $n_valid ELSE $n_last END] AS holdout_from
    FROM last_positives
    WHERE len(keys) >= $n_last
)
SELECT $snapshot_id, 'leave_last_n_positive', user_idx, item_idx, rating, ts,
       CASE WHEN time_key(ts, item_idx) >= test_from THEN 'test' ELSE 'valid' END
FROM snap_interactions JOIN bounds USING (user_idx)
WHERE time_key(ts, item_idx) >= holdout_from;
