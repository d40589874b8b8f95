"""What the bad-input and fault tests compare: a checksum of every warehouse table."""

from __future__ import annotations

import hashlib
from pathlib import Path

import duckdb


def table_checksums(db: str | Path) -> dict[str, str]:
    """{table: sha256 of its rows in a fixed order} for every base table of the warehouse file.

    Opened read-only, so taking the checksum never changes what it measures. A missing file gives {}.
    """
    if not Path(db).exists():
        return {}
    con = duckdb.connect(str(db), read_only=True)
    try:
        tables = [
            t
            for (t,) in con.execute(
                "SELECT table_name FROM information_schema.tables WHERE table_type = 'BASE TABLE' ORDER BY 1"
            ).fetchall()
        ]
        out = {}
        for t in tables:
            digest = hashlib.sha256()
            # ORDER BY ALL makes the digest independent of physical row order
            for row in con.execute(f'SELECT * FROM "{t}" ORDER BY ALL').fetchall():
                digest.update(repr(row).encode())
            out[t] = digest.hexdigest()
        return out
    finally:
        con.close()
