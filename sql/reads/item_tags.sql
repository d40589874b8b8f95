-- Snapshot $s's TF-IDF tag vectors as (item_idx, term, weight) triples.
SELECT item_idx, term, weight FROM item_tag_tfidf WHERE snapshot_id = $s
