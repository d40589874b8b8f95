"""The package list, which pyproject.toml cannot express: every `batchrec*` package, plus the
top-level `sql/` folder (the feature store and schema, kept where the product's layout puts it)
installed as the package data `batchrec/sql`. `batchrec.warehouse.sql_dir()` reads the installed
folder, or `sql/` itself in a checkout, so installed and editable runs read the same files."""

from setuptools import find_packages, setup

setup(packages=find_packages(include=["batchrec*"]) + ["batchrec.sql"], package_dir={"batchrec.sql": "sql"})
