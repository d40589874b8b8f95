-- Per-user statistics. Mean and sample std come from sum and sum of squares (not a streaming
-- std): with star ratings these sums are exact in doubles, so the result does not depend on how
-- DuckDB splits the aggregate across threads and rebuilds are bit-for-bit identical.
INSERT INTO user_features
WITH stats AS (
    SELECT user_idx,
           count(*) AS n,
           count(rating) AS n_rated,
           sum(rating::DOUBLE) AS s,
           sum(rating::DOUBLE * rating::DOUBLE) AS s2,
           count(*) FILTER (WHERE rating >= 4) AS n_high,
           min(ts) AS first_ts,
           max(ts) AS last_ts
    FROM snap_interactions
    GROUP BY user_idx
), tag_counts AS (
    SELECT user_id, count(*) AS n_tags FROM snap_tags GROUP BY user_id
)
SELECT $snapshot_id, u.user_id, u.user_idx, s.n,
       s.s / s.n_rated,
       CASE WHEN s.n_rated >= 2 THEN sqrt(greatest(s.s2 - s.s * s.s / s.n_rated, 0) / (s.n_rated - 1)) END,
       s.first_ts, s.last_ts,
       (epoch_us(s.last_ts) - epoch_us(s.first_ts)) / 86400e6,
       s.n_high / nullif(s.n_rated, 0),
       coalesce(t.n_tags, 0)
FROM snap_user_index u
JOIN stats s USING (user_idx)
LEFT JOIN tag_counts t USING (user_id);
