"""Ingest: format detection, one reader per source format, validation, quarantine and merge.

`sources` resolves a directory / zip / file, `spec` is what every reader shares (columns, the
checks on their values, as SQL), `formats` and `generic` describe how to read each file, `read`
stages a file and finds its bad lines (`lines` numbers them), `merge` folds it into the warehouse
tables, `run` (`ingest_path`) ties them together in one transaction. This package module imports
nothing, so the CLI can read the option defaults (`sources`, `run`) without loading the readers.
"""
