-- as_of: train on everything before a cutoff, test on what came after (what the nightly job
-- does). $test_from is the parameter as_of.cutoff or, by default, the timestamp of the
-- floor(0.1*N)-th latest interaction; $valid_from that of the floor(valid_frac*N)-th latest
-- interaction before the cutoff (NULL: no valid part). Both are resolved by splits.py and
-- recorded in split_protocols.params. Test: ts >= test_from; valid: valid_from <= ts < test_from.
INSERT INTO split_holdout
SELECT $snapshot_id, 'as_of', user_idx, item_idx, rating, ts,
       CASE WHEN ts >= $test_from THEN 'test' ELSE 'valid' END
FROM snap_interactions
WHERE ts >= $test_from OR ts >= $valid_from;
