-- A family's measurement on a snapshot (batchrec/gate.py): the latest evaluation of a run of
-- $model fitted on $snapshot, on protocol $protocol, of metric $metric at cut-off $k (NULL for
-- none). A run with the candidate's own parameters is preferred over the family's
-- defaults that `evaluate` fits ($run: the candidate). One row (value, run_id) or none.
SELECT e.value, e.run_id
FROM evaluations e JOIN model_runs r USING (run_id)
WHERE r.model = $model AND r.snapshot_id = $snapshot AND e.protocol = $protocol
  AND e.metric = $metric AND e.k IS NOT DISTINCT FROM $k AND isfinite(e.value)
ORDER BY (r.params::VARCHAR = (SELECT params::VARCHAR FROM model_runs WHERE run_id = $run)) DESC, e.evaluated_at DESC, e.run_id DESC
LIMIT 1
