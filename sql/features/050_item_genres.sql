-- Item x genre from the catalogue; the genre vocabulary of the snapshot is
-- SELECT DISTINCT genre FROM item_genres WHERE snapshot_id = ...
INSERT INTO item_genres
SELECT DISTINCT $snapshot_id, i.item_idx, g.genre
FROM snap_item_index i
JOIN (SELECT item_id, unnest(genres) AS genre FROM items) g USING (item_id)
WHERE g.genre IS NOT NULL AND g.genre <> '';
