"""Sparse TF-IDF of each item's tags (Polars; tokenising is what SQL does badly).

Documents are items; an item's text is every application of every tag on it before as_of.

* Tokens: lower-case, split on anything that is not a letter or digit (Unicode-aware); stop words
  dropped. A tag of two or more tokens is also kept whole as a phrase (lower-cased, whitespace
  collapsed), so "Dark comedy" gives "dark", "comedy" and "dark comedy".
* tf: raw count of a term over the item's tag applications.
* Vocabulary: terms in at least `min_df` items, at most `max_terms` of them (highest df first,
  ties by term).
* idf (smooth): ln((1 + N) / (1 + df)) + 1, N = number of items with at least one tag.
* weight = tf * idf, L2-normalised per item. Items whose terms all fall outside the vocabulary,
  and items without tags, have no rows.
"""

from __future__ import annotations

import duckdb
import polars as pl

from batchrec.warehouse import query_pl

# A small English stop list: function words that say nothing about an item.
STOP_WORDS = frozenset(
    [
        "a",
        "about",
        "above",
        "after",
        "again",
        "against",
        "all",
        "am",
        "an",
        "and",
        "any",
        "are",
        "as",
        "at",
        "be",
        "because",
        "been",
        "before",
        "being",
        "below",
        "between",
        "both",
        "but",
        "by",
        "can",
        "could",
        "did",
        "do",
        "does",
        "doing",
        "down",
        "during",
        "each",
        "few",
        "for",
        "from",
        "further",
        "had",
        "has",
        "have",
        "having",
        "he",
        "her",
        "here",
        "hers",
        "herself",
        "him",
        "himself",
        "his",
        "how",
        "i",
        "if",
        "in",
        "into",
        "is",
        "it",
        "its",
        "itself",
        "just",
        "me",
        "more",
        "most",
        "my",
        "myself",
        "no",
        "nor",
        "not",
        "now",
        "of",
        "off",
        "on",
        "once",
        "only",
        "or",
        "other",
        "our",
        "ours",
        "ourselves",
        "out",
        "over",
        "own",
        "same",
        "she",
        "should",
        "so",
        "some",
        "such",
        "than",
        "that",
        "the",
        "their",
        "theirs",
        "them",
        "themselves",
        "then",
        "there",
        "these",
        "they",
        "this",
        "those",
        "through",
        "to",
        "too",
        "under",
        "until",
        "up",
        "very",
        "was",
        "we",
        "were",
        "what",
        "when",
        "where",
        "which",
        "while",
        "who",
        "whom",
        "why",
        "will",
        "with",
        "would",
        "you",
        "your",
        "yours",
        "yourself",
        "yourselves",
    ]
)

_WORD = r"[\p{L}\p{N}]+"


def tag_terms(tags: pl.Series) -> pl.DataFrame:
    """Distinct tag strings -> (tag, term), one row per occurrence of a term in the tag."""
    text = pl.DataFrame({"tag": tags.unique()}).with_columns(text=pl.col("tag").str.to_lowercase())
    text = text.with_columns(tokens=pl.col("text").str.extract_all(_WORD))
    words = (
        text.select("tag", term="tokens")
        .explode("term")
        .filter(pl.col("term").is_not_null() & ~pl.col("term").is_in(list(STOP_WORDS)))
    )
    phrases = text.filter(pl.col("tokens").list.len() >= 2).select(
        "tag", term=pl.col("text").str.replace_all(r"\s+", " ").str.strip_chars()
    )
    return pl.concat([words, phrases])


def tfidf(tags: pl.DataFrame, min_df: int = 2, max_terms: int = 20000) -> pl.DataFrame:
    """(item_idx, tag) rows, one per tag application -> (item_idx, term, weight), L2-normalised per item."""
    n_docs = tags["item_idx"].n_unique()
    # Tokenise each distinct tag string once; applications only multiply the counts.
    applied = tags.group_by("item_idx", "tag").agg(times=pl.len())
    tf = (
        applied.join(tag_terms(applied["tag"]), on="tag")
        .group_by("item_idx", "term")
        .agg(tf=pl.col("times").sum().cast(pl.Float64))
    )
    vocab = (
        tf.group_by("term")
        .agg(df=pl.len())
        .filter(pl.col("df") >= min_df)
        .sort(["df", "term"], descending=[True, False])
        .head(max_terms)
        .select("term", idf=((1.0 + n_docs) / (1.0 + pl.col("df"))).log() + 1.0)
    )
    # Sorted so each item's norm sums in the same order on every run (bit-identical rebuilds).
    weighted = tf.join(vocab, on="term").sort("item_idx", "term").with_columns(w=pl.col("tf") * pl.col("idf"))
    return weighted.select(
        pl.col("item_idx").cast(pl.Int32),
        "term",
        weight=pl.col("w") / pl.col("w").pow(2).sum().sqrt().over("item_idx"),
    )


def build_item_tag_tfidf(
    con: duckdb.DuckDBPyConnection, snapshot_id: str, min_df: int, max_terms: int
) -> int:
    """Write the snapshot's `item_tag_tfidf` rows from the build's `snap_tags`; returns the row count."""
    tags = query_pl(con, "SELECT item_idx, tag FROM snap_tags")
    weights = tfidf(tags, min_df=min_df, max_terms=max_terms)
    con.register("tfidf_weights", weights.to_arrow())
    try:
        con.execute(
            "INSERT INTO item_tag_tfidf SELECT ?, item_idx, term, weight FROM tfidf_weights", [snapshot_id]
        )
    finally:
        con.unregister("tfidf_weights")
    return weights.height
