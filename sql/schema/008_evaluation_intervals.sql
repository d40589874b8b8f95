-- How sure each evaluation figure is (batchrec/uncertainty.py): the 95% percentile bootstrap
-- interval over users (resampling users with replacement; NULL for counts and for figures that are
-- not averages over users, e.g. coverage), and the two-sided paired bootstrap p-value of the run
-- against the best run of the same evaluation on that metric (same users, same resamples; NULL
-- for the best run itself and for metrics without a direction). Rows written before have NULLs.
ALTER TABLE evaluations ADD COLUMN ci_low DOUBLE;
ALTER TABLE evaluations ADD COLUMN ci_high DOUBLE;
ALTER TABLE evaluations ADD COLUMN p_vs_best DOUBLE;
