-- Every interaction of snapshot $s in the snapshot's (user, time, item) order, and whether the
-- user liked it: rated at or above their own mean rating, or implicit (no rating, or a user
-- with no ratings). "Liked" items are the anchors of the "because you rated" reasons; the
-- 1e-6 slack keeps a rating equal to the mean liked whatever the float rounding of the mean.
SELECT i.user_idx, i.item_idx,
       i.rating IS NULL OR u.mean_rating IS NULL OR i.rating >= u.mean_rating - 1e-6 AS liked
FROM interactions i
LEFT JOIN user_features u ON u.snapshot_id = i.snapshot_id AND u.user_idx = i.user_idx
WHERE i.snapshot_id = $s
ORDER BY i.user_idx, i.ts, i.item_idx
