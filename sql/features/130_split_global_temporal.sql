-- global_temporal: one time cut for everybody (train is the past, test the future). splits.py
-- resolves $test_from = the timestamp of the floor(test_frac*N)-th latest interaction, and
-- $valid_from = that of the floor(valid_frac*N)-th latest interaction before $test_from (both
-- NULL for a zero fraction). Test: ts >= test_from; valid: valid_from <= ts < test_from.
-- Interactions sharing a timestamp always land in the same part.
INSERT INTO split_holdout
SELECT $snapshot_id, 'global_temporal', user_idx, item_idx, rating, ts,
       CASE WHEN ts >= $test_from THEN 'test' ELSE 'valid' END
FROM snap_interactions
WHERE ts >= $test_from OR ts >= $valid_from;
