"""Ingest: format detection, one reader per source format, validation, quarantine and merge.

`sources` resolves a directory / zip / file, `formats` and `generic` describe how to read each
file, `read` stages a file and finds its bad lines, `merge` folds it into the warehouse tables,
`run` ties them together in one transaction.
"""

from batchrec.ingest.run import ingest_path

__all__ = ["ingest_path"]
