-- Snapshot $s's raw user ids in dense-id order (row i is user_idx i).
SELECT user_id AS id FROM user_index WHERE snapshot_id = $s ORDER BY user_idx
