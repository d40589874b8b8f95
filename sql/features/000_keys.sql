-- Sort keys for the build, as single HUGEINTs (list sorts and comparisons on a HUGEINT are much
-- cheaper than on a STRUCT). item_idx (0 <= item_idx < 2^32) fills the low 32 bits, so
--   time_key    orders interactions by (ts, item_idx),
--   shuffle_key orders them by (a seeded hash of (user_idx, item_idx), item_idx).
CREATE OR REPLACE TEMP MACRO time_key(ts, item_idx) AS epoch_us(ts)::HUGEINT * 4294967296 + item_idx;

CREATE OR REPLACE TEMP MACRO shuffle_key(user_idx, item_idx, seed) AS
    hash(user_idx, item_idx, seed)::HUGEINT * 4294967296 + item_idx;
