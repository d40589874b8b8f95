-- Dense id maps and every interaction of the snapshot in dense ids (what `train` fits on when
-- no protocol is given).
INSERT INTO user_index SELECT $snapshot_id, user_id, user_idx FROM snap_user_index;

INSERT INTO item_index SELECT $snapshot_id, item_id, item_idx FROM snap_item_index;

-- Stored in (user, time) order: readers build per-user structures (seen items, histories) from
-- it without re-sorting, and it compresses better.
INSERT INTO interactions SELECT $snapshot_id, user_idx, item_idx, rating, ts FROM snap_interactions
ORDER BY user_idx, ts, item_idx;
