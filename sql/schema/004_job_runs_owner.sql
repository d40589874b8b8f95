-- The process that runs a job step, so a step left `running` by a killed job can be told from one
-- still running: a later `batchrec run` marks it failed once that process is gone, and
-- `batchrec status` shows it as killed.
ALTER TABLE job_runs ADD COLUMN pid INTEGER;            -- the `batchrec run` process
ALTER TABLE job_runs ADD COLUMN host VARCHAR;           -- the machine it runs on
ALTER TABLE job_runs ADD COLUMN process_start VARCHAR;  -- that process's start time (tells a reused pid apart)
