-- user_temporal: each user's n interactions in time order (ts, then item_idx); the last
-- max(1, floor(test_frac*n)) are test, the max(1, floor(valid_frac*n)) before them valid, the
-- rest train. A zero fraction gives an empty part; short histories fill test first.
-- Each user's sorted key list gives the boundary keys (cheaper than a window).
INSERT INTO split_holdout
WITH histories AS (
    SELECT user_idx, count(*) AS n, list_sort(list(time_key(ts, item_idx))) AS keys
    FROM snap_interactions GROUP BY user_idx
), sized AS (
    SELECT *,
           CASE WHEN $test_frac > 0 THEN greatest(1, floor($test_frac * n)) ELSE 0 END::BIGINT AS n_test,
           CASE WHEN $valid_frac > 0 THEN greatest(1, floor($valid_frac * n)) ELSE 0 END::BIGINT AS n_valid
    FROM histories
), bounds AS (
    -- first key of the test part and of the held-out rows (NULL: empty part)
    SELECT user_idx,
           CASE WHEN n_test > 0 THEN keys[greatest(n - n_test + 1, 1)] END AS test_from,
           keys[greatest(n - n_test - n_valid + 1, 1)] AS holdout_from
    FROM sized WHERE n_test + n_valid > 0
)
SELECT $snapshot_id, 'user_temporal', user_idx, item_idx, rating, ts,
       CASE WHEN time_key(ts, item_idx) >= test_from THEN 'test' ELSE 'valid' END
FROM snap_interactions JOIN bounds USING (user_idx)
WHERE time_key(ts, item_idx) >= holdout_from;
