"""batchrec: a nightly batch recommender on a DuckDB feature store and PyTorch models."""

__version__ = "0.1.0"
