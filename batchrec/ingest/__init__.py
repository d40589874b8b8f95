"""Ingest: format detection, one reader per source format, validation, quarantine and merge.

`sources` resolves a directory / zip / file, `spec` is what every reader shares (columns, the
checks on their values, as SQL), `formats` and `generic` describe how to read each file, `read`
stages a file and finds its bad lines (`lines` numbers them), `merge` folds it into the warehouse
tables, `run` (`ingest_path`) ties them together in one transaction.
"""


def __getattr__(name: str):
    """`ingest_path`, loaded on first use, so that reading the option defaults (`spec`,
    `sources`: the CLI does at start) does not load the readers and numpy."""
    if name == "ingest_path":
        from batchrec.ingest.run import ingest_path

        return ingest_path
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["ingest_path"]
