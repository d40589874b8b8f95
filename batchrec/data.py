"""Feature snapshot -> arrays and tensors for training, scoring and evaluation.

Everything arrives column-wise through Arrow (DuckDB -> numpy, zero-copy where possible); no
per-row Python. Dense ids (user_idx, item_idx) are the snapshot's; raw ids are only needed at the
edges (scorer output, reports) and are kept here as lookup arrays.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass, field, replace

import duckdb
import numpy as np
import scipy.sparse as sp
import torch

from batchrec.errors import BatchrecError
from batchrec.warehouse import SQL_DIR, scalar

READS_DIR = SQL_DIR / "reads"  # what the steps read from a snapshot, one query per file


@dataclass
class Interactions:
    """Parallel arrays of one set of (user, item, rating, time) events in dense ids."""

    user_idx: np.ndarray  # int64
    item_idx: np.ndarray  # int64
    rating: np.ndarray  # float32; NaN for implicit events
    ts: np.ndarray  # int64 seconds since epoch (UTC)

    def __len__(self) -> int:
        return len(self.user_idx)

    @property
    def implicit(self) -> bool:
        return len(self) > 0 and bool(np.isnan(self.rating).all())

    def csr(self, n_users: int, n_items: int, values: str = "rating") -> sp.csr_matrix:
        """User x item matrix of ratings ("rating") or of ones ("ones"), float32."""
        data = np.ones(len(self), np.float32) if values == "ones" else np.nan_to_num(self.rating, nan=1.0)
        m = sp.csr_matrix((data, (self.user_idx, self.item_idx)), shape=(n_users, n_items), dtype=np.float32)
        m.sum_duplicates()
        return m

    def tensors(self, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(user_idx, item_idx, rating) as torch tensors on `device`."""
        return (
            torch.from_numpy(self.user_idx).to(device),
            torch.from_numpy(self.item_idx).to(device),
            torch.from_numpy(self.rating).to(device),
        )

    def concat(self, other: Interactions) -> Interactions:
        return Interactions(
            *(
                np.concatenate([a, b])
                for a, b in zip(
                    (self.user_idx, self.item_idx, self.rating, self.ts),
                    (other.user_idx, other.item_idx, other.rating, other.ts),
                )
            )
        )

    def select(self, mask: np.ndarray) -> Interactions:
        return Interactions(self.user_idx[mask], self.item_idx[mask], self.rating[mask], self.ts[mask])

    @staticmethod
    def from_columns(cols: dict[str, np.ndarray]) -> Interactions:
        rating = cols["rating"]
        if np.ma.isMaskedArray(rating):  # DuckDB returns NULLs as a masked array
            rating = rating.astype(np.float32).filled(np.nan)
        ts = cols["ts"]
        return Interactions(
            user_idx=np.asarray(cols["user_idx"], dtype=np.int64),
            item_idx=np.asarray(cols["item_idx"], dtype=np.int64),
            rating=np.asarray(rating, dtype=np.float32),
            ts=np.asarray(
                ts.astype("datetime64[s]").astype(np.int64) if ts.dtype.kind == "M" else ts, dtype=np.int64
            ),
        )


@dataclass
class SnapshotData:
    """What a model sees: a snapshot's train part (and valid/test when a protocol is chosen),
    plus the item content features and id maps."""

    snapshot_id: str
    protocol: str | None
    n_users: int
    n_items: int
    train: Interactions
    valid: Interactions | None
    test: Interactions | None
    user_ids: np.ndarray  # raw user_id by user_idx
    item_ids: np.ndarray  # raw item_id by item_idx
    rating_scale: tuple[float, float] | None  # None for implicit-only data
    item_genres: sp.csr_matrix = field(repr=False)  # n_items x n_genres, 0/1
    genre_names: list[str] = field(repr=False)
    item_tags: sp.csr_matrix = field(repr=False)  # n_items x n_terms, L2-normalised TF-IDF
    tag_terms: list[str] = field(repr=False)

    def train_csr(self, values: str = "rating") -> sp.csr_matrix:
        return self.train.csr(self.n_users, self.n_items, values)

    def seen_csr(self, include_valid: bool = False) -> sp.csr_matrix:
        """Items each user has interacted with in the input history (ones)."""
        events = self.train.concat(self.valid) if include_valid and self.valid is not None else self.train
        return events.csr(self.n_users, self.n_items, "ones")


def time_order(events: Interactions) -> np.ndarray:
    """Indices that sort the events by user, then time (ts, then item)."""
    return np.lexsort((events.item_idx, events.ts, events.user_idx))


def events_from_end(events: Interactions) -> np.ndarray:
    """For each event, how many of the same user's events come after it (by ts, then item)."""
    order = time_order(events)
    users = events.user_idx[order]
    n = np.bincount(users)
    first = np.concatenate([[0], np.cumsum(n)[:-1]])
    out = np.empty(len(events), np.int64)
    out[order] = (n[users] - 1) - (np.arange(len(events)) - first[users])
    return out


def shifted_back(data: SnapshotData) -> SnapshotData:
    """The protocol moved back one window, for choosing parameters without the test part: each
    user's last |valid_u| train events become valid', the rest train', and valid becomes test'.

    On a per-user temporal split the test window does not follow train directly (valid lies
    between), so a setting chosen on valid favours the items right after train; measured on
    test' after valid' it meets the same gap the test does (fit on train', stop early on
    valid', score test' with train' as history and valid' excluded)."""
    if data.valid is None or data.test is None:
        raise BatchrecError("shifted_back needs a protocol with valid and test parts")
    valid_count = np.bincount(data.valid.user_idx, minlength=data.n_users)
    last = events_from_end(data.train) < valid_count[data.train.user_idx]
    return replace(data, train=data.train.select(~last), valid=data.train.select(last), test=data.valid)


def _interactions(con: duckdb.DuckDBPyConnection, sql: str, params: dict) -> Interactions:
    return Interactions.from_columns(con.sql(sql, params=params).fetchnumpy())


def load_interactions(
    con: duckdb.DuckDBPyConnection, snapshot_id: str, protocol: str | None = None, part: str = "train"
) -> Interactions:
    """One part of a protocol (or, without a protocol, every interaction of the snapshot).

    Sorted by (user_idx, ts, item_idx) so downstream order never depends on storage order.
    """
    cols = "i.user_idx, i.item_idx, i.rating, i.ts"
    order = "ORDER BY 1, 4, 2"
    if protocol is None:
        return _interactions(
            con, f"SELECT {cols} FROM interactions i WHERE i.snapshot_id = $s {order}", {"s": snapshot_id}
        )
    if part == "train":
        return _interactions(
            con,
            f"""
            SELECT {cols} FROM interactions i
            ANTI JOIN (SELECT user_idx, item_idx FROM split_holdout WHERE snapshot_id = $s AND protocol = $p) h
              USING (user_idx, item_idx)
            WHERE i.snapshot_id = $s {order}""",
            {"s": snapshot_id, "p": protocol},
        )
    return _interactions(
        con,
        f"""
        SELECT {cols} FROM split_holdout i
        WHERE i.snapshot_id = $s AND i.protocol = $p AND i.part = $part {order}""",
        {"s": snapshot_id, "p": protocol, "part": part},
    )


@functools.cache
def _read_query(name: str) -> str:
    return (READS_DIR / f"{name}.sql").read_text()


def query_columns(con: duckdb.DuckDBPyConnection, sql: str, params: dict) -> dict[str, np.ndarray]:
    """A query's result as numpy columns by name (through Arrow)."""
    table = con.sql(sql, params=params).to_arrow_table()
    return {c: table.column(c).to_numpy() for c in table.column_names}


def snapshot_read(con: duckdb.DuckDBPyConnection, name: str, **params) -> dict[str, np.ndarray]:
    """The columns of `sql/reads/<name>.sql` run with `params` ($s: snapshot, $p: protocol)."""
    return query_columns(con, _read_query(name), params)


def snapshot_ids(con: duckdb.DuckDBPyConnection, snapshot_id: str) -> tuple[np.ndarray, np.ndarray]:
    """The snapshot's raw user ids and raw item ids, each in dense-id order."""
    return tuple(
        snapshot_read(con, name, s=snapshot_id)["id"].astype(np.int64) for name in ("user_ids", "item_ids")
    )


def train_counts(
    con: duckdb.DuckDBPyConnection, snapshot_id: str, protocol: str | None, n_users: int, n_items: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per user and per item, the interactions a model fitted on `protocol`'s train part (None:
    every interaction) has seen; `sql/reads/train_counts.sql`."""
    got = snapshot_read(con, "train_counts", s=snapshot_id, p=protocol)
    users, items = np.zeros(n_users, np.int64), np.zeros(n_items, np.int64)
    for counts, kind in ((users, "user"), (items, "item")):
        rows = got["kind"] == kind
        counts[got["idx"][rows]] = got["n"][rows]
    return users, items


def rating_range(con: duckdb.DuckDBPyConnection, snapshot_id: str) -> tuple[float, float] | None:
    """The snapshot's (lowest, highest) rating; None for implicit data."""
    got = snapshot_read(con, "rating_range", s=snapshot_id)
    low, high = got["low"][0], got["high"][0]
    return None if low is None or np.isnan(low) else (float(low), float(high))


def _content_matrix(
    con: duckdb.DuckDBPyConnection, name: str, snapshot_id: str, n_items: int
) -> tuple[sp.csr_matrix, list[str]]:
    cols = snapshot_read(con, name, s=snapshot_id)
    names, codes = (
        np.unique(cols["term"].astype(str), return_inverse=True)
        if len(cols["term"])
        else (np.array([], str), np.array([], np.int64))
    )
    m = sp.csr_matrix(
        (np.asarray(cols["weight"], np.float32), (np.asarray(cols["item_idx"], np.int64), codes.ravel())),
        shape=(n_items, len(names)),
        dtype=np.float32,
    )
    return m, names.tolist()


def content_matrices(
    con: duckdb.DuckDBPyConnection, snapshot_id: str, n_items: int
) -> tuple[sp.csr_matrix, list[str], sp.csr_matrix, list[str]]:
    """The item x genre multi-hot and the item x term TF-IDF matrices with their column names."""
    return (
        *_content_matrix(con, "item_genres", snapshot_id, n_items),
        *_content_matrix(con, "item_tags", snapshot_id, n_items),
    )


def load_snapshot(
    con: duckdb.DuckDBPyConnection, snapshot_id: str, protocol: str | None = None, with_test: bool = True
) -> SnapshotData:
    """Load a snapshot for training/scoring; with a protocol, its train/valid/test parts
    (`with_test=False`: the test part is never read, `test` is None; what tuning loads)."""
    if protocol is not None and not scalar(
        con,
        "SELECT count(*) FROM split_protocols WHERE snapshot_id = ? AND protocol = ?",
        [snapshot_id, protocol],
    ):
        raise BatchrecError(
            f"snapshot {snapshot_id} has no split for protocol {protocol!r}; "
            f"rebuild it with `batchrec features --protocols {protocol}`"
        )
    user_ids, item_ids = snapshot_ids(con, snapshot_id)
    train = load_interactions(con, snapshot_id, protocol, "train")
    if len(train) == 0:
        where = f"protocol {protocol!r} of snapshot {snapshot_id}" if protocol else f"snapshot {snapshot_id}"
        raise BatchrecError(f"{where} has no training rows")
    valid = load_interactions(con, snapshot_id, protocol, "valid") if protocol else None
    test = load_interactions(con, snapshot_id, protocol, "test") if protocol and with_test else None
    genres, genre_names, tags, terms = content_matrices(con, snapshot_id, len(item_ids))
    return SnapshotData(
        snapshot_id=snapshot_id,
        protocol=protocol,
        n_users=len(user_ids),
        n_items=len(item_ids),
        train=train,
        valid=valid,
        test=test,
        user_ids=user_ids,
        item_ids=item_ids,
        rating_scale=rating_range(con, snapshot_id),
        item_genres=genres,
        genre_names=genre_names,
        item_tags=tags,
        tag_terms=terms,
    )


def csr_to_torch(m: sp.csr_matrix, device: torch.device | str = "cpu") -> torch.Tensor:
    """scipy CSR -> torch sparse CSR (float32) on `device`."""
    m = m.tocsr()
    with warnings.catch_warnings():
        # torch says its CSR support "is in beta" on the first CSR tensor of every process (each train
        # and score printed it); the few operations used here are stable. Invariant checks stay off,
        # as torch's default (said explicitly, which silences its reminder of that default).
        warnings.filterwarnings(
            "ignore", message="Sparse CSR tensor support is in beta", category=UserWarning
        )
        t = torch.sparse_csr_tensor(
            torch.from_numpy(m.indptr.astype(np.int64)),
            torch.from_numpy(m.indices.astype(np.int64)),
            torch.from_numpy(m.data.astype(np.float32, copy=False)),
            size=m.shape,
            check_invariants=False,
        )
    return t.to(device)


def csr_state(m: sp.csr_matrix) -> dict[str, torch.Tensor]:
    """A scipy CSR matrix as the three tensors a model's saved state holds (see `csr_from_state`)."""
    return {
        "indptr": torch.from_numpy(m.indptr.astype(np.int64)),
        "indices": torch.from_numpy(m.indices.astype(np.int64)),
        "data": torch.from_numpy(m.data.astype(np.float32)),
    }


def csr_from_state(s: dict[str, torch.Tensor], shape) -> sp.csr_matrix:
    """The scipy CSR matrix of `csr_state`, on the CPU."""
    return sp.csr_matrix(
        (s["data"].cpu().numpy(), s["indices"].cpu().numpy(), s["indptr"].cpu().numpy()), shape=shape
    )


class SparseRows:
    """A CSR matrix kept on the device as three tensors; batches of rows come out dense."""

    def __init__(self, indptr: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, n_cols: int):
        self.indptr, self.indices, self.values, self.n_cols = indptr, indices, values, int(n_cols)

    @classmethod
    def from_scipy(cls, m: sp.spmatrix, device: torch.device | str) -> SparseRows:
        m = m.tocsr()
        m.sum_duplicates()
        return cls(
            torch.from_numpy(m.indptr.astype(np.int64)).to(device),
            torch.from_numpy(m.indices.astype(np.int64)).to(device),
            torch.from_numpy(m.data.astype(np.float32)).to(device),
            m.shape[1],
        )

    @classmethod
    def from_events(
        cls,
        events,
        values: np.ndarray,
        keep: np.ndarray,
        n_users: int,
        n_items: int,
        device: torch.device | str,
    ) -> SparseRows:
        """The user x item rows of the `keep` events, valued by `values` (repeated pairs summed)."""
        return cls.from_scipy(
            sp.csr_matrix(
                (values[keep], (events.user_idx[keep], events.item_idx[keep])), shape=(n_users, n_items)
            ),
            device,
        )

    @classmethod
    def in_time_order(
        cls,
        events,
        values: np.ndarray,
        keep: np.ndarray,
        n_users: int,
        n_items: int,
        device: torch.device | str,
    ) -> SparseRows:
        """The user x item rows of the `keep` events, each row's entries in time order (by ts, then
        item), valued by `values`; repeated pairs stay separate entries."""
        idx = time_order(events)
        idx = idx[keep[idx]]
        indptr = np.concatenate([[0], np.cumsum(np.bincount(events.user_idx[idx], minlength=n_users))])
        return cls(
            torch.from_numpy(indptr.astype(np.int64)).to(device),
            torch.from_numpy(events.item_idx[idx].astype(np.int64)).to(device),
            torch.from_numpy(values[idx].astype(np.float32)).to(device),
            n_items,
        )

    @property
    def n_rows(self) -> int:
        return len(self.indptr) - 1

    def state(self, prefix: str) -> dict:
        return {
            f"{prefix}_indptr": self.indptr,
            f"{prefix}_indices": self.indices,
            f"{prefix}_values": self.values,
            f"{prefix}_cols": self.n_cols,
        }

    @classmethod
    def from_state(cls, state: dict, prefix: str) -> SparseRows:
        return cls(
            state[f"{prefix}_indptr"],
            state[f"{prefix}_indices"],
            state[f"{prefix}_values"],
            state[f"{prefix}_cols"],
        )

    def entries(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The stored entries of rows `rows`: (position in `rows`, column, value) per entry, ordered by
        position, and the offset of each row's first entry (EmbeddingBag layout)."""
        start = self.indptr[rows]
        lens = self.indptr[rows + 1] - start
        row_of = torch.repeat_interleave(torch.arange(len(rows), device=rows.device), lens)
        first = torch.cumsum(lens, 0) - lens
        pos = start[row_of] + torch.arange(len(row_of), device=rows.device) - first[row_of]
        return row_of, self.indices[pos], self.values[pos], first

    def cut_at_random(
        self, rows: torch.Tensor, cut_min: float, halflife: float, floor: float
    ) -> tuple[torch.Tensor, ...]:
        """For rows built `in_time_order`: each row cut at a random point, uniform over the
        fractions [cut_min, 1) of its length, at least one entry on each side. Returns the rows'
        entries (position in `rows`, column, value, row offsets) and, per entry, whether it lies
        before the cut and its recency factor floor + (1 - floor) * 0.5 ** (k / halflife), k = the
        entries between it and the cut (1 at halflife 0): the prefix weighted as a scoring-time
        query is, at a point in the user's past."""
        row_of, cols, vals, offsets = self.entries(rows)
        lens = torch.diff(offsets, append=offsets.new_tensor([len(cols)]))
        fraction = cut_min + (1.0 - cut_min) * torch.rand(len(rows), device=vals.device)
        cut = torch.minimum((fraction * lens).long(), lens - 1).clamp(min=1)[row_of]
        k = cut - 1 - (torch.arange(len(cols), device=vals.device) - offsets[row_of])
        before = k >= 0
        recency = (
            floor + (1.0 - floor) * 0.5 ** (k.clamp(min=0) / halflife)
            if halflife > 0
            else torch.ones_like(vals)
        )
        return row_of, cols, vals, offsets, before, recency

    def dense(self, rows: torch.Tensor) -> torch.Tensor:
        """Rows `rows` as a dense float32 [len(rows), n_cols] tensor (one scatter, no Python loop)."""
        row_of, cols, vals, _ = self.entries(rows)
        out = torch.zeros(len(rows), self.n_cols, device=self.values.device)
        out[row_of, cols] = vals
        return out

    def torch_sparse(self) -> torch.Tensor:
        """The whole matrix as a torch sparse COO tensor (for `torch.sparse.mm`)."""
        rows = torch.repeat_interleave(
            torch.arange(self.n_rows, device=self.indptr.device), torch.diff(self.indptr)
        )
        return torch.sparse_coo_tensor(
            torch.stack([rows, self.indices]), self.values, (self.n_rows, self.n_cols)
        ).coalesce()
