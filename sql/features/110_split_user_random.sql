-- user_random: per user, a seeded random order of their n interactions (shuffle_key: a hash of
-- (user_idx, item_idx), ties by item_idx); the first floor(test_frac*n) are test (at least 1 when
-- n >= 2 and test_frac > 0), the next floor(valid_frac*n) valid, capped so every user keeps a
-- train row. Each user's sorted key list gives the boundary keys (cheaper than a window).
INSERT INTO split_holdout
WITH shuffled AS (
    SELECT user_idx, count(*) AS n, list_sort(list(shuffle_key(user_idx, item_idx, $seed))) AS keys
    FROM snap_interactions GROUP BY user_idx
), sized AS (
    SELECT *, CASE WHEN n >= 2 AND $test_frac > 0 THEN greatest(1, floor($test_frac * n)) ELSE 0 END::BIGINT AS n_test
    FROM shuffled
), bounds AS (
    -- last key of the test part and of the held-out rows (NULL: empty part)
    SELECT user_idx,
           CASE WHEN n_test > 0 THEN keys[n_test] END AS test_to,
           keys[n_test + least(floor($valid_frac * n), n - 1 - n_test)::BIGINT] AS holdout_to
    FROM sized
)
SELECT $snapshot_id, 'user_random', user_idx, item_idx, rating, ts,
       CASE WHEN shuffle_key(user_idx, item_idx, $seed) <= test_to THEN 'test' ELSE 'valid' END
FROM snap_interactions JOIN bounds USING (user_idx)
WHERE shuffle_key(user_idx, item_idx, $seed) <= holdout_to;
