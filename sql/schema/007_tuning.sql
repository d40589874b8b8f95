-- `batchrec tune` (batchrec/tune.py): one row per finished trial of a study, written in its own
-- transaction as the trial ends (a killed tune keeps every finished trial and resumes from them),
-- and one row per finished study: the family's tuned setting, which `batchrec train --tuned` and a
-- job's `params = "tuned"` read (the newest row of the family).
CREATE TABLE tuning_trials (
    study        VARCHAR NOT NULL,   -- family:protocol:metric:snapshot:space digest (see tune.study_name)
    trial        INTEGER NOT NULL,   -- 0 is the family's defaults
    family       VARCHAR NOT NULL,
    protocol     VARCHAR NOT NULL,
    metric       VARCHAR NOT NULL,   -- measured on the protocol's valid part, never its test part
    snapshot_id  VARCHAR NOT NULL,
    params       JSON NOT NULL,      -- the searched parameters of this trial (and any fixed ones)
    value        DOUBLE,             -- the metric (pruned: its last per-epoch value; failed: NULL)
    state        VARCHAR NOT NULL,   -- complete / pruned / failed
    intermediate JSON,               -- the per-epoch validation values the pruner saw, [[step, value], ...]
    error        VARCHAR,            -- why a failed trial failed (e.g. training diverged)
    seconds      DOUBLE NOT NULL,
    finished_at  TIMESTAMP NOT NULL,
    PRIMARY KEY (study, trial)
);

CREATE TABLE tuned_params (
    family        VARCHAR NOT NULL,
    tuned_at      TIMESTAMP NOT NULL,
    study         VARCHAR NOT NULL,
    protocol      VARCHAR NOT NULL,
    metric        VARCHAR NOT NULL,
    snapshot_id   VARCHAR NOT NULL,
    params        JSON NOT NULL,     -- the best trial's parameters; the others stay at their defaults
    value         DOUBLE NOT NULL,   -- its validation value
    default_value DOUBLE,            -- the defaults' validation value in the same study (trial 0)
    trials        INTEGER NOT NULL,  -- finished trials of the study
    PRIMARY KEY (family, tuned_at)
);
