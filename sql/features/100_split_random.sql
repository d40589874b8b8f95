-- random: a global random holdout. Each interaction draws u in [0, 1) from a seeded hash of
-- (user_idx, item_idx): u < test_frac -> test, u < test_frac + valid_frac -> valid, else train.
-- Part sizes are therefore binomial around the fractions (no global sort is needed).
INSERT INTO split_holdout
SELECT $snapshot_id, 'random', user_idx, item_idx, rating, ts,
       CASE WHEN u < $test_frac THEN 'test' ELSE 'valid' END
FROM (SELECT *, hash(user_idx, item_idx, $seed) / 18446744073709551616.0 AS u FROM snap_interactions)
WHERE u < $test_frac + $valid_frac;
