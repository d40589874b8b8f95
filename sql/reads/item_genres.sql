-- Snapshot $s's genre multi-hot as (item_idx, term, weight) triples.
SELECT item_idx, genre AS term, 1.0 AS weight FROM item_genres WHERE snapshot_id = $s
