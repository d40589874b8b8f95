-- The snapshot's scope: only ratings and tags strictly before $as_of are ever read, so nothing
-- dated at or after as_of can reach an index, a statistic, a TF-IDF weight or a split.
-- Temp tables live for the build only; the files after this one read them.

-- Users: everyone with at least one rating before as_of; dense ids by raw id.
CREATE OR REPLACE TEMP TABLE snap_user_index AS
SELECT user_id, (row_number() OVER (ORDER BY user_id) - 1)::INTEGER AS user_idx
FROM (SELECT DISTINCT user_id FROM ratings WHERE ts < $as_of);

-- Items: rated before as_of, plus every catalogue item (content-only items can still be scored
-- from their metadata; the catalogue has no timestamps, so it is taken as it is).
CREATE OR REPLACE TEMP TABLE snap_item_index AS
SELECT item_id, (row_number() OVER (ORDER BY item_id) - 1)::INTEGER AS item_idx
FROM (SELECT item_id FROM ratings WHERE ts < $as_of UNION SELECT item_id FROM items);

CREATE OR REPLACE TEMP TABLE snap_interactions AS
SELECT u.user_idx, i.item_idx, r.rating, r.ts
FROM ratings r
JOIN snap_user_index u USING (user_id)
JOIN snap_item_index i USING (item_id)
WHERE r.ts < $as_of;

-- Tag applications on indexed items (tags on items outside the index are ignored).
CREATE OR REPLACE TEMP TABLE snap_tags AS
SELECT t.user_id, i.item_idx, t.tag
FROM tags t JOIN snap_item_index i USING (item_id)
WHERE t.ts < $as_of;
