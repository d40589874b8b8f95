-- The rating range of snapshot $s (NULLs when implicit): rating models clip their predictions to it.
SELECT min(rating) AS low, max(rating) AS high FROM interactions WHERE snapshot_id = $s
