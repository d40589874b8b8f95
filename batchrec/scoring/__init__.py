"""Nightly scoring: every user's top-N into `recommendations`, blocked, explained, atomic, shardable.

`batchrec score` (`command.score_command`) runs in three steps:

1. Read (one short read-only session; `inputs.load_inputs`): the run, its model artifact, and
   from the run's snapshot the users, items, seen items and content features. Users in the raw
   tables but not in the snapshot are appended as cold rows.
2. Score in user blocks sized by `--memory-budget` (`batchrec.ranking.blocked_topk`): one matmul
   per block for factor models (`model.score` for the rest) against the items the model knows,
   seen items set to -inf, a top-k per row (`batchrec.topk`), and the "because you rated <title>"
   anchor found in the same pass (`explain.explain_anchors`). Users the model cannot serve get a
   genre/tag profile ranking, or popularity when nothing is known about them (`sources`). No
   per-row Python anywhere.
3. Publish (`publishing.publish`): the new rows wait in memory (an Arrow table; shards: their
   Parquet files) while one transaction moves the current `recommendations` to
   `recommendation_history`, expires old history and inserts the new run. The DuckDB file is not
   held while scoring, so readers see the old run until the commit and the new one after; a crash
   or kill -9 before the commit leaves the old run in place.

`--shard i/N` scores a fixed hash partition of users to a Parquet file (no lock, read-only
warehouse) and `--publish RUN` swaps in the union of a run's N shards the same way; both are
thin wrappers of the public API in `shards` (`score_shard`, `publish_shards`, and
`score_sharded`: every shard as a task on an executor, local or Ray, then one publish); shard
files live under any `batchrec.storage` location (a path, file://, s3://). `--pairs`
scores given (user, item) pairs (`pairs`). `batchrec.ranking.topn` is the blocked core that
evaluation shares, so what is measured is what ships.
"""

from batchrec.scoring.command import score_command
from batchrec.scoring.explain import explain_anchors, explanation_similarity
from batchrec.scoring.inputs import ScoringInputs, load_inputs
from batchrec.scoring.pairs import read_users, score_pairs
from batchrec.scoring.publishing import check_lists, list_sanity, mix64, publish, shard_of, write_parquet
from batchrec.scoring.run import (
    load_model,
    parse_memory_budget,
    parse_shard,
    resolve_shipped,
    score_and_publish,
    score_run,
)
from batchrec.scoring.shards import (
    PublishResult,
    ShardResult,
    find_shards,
    publish_shards,
    score_shard,
    score_sharded,
    shard_location,
    shards_root,
)
from batchrec.scoring.sources import recommend, serve_model, serve_popular, serve_profile

__all__ = [
    "PublishResult",
    "ScoringInputs",
    "ShardResult",
    "check_lists",
    "explain_anchors",
    "explanation_similarity",
    "find_shards",
    "list_sanity",
    "load_inputs",
    "load_model",
    "mix64",
    "parse_memory_budget",
    "parse_shard",
    "publish",
    "publish_shards",
    "read_users",
    "recommend",
    "resolve_shipped",
    "score_and_publish",
    "score_command",
    "score_pairs",
    "score_run",
    "score_shard",
    "score_sharded",
    "serve_model",
    "serve_popular",
    "serve_profile",
    "shard_location",
    "shard_of",
    "shards_root",
    "write_parquet",
]
