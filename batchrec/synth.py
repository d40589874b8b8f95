"""Synthetic MovieLens-format data at any scale (ratings.csv, movies.csv, tags.csv, README.txt).

The files have exactly the ml-20m / ml-latest CSV layouts. The data has a learnable structure:
users and items carry latent factors and biases; an item's genres follow its factors; which items
a user rates depends on popularity (Zipf-like), on taste (factors) and on whether the movie was
out during the user's activity window; the rating is a noisy, rounded function of the same
factors; tags come from vocabularies tied to genres and factors.

Everything is vectorised per block of users (about two million ratings each) and appended to the
CSV files, so memory stays flat at any size. A user's items are chosen without replacement by
Gumbel-top-k among candidates drawn by popularity (see `_choose_items`). Same seed and sizes ->
byte-identical files.
"""

from __future__ import annotations

import logging
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import polars as pl
from scipy.special import ndtri

from batchrec.errors import BatchrecError

log = logging.getLogger(__name__)

# The 19 genres of ml-20m with their movie counts there (the prior for an item's genres).
GENRES = {
    "Action": 3520,
    "Adventure": 2329,
    "Animation": 1027,
    "Children": 1139,
    "Comedy": 8374,
    "Crime": 2939,
    "Documentary": 2471,
    "Drama": 13344,
    "Fantasy": 1412,
    "Film-Noir": 330,
    "Horror": 2611,
    "IMAX": 196,
    "Musical": 1036,
    "Mystery": 1514,
    "Romance": 4127,
    "Sci-Fi": 1743,
    "Thriller": 4178,
    "War": 1194,
    "Western": 676,
}
NO_GENRES = "(no genres listed)"

# Tags an item of a genre attracts, most common first; GENERAL_TAGS follow the item's factors.
GENRE_TAGS = {
    "Action": ["action", "explosions", "car chase", "martial arts", "fight scenes", "heist"],
    "Adventure": ["adventure", "quest", "treasure hunt", "epic journey", "survival"],
    "Animation": ["animation", "pixar", "anime", "stop motion", "hand-drawn"],
    "Children": ["family", "kids", "disney", "talking animals", "coming of age"],
    "Comedy": ["funny", "dark comedy", "hilarious", "satire", "quirky", "parody", "witty dialogue"],
    "Crime": ["crime", "mafia", "gangsters", "heist", "police", "serial killer"],
    "Documentary": ["documentary", "true story", "history", "politics", "nature"],
    "Drama": ["drama", "emotional", "based on a true story", "character study", "tearjerker", "slow burn"],
    "Fantasy": ["fantasy", "magic", "dragons", "fairy tale", "mythology"],
    "Film-Noir": ["noir", "femme fatale", "black and white", "hardboiled detective"],
    "Horror": ["horror", "gore", "creepy", "zombies", "slasher", "jump scares", "haunted house"],
    "IMAX": ["imax", "3d", "spectacle"],
    "Musical": ["musical", "great soundtrack", "singing", "dance"],
    "Mystery": ["mystery", "twist ending", "whodunit", "detective", "mindfuck"],
    "Romance": ["romance", "love story", "romantic comedy", "chick flick", "bittersweet"],
    "Sci-Fi": [
        "sci-fi",
        "space",
        "time travel",
        "dystopia",
        "aliens",
        "artificial intelligence",
        "cyberpunk",
    ],
    "Thriller": ["thriller", "suspense", "tense", "psychological", "conspiracy", "plot twist"],
    "War": ["war", "world war ii", "vietnam", "anti-war", "military"],
    "Western": ["western", "cowboys", "spaghetti western", "gunfight"],
}
GENERAL_TAGS = [
    "atmospheric",
    "classic",
    "visually appealing",
    "thought-provoking",
    "overrated",
    "cult film",
    "great acting",
    "based on a book",
    "nonlinear",
    "surreal",
    "boring",
    "predictable",
    "beautiful cinematography",
    "good dialogue",
    "feel-good",
    "violent",
    "philosophical",
    "underrated",
    "slow, but rewarding",
    "must see",
    "BD-R",
    "stylized",
    "quotable",
    "remake",
]
_TAG_SLOTS = [t for g in GENRES for t in GENRE_TAGS[g]] + GENERAL_TAGS  # genre lists, then general
TAG_VOCAB = list(dict.fromkeys(_TAG_SLOTS))  # a tag in two lists ("heist") is one tag
_TAG_OF_SLOT = np.array([TAG_VOCAB.index(t) for t in _TAG_SLOTS])

START_TS = 820_454_400  # 1996-01-01 UTC: first possible rating
END_TS = 1_735_689_600  # 2025-01-01 UTC: nothing at or after
HALF_STARS_FROM = 1_045_526_400  # 2003-02-18: MovieLens allowed half stars from then on
DAY = 86_400

DIM = 12  # latent factors
ZIPF_EXPONENT = 1.05  # item popularity ~ rank^-a ...
UNIFORM_SHARE = 0.1  # ... mixed with this much uniform, so the long tail is reachable
TASTE_WEIGHT = 2.0  # how strongly taste drives which items get rated ...
POPULARITY_WEIGHT = 0.75  # ... and popularity, beyond drawing the candidates by popularity
POOL_FACTOR = 8  # candidates drawn per rating a user gives (more: taste matters more)
BLOCK_RATINGS = 1 << 20  # ratings generated per block (bounds memory)
MAX_BLOCK_USERS = 1 << 18  # bits of the sort key reserved for the user within a block
TAGGER_SHARE = 0.06  # fraction of users who tag (ml-20m: 7,801 of 138,493)


def write_synthetic(
    out, *, n_users: int, n_items: int, n_ratings: int, n_tags: int | None = None, seed: int = 0
) -> str:
    """Write ratings.csv, movies.csv, tags.csv and README.txt to directory `out`; return a summary line."""
    n_tags = n_ratings // 40 if n_tags is None else n_tags
    _check_sizes(n_users, n_items, n_ratings, n_tags)
    started = time.perf_counter()
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BatchrecError(f"{out}: cannot create the output directory ({exc.strerror})") from None
    root = np.random.SeedSequence([seed & 0xFFFFFFFF, seed >> 32 & 0xFFFFFFFF, 0x5EED])
    item_seq, user_seq, block_seq = root.spawn(3)

    items = _Items(n_items, np.random.default_rng(item_seq))
    counts = _user_counts(n_users, n_items, n_ratings, np.random.default_rng(user_seq))
    bounds = _blocks(counts)
    tag_cuts = np.rint(n_tags * np.append(0, np.cumsum(counts)[bounds[1:] - 1]) / n_ratings).astype(np.int64)

    partial = {name: out / f".{name}.partial" for name in ("ratings.csv", "movies.csv", "tags.csv")}
    items.frame().write_csv(partial["movies.csv"])
    tags_written = 0
    # One writer thread: block b is written (Polars, GIL released) while block b+1 is generated.
    with (
        open(partial["ratings.csv"], "wb") as rfile,
        open(partial["tags.csv"], "wb") as tfile,
        ThreadPoolExecutor(max_workers=1) as writer,
    ):
        pending = None
        for b, block_rng in enumerate(np.random.default_rng(s) for s in block_seq.spawn(len(bounds) - 1)):
            lo, hi = int(bounds[b]), int(bounds[b + 1])
            ratings, tags = _block(items, lo, counts[lo:hi], int(tag_cuts[b + 1] - tag_cuts[b]), block_rng)
            if pending is not None:
                pending.result()
            pending = writer.submit(_append, (rfile, ratings), (tfile, tags), header=b == 0)
            tags_written += tags.height
            log.debug("synth block %d/%d: users %d..%d", b + 1, len(bounds) - 1, lo + 1, hi)
        pending.result()
    for name, path in partial.items():
        os.replace(path, out / name)
    (out / "README.txt").write_text(
        _readme(n_users, n_items, n_ratings, tags_written, seed), encoding="utf-8"
    )
    return (
        f"wrote {out}: {n_users} users, {n_items} movies, {n_ratings} ratings, {tags_written} tags "
        f"(seed {seed}) in {time.perf_counter() - started:.1f} s"
    )


def _append(*targets: tuple, header: bool) -> None:
    for file, frame in targets:
        frame.write_csv(file, include_header=header)


def _check_sizes(n_users: int, n_items: int, n_ratings: int, n_tags: int) -> None:
    if min(n_users, n_items, n_ratings) < 1:
        raise BatchrecError(
            f"--users, --items and --ratings must be >= 1 (got {n_users}, {n_items}, {n_ratings})"
        )
    if n_ratings < n_users:
        raise BatchrecError(
            f"--ratings must be >= --users (every user rates something); got {n_ratings} < {n_users}"
        )
    if n_ratings > n_users * n_items:
        raise BatchrecError(
            f"--ratings {n_ratings} exceeds --users x --items = {n_users * n_items} distinct pairs"
        )
    if n_items >= 1 << 24:
        raise BatchrecError(f"--items must be below {1 << 24} (got {n_items})")
    if n_tags < 0:
        raise BatchrecError(f"--tags must be >= 0 (got {n_tags})")


class _Items:
    """Every movie: id, year, factors, bias, popularity, genres. Indexed in release order, so the
    movies out by a given time are a prefix of the index."""

    def __init__(self, n: int, rng: np.random.Generator):
        self.n = n
        year = np.clip(2024 - np.floor(rng.exponential(18.0, n)), 1902, 2024).astype(np.int64)
        jan1 = (year - 1970).astype("datetime64[Y]").astype("datetime64[s]").astype(np.int64)
        self.release = np.sort(jan1 + (rng.random(n) * 365 * DAY).astype(np.int64))
        self.year = self.release.astype("datetime64[s]").astype("datetime64[Y]").astype(np.int64) + 1970
        # Ids grow with gaps, as MovieLens ids do; later ids are mostly, not always, newer films.
        gap = np.where(rng.random(n) < 0.1, rng.geometric(0.15, n), 0)
        gap[0] = 0
        self.id_rank = np.argsort(np.argsort(self.year + rng.normal(0, 8, n), kind="stable"), kind="stable")
        self.ids = (1 + np.arange(n) + np.cumsum(gap))[self.id_rank]

        self.factors = rng.normal(0, DIM**-0.25, (n, DIM)).astype(np.float32)  # dot products ~ N(0, 1)
        self.factor_cols = np.ascontiguousarray(self.factors.T)
        rank = rng.permutation(n) + 1  # popularity rank of each item
        zipf = np.arange(1, n + 1) ** -ZIPF_EXPONENT
        popularity = (1 - UNIFORM_SHARE) * zipf[rank - 1] / zipf.sum() + UNIFORM_SHARE / n
        self.log_popularity = np.log(popularity).astype(np.float32)
        self.popularity_cdf = np.cumsum(popularity)
        popularity_z = ndtri(1 - rank / (n + 1))  # popular films are rated a little higher
        self.bias = 0.12 * popularity_z + rng.normal(0, 0.35, n)

        genre_axes = rng.normal(0, DIM**-0.25, (len(GENRES), DIM)).astype(np.float32)
        logits = np.log(np.array(list(GENRES.values()), dtype=np.float64)) + self.factors @ genre_axes.T
        logits += rng.gumbel(size=logits.shape)
        n_genres = np.minimum(1 + rng.poisson(0.9, n), 6) * (rng.random(n) >= 0.01)  # 1% have none
        order = np.argsort(-logits, axis=1)
        self.has_genre = np.zeros((n, len(GENRES)), dtype=bool)
        np.put_along_axis(self.has_genre, order, np.arange(len(GENRES)) < n_genres[:, None], axis=1)
        self.genre_ptr = np.append(0, np.cumsum(self.has_genre.sum(1)))
        self.genre_flat = np.nonzero(self.has_genre)[1]  # row-major: each item's genres in a run
        self.title_style = rng.choice(5, n, p=[0.86, 0.07, 0.03, 0.03, 0.01])
        self.general_tag_axes = rng.normal(0, DIM**-0.25, (len(GENERAL_TAGS), DIM)).astype(np.float32)

    def available(self, until: np.ndarray) -> np.ndarray:
        """How many items (an index prefix) were released by each time in `until`."""
        return np.searchsorted(self.release, until, side="right")

    def sample(
        self, rng: np.random.Generator, limit: np.ndarray, size: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """`size[u]` items for each user u by popularity among the first `limit[u]` (with replacement).

        Returns (user, item) sorted by user, then item: each user's uniforms are sorted (one
        float sort of `user + uniform`) before the inverse-CDF lookup, so the binary searches
        walk the CDF in order (several times faster than random probes) and the output comes sorted.
        """
        user = np.repeat(np.arange(len(size)), size)
        u = np.sort(user + rng.random(len(user)))
        u -= user
        u *= np.repeat(self.popularity_cdf[limit - 1], size)
        return user, np.minimum(
            np.searchsorted(self.popularity_cdf, u, side="right"), np.repeat(limit - 1, size)
        )

    def frame(self) -> pl.DataFrame:
        """movies.csv: `movieId,title,genres`, titles like MovieLens ("Name, The (1997)" gets quoted)."""
        ident = pl.col("movieId").cast(pl.String)
        name = pl.concat_str(pl.lit("Synthetic Movie "), ident)
        title = (
            pl.when(pl.col("style") == 1)
            .then(pl.concat_str(name, pl.lit(", The")))
            .when(pl.col("style") == 2)
            .then(pl.concat_str(name, pl.lit(", A")))
            .when(pl.col("style") == 3)
            .then(pl.concat_str(name, pl.lit(" (Film Synthétique "), ident, pl.lit(")")))  # an a.k.a.
            .when(pl.col("style") == 4)
            .then(pl.concat_str(name, pl.lit(' "Redux"')))
            .otherwise(name)
        )
        flags = {g: self.has_genre[:, k] for k, g in enumerate(GENRES)}
        genres = pl.concat_str(
            [pl.when(pl.col(g)).then(pl.lit(g)) for g in GENRES], separator="|", ignore_nulls=True
        )
        return (
            pl.DataFrame({"movieId": self.ids, "style": self.title_style, "year": self.year, **flags})
            .sort("movieId")
            .select(
                "movieId",
                pl.concat_str(title, pl.lit(" ("), pl.col("year").cast(pl.String), pl.lit(")")).alias(
                    "title"
                ),
                pl.when(genres == "").then(pl.lit(NO_GENRES)).otherwise(genres).alias("genres"),
            )
        )


def _user_counts(n_users: int, n_items: int, n_ratings: int, rng: np.random.Generator) -> np.ndarray:
    """Ratings per user: a floor (20 like MovieLens, less when the total is small) plus a lognormal tail."""
    floor = max(1, min(20, n_ratings // n_users // 2))
    weight = rng.lognormal(0.0, 1.3, n_users)
    counts = np.full(n_users, floor, dtype=np.int64)
    cap = n_items
    extra = n_ratings - counts.sum()
    while extra > 0:  # water-filling: hand out the extra by weight, re-spread what the cap cuts off
        open_ = counts < cap
        share = extra * weight * open_ / (weight * open_).sum()
        add = np.minimum(np.floor(share).astype(np.int64), cap - counts)
        counts += add
        extra -= int(add.sum())
        if extra > 0 and not (add > 0).any():  # leftovers smaller than one per user: largest weights first
            open_ = np.flatnonzero(counts < cap)
            counts[open_[np.argsort(-weight[open_], kind="stable")[:extra]]] += 1
            extra = 0
    return counts


def _blocks(counts: np.ndarray) -> np.ndarray:
    """User index boundaries so each block holds about BLOCK_RATINGS ratings (and <= MAX_BLOCK_USERS users)."""
    cum = np.cumsum(counts)
    cuts = np.searchsorted(cum, np.arange(BLOCK_RATINGS, cum[-1], BLOCK_RATINGS), side="right")
    bounds = np.unique(np.concatenate([[0], cuts, [len(counts)]]))
    long = np.diff(bounds) > MAX_BLOCK_USERS
    if long.any():
        extra = [np.arange(bounds[i], bounds[i + 1], MAX_BLOCK_USERS) for i in np.flatnonzero(long)]
        bounds = np.unique(np.concatenate([bounds, *extra]))
    return bounds


def _block(
    items: _Items, first_user: int, counts: np.ndarray, n_tags: int, rng: np.random.Generator
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Ratings and tags of users first_user .. first_user+len(counts)-1."""
    n = len(counts)
    taste = rng.normal(0, DIM**-0.25, (DIM, n)).astype(np.float32)  # one row per latent dim
    bias = rng.normal(0, 0.5, n)
    whole_stars = rng.random(n) < 0.25
    begin = START_TS + (rng.random(n) * (END_TS - START_TS - 2 * DAY)).astype(np.int64)
    span = np.exp(rng.normal(math.log(2 * DAY), 2.5, n)) * np.sqrt(counts / 20.0)
    end = np.minimum(begin + span.astype(np.int64), END_TS - DAY)
    # Users rate films out by the end of their window; one who needs more also gets later ones.
    limit = np.maximum(items.available(end), np.minimum(items.n, 2 * counts))

    user, item = _choose_items(items, counts, taste, limit, rng)
    affinity = _affinity(taste, items.factor_cols, user, item)
    # Centred per user: how much a user likes an item relative to the rest they chose, so the rating
    # scale does not drift with how selective the choice was (which varies with the sizes).
    affinity -= (np.bincount(user, affinity, minlength=n) / counts)[user]
    value = 3.42 + bias[user] + items.bias[item] + 0.8 * affinity + rng.normal(0, 0.7, len(user))
    ts = begin[user] + (rng.random(len(user)) * (end - begin)[user]).astype(np.int64)
    early = np.flatnonzero(ts < items.release[item])  # only from the `limit` extension: rate it after release
    ts[early] = np.minimum(
        items.release[item[early]] + rng.exponential(60 * DAY, len(early)).astype(np.int64), END_TS - DAY
    )
    whole = whole_stars[user] | (ts < HALF_STARS_FROM)
    rating = np.where(whole, np.clip(np.rint(value), 1, 5), np.clip(np.rint(value * 2) / 2, 0.5, 5))

    ratings = pl.DataFrame(
        {"userId": user + first_user + 1, "movieId": items.ids[item], "rating": rating, "timestamp": ts}
    )
    tags = _tags(items, user, item, ts, counts, n_tags, rng)
    return ratings, tags.with_columns(pl.col("userId") + first_user + 1)


def _choose_items(
    items: _Items, counts: np.ndarray, taste: np.ndarray, limit: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Each user's `counts[u]` distinct items among the first `limit[u]`, sorted by (user, movieId).

    Light users: draw POOL_FACTOR*count candidates by popularity, drop repeats, keep the `count`
    with the highest taste + popularity + Gumbel noise (Gumbel-top-k = sampling without
    replacement by those weights). Heavy users (pool near their catalogue) and the rare light user
    whose pool had too few distinct items: Gumbel-top-k over the whole catalogue (`_choose_dense`).
    The pool selection is one integer sort of a packed (user | score | item) key: no per-user loops.
    """
    item_bits = max(1, int(items.n - 1).bit_length())
    heavy = counts * POOL_FACTOR * 2 > limit
    pool = np.where(heavy, 0, counts * POOL_FACTOR)
    cand_user, cand_item = items.sample(rng, limit, pool)
    new = np.ones(len(cand_user), dtype=bool)
    new[1:] = (cand_user[1:] != cand_user[:-1]) | (cand_item[1:] != cand_item[:-1])
    cand_user, cand_item = cand_user[new], cand_item[new]  # sorted, so repeats are adjacent
    score = TASTE_WEIGHT * _affinity(taste, items.factor_cols, cand_user, cand_item)
    score += POPULARITY_WEIGHT * items.log_popularity[cand_item]
    score -= np.log(rng.standard_exponential(len(score)))  # + Gumbel(0, 1)

    score_bits = 63 - item_bits - MAX_BLOCK_USERS.bit_length()
    levels = (1 << score_bits) - 1
    descending = levels - np.clip((score + 40.0) * (levels / 80.0), 0, levels).astype(
        np.int64
    )  # float64: exact
    key = (cand_user << (score_bits + item_bits)) | (descending << item_bits) | cand_item
    key.sort()
    key_user = key >> (score_bits + item_bits)
    first = np.searchsorted(key_user, np.arange(len(counts)))
    short = ~heavy & (np.diff(np.append(first, len(key))) < counts)
    keep = ((np.arange(len(key)) - first[key_user]) < counts[key_user]) & ~short[key_user]
    user = key_user[keep]
    item = key[keep] & ((1 << item_bits) - 1)

    dense_users = np.flatnonzero(heavy | short)
    if len(dense_users):
        chunks = np.array_split(dense_users, -(-len(dense_users) * items.n // (1 << 22)))
        dense = [_choose_dense(items, counts, taste, limit, rows, rng) for rows in chunks]
        user = np.concatenate([user, *(d[0] for d in dense)])
        item = np.concatenate([item, *(d[1] for d in dense)])
    order = np.argsort(user * items.n + items.id_rank[item])
    return user[order], item[order]


def _choose_dense(
    items: _Items,
    counts: np.ndarray,
    taste: np.ndarray,
    limit: np.ndarray,
    rows: np.ndarray,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """Gumbel-top-count over the allowed prefix of the catalogue for the users `rows` (rows x items stays small)."""
    score = TASTE_WEIGHT * (taste[:, rows].T @ items.factor_cols).astype(np.float64)  # float64: no ties
    score += (1 + POPULARITY_WEIGHT) * items.log_popularity
    score -= np.log(rng.standard_exponential(score.shape))
    score[np.arange(items.n)[None, :] >= limit[rows, None]] = -np.inf
    threshold = -np.sort(-score, axis=1)[np.arange(len(rows)), counts[rows] - 1]
    row, item = np.nonzero(score >= threshold[:, None])  # continuous noise: no ties, counts[r] per row
    if len(row) != counts[rows].sum():  # a tie after all: take exactly counts[r] by rank
        first = np.arange(items.n)[None, :] < counts[rows, None]
        row, item = np.nonzero(first)[0], np.argsort(-score, axis=1, kind="stable")[first]
    return rows[row], item


def _affinity(taste: np.ndarray, factor_cols: np.ndarray, user: np.ndarray, item: np.ndarray) -> np.ndarray:
    """<taste[:, user[j]], factor_cols[:, item[j]]> for each j, one latent dim at a time (no (len, DIM) gathers)."""
    out = np.zeros(len(user), dtype=np.float32)
    for k in range(DIM):
        out += taste[k][user] * factor_cols[k][item]
    return out


def _tags(
    items: _Items,
    user: np.ndarray,
    item: np.ndarray,
    ts: np.ndarray,
    counts: np.ndarray,
    n_tags: int,
    rng: np.random.Generator,
) -> pl.DataFrame:
    """`n_tags` distinct (user, item, tag) applications on this block's ratings, a little after each rating."""
    empty = pl.DataFrame(
        {"userId": [], "movieId": [], "tag": [], "timestamp": []},
        schema={"userId": pl.Int64, "movieId": pl.Int64, "tag": pl.String, "timestamp": pl.Int64},
    )
    if n_tags == 0 or len(user) == 0:
        return empty
    # A few heavy taggers apply most tags, as in MovieLens; active users tag more.
    tagger = (rng.random(len(counts)) < TAGGER_SHARE) * rng.lognormal(0, 1.5, len(counts)) * np.sqrt(counts)
    if not tagger.any():
        tagger = np.sqrt(counts.astype(np.float64))
    weight = tagger[user]
    genre_start = np.append(0, np.cumsum([len(GENRE_TAGS[g]) for g in GENRES]))
    genre_len = np.diff(genre_start)

    rating_idx = np.empty(0, dtype=np.int64)
    tag_idx = np.empty(0, dtype=np.int64)
    for attempt in range(4):  # draw, drop repeated (rating, tag), top up; a shortfall is left as is
        want = n_tags - len(rating_idx)
        if want <= 0:
            break
        size = want * 2 + 16
        cum = np.cumsum(weight + attempt * weight.mean())
        r = np.minimum(np.searchsorted(cum, rng.random(size) * cum[-1], side="right"), len(cum) - 1)
        it = item[r]
        n_genre = items.genre_ptr[it + 1] - items.genre_ptr[it]
        genre = items.genre_flat[
            np.minimum(
                items.genre_ptr[it] + (rng.random(size) * n_genre).astype(np.int64), len(items.genre_flat) - 1
            )
        ]
        genre_tag = genre_start[genre] + (rng.random(size) ** 2 * genre_len[genre]).astype(np.int64)
        general_logit = items.factors[it] @ items.general_tag_axes.T - 0.1 * np.arange(len(GENERAL_TAGS))
        general_tag = genre_start[-1] + np.argmax(
            general_logit + rng.gumbel(size=general_logit.shape), axis=1
        )
        use_genre = (n_genre > 0) & (rng.random(size) < 0.7)
        t = _TAG_OF_SLOT[np.where(use_genre, genre_tag, general_tag)]
        rating_idx = np.concatenate([rating_idx, r])
        tag_idx = np.concatenate([tag_idx, t])
        _, first = np.unique(rating_idx * len(TAG_VOCAB) + tag_idx, return_index=True)
        first = np.sort(first)[:n_tags]  # first draws win, so the order of draws stays random
        rating_idx, tag_idx = rating_idx[first], tag_idx[first]

    delay = 1 + np.exp(rng.normal(math.log(300), 3.0, len(rating_idx)))
    tag_ts = np.minimum(ts[rating_idx] + np.minimum(delay, END_TS).astype(np.int64), END_TS - 1)
    order = np.lexsort((tag_idx, items.id_rank[item[rating_idx]], user[rating_idx]))  # by userId, movieId
    return pl.DataFrame(
        {
            "userId": user[rating_idx][order],
            "movieId": items.ids[item[rating_idx]][order],
            "tag": pl.Series(TAG_VOCAB, dtype=pl.String).gather(tag_idx[order]),
            "timestamp": tag_ts[order],
        },
        schema=empty.schema,
    )


def _readme(n_users: int, n_items: int, n_ratings: int, n_tags: int, seed: int) -> str:
    return f"""Synthetic MovieLens-format dataset
==================================

THIS DATA IS SYNTHETIC. It was generated by `batchrec synth` (seed {seed}) and contains no real
users, movies, ratings or tags. It imitates the layout of the GroupLens MovieLens ml-20m /
ml-latest releases so that the same readers load it, but it is not MovieLens data and carries no
GroupLens license; use it freely.

Contents: {n_ratings} ratings and {n_tags} tag applications by {n_users} users across {n_items} movies,
timestamps between 1996-01-01 and 2025-01-01 (UTC).

Files (UTF-8, comma-separated, header line, fields with commas or quotes double-quoted):
- ratings.csv  userId,movieId,rating,timestamp   rating 0.5..5.0 in half stars (whole stars only
               before 2003-02-18 and for some users); timestamp in seconds since 1970-01-01 UTC;
               sorted by userId, then movieId; one rating per (userId, movieId).
- movies.csv   movieId,title,genres              title "Name (year)"; genres "A|B|C" from the 19
               MovieLens genres or "(no genres listed)".
- tags.csv     userId,movieId,tag,timestamp      tags on rated movies, after the rating.

How it is made: users and movies have latent taste factors and biases; a movie's genres and tags
follow its factors; popularity is Zipf-like; which movies a user rates depends on popularity,
taste and release year; ratings are noisy functions of the factors. Same seed and sizes give
byte-identical files.
"""
