-- Model artifacts are located relative to the warehouse (see batchrec/runs.py), so a warehouse
-- moved, copied or mounted elsewhere together with its folder still loads its models. Runs
-- recorded before stored absolute paths: those under this warehouse's own folder become relative
-- to it (e.g. 'artifacts/<run_id>'); any other location stays absolute and keeps working there.
-- New runs are written to '<warehouse stem>.artifacts/<run_id>'.
UPDATE model_runs
SET artifact_path = substr(artifact_path, length(w.folder) + 2)
FROM (SELECT parse_dirpath(path) AS folder FROM duckdb_databases() WHERE database_name = current_database()) w
WHERE starts_with(artifact_path, w.folder || '/');
