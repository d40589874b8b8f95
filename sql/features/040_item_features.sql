-- Per-item statistics for every indexed item (unrated catalogue items get n_ratings 0, the prior
-- as bayes_rating and the last popularity ranks). bayes_rating = (C*m + sum) / (C + n) with m the
-- snapshot's mean rating and C = $bayes_c, by default the mean number of ratings per rated item.
-- Sums instead of streaming aggregates for bit-for-bit reproducibility (see 030).
INSERT INTO item_features
WITH stats AS (
    SELECT item_idx,
           count(*) AS n,
           count(rating) AS n_rated,
           sum(rating::DOUBLE) AS s,
           sum(rating::DOUBLE * rating::DOUBLE) AS s2,
           min(ts) AS first_ts,
           max(ts) AS last_ts
    FROM snap_interactions
    GROUP BY item_idx
), prior AS (
    SELECT sum(s) / sum(n_rated) AS m,
           coalesce(CAST($bayes_c AS DOUBLE), sum(n_rated) / count(*) FILTER (WHERE n_rated > 0)) AS c
    FROM stats
), catalogue AS (
    SELECT item_id, max(year) AS year FROM items GROUP BY item_id
)
SELECT $snapshot_id, i.item_id, i.item_idx,
       coalesce(s.n, 0),
       s.s / nullif(s.n_rated, 0),
       CASE WHEN s.n_rated >= 2 THEN sqrt(greatest(s.s2 - s.s * s.s / s.n_rated, 0) / (s.n_rated - 1)) END,
       (p.c * p.m + coalesce(s.s, 0)) / (p.c + coalesce(s.n_rated, 0)),
       row_number() OVER (ORDER BY coalesce(s.n, 0) DESC, i.item_id)::INTEGER,
       s.first_ts, s.last_ts,
       c.year
FROM snap_item_index i
CROSS JOIN prior p
LEFT JOIN stats s USING (item_idx)
LEFT JOIN catalogue c USING (item_id);
