"""Line numbers for the rows DuckDB's CSV reader hands over.

DuckDB numbers lines itself only for the lines its reader rejects (a wrong number of fields,
bytes that are not UTF-8). A row the reader accepts and a check (spec.py) finds bad is located
by its ordinal among the rows the reader emitted, in file order (`WITH ORDINALITY`): it is on
the ordinal-th line that the reader did not skip. Skipped are the header, the rejected lines and
the empty lines, which DuckDB passes over without a word; the empty ones are found here.

Lines are counted as DuckDB counts them: a newline inside a quoted field does not end a line
(quotes are RFC 4180's, a doubled quote inside a quoted field included), and a file's last line
needs no newline.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

_CHUNK = 1 << 26  # bytes compared at once: bounds the temporaries for files of any size


def empty_lines(path: Path, quote: str) -> tuple[np.ndarray, int]:
    """(the 1-based numbers of the empty lines, the number of lines) of a non-empty CSV file.
    Vectorised; it runs only for files with bad rows."""
    data = np.memmap(path, dtype=np.uint8, mode="r")
    quote_byte = quote.encode()
    ends, quotes = [], []
    for a in range(0, len(data), _CHUNK):
        chunk = data[a : a + _CHUNK]
        ends.append(np.flatnonzero(chunk == 10) + a)
        if len(quote_byte) == 1:
            quotes.append(np.flatnonzero(chunk == quote_byte[0]) + a)
    ends = np.concatenate(ends)
    if quotes:  # a newline after an odd number of quotes is inside a quoted field
        ends = ends[np.searchsorted(np.concatenate(quotes), ends) % 2 == 0]
    starts = np.concatenate([[0], ends[:-1] + 1])
    size = ends - starts
    empty = (size == 0) | ((size == 1) & (data[np.maximum(ends - 1, 0)] == 13))  # '\r\n' endings
    unterminated_last = len(ends) == 0 or ends[-1] != len(data) - 1
    return np.flatnonzero(empty) + 1, len(ends) + int(unterminated_last)
