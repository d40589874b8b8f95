-- Snapshot $s's raw item ids in dense-id order (row i is item_idx i).
SELECT item_id AS id FROM item_index WHERE snapshot_id = $s ORDER BY item_idx
