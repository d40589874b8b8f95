"""Where the files come from: a directory, a .zip archive, a single file, or an embedded dataset.

`open_source` yields a `Source`: a directory to look in plus the label that error messages,
`ingest_log.file` and `sources.file` use for each file (the path as the user gave it, so
`ml-1m.zip/ml-1m/ratings.dat:17: ...` points at the right place). A zip is extracted to a
temporary directory that is removed afterwards.
"""

from __future__ import annotations

import hashlib
import tempfile
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from batchrec.errors import BatchrecError

DATASETS_DIR = Path(__file__).resolve().parent.parent / "datasets"
EMBEDDED = ("ml-latest-small",)


@dataclass(frozen=True)
class Source:
    root: Path                     # directory holding the files (possibly an extracted zip)
    label: str                     # how the user named it
    only: Path | None = None       # a single file given directly

    def files(self) -> list[Path]:
        """Every regular file, relative to root, in a stable order (a zip's top folder included)."""
        if self.only is not None:
            return [self.only.relative_to(self.root)]
        return sorted(p.relative_to(self.root) for p in self.root.rglob("*")
                      if p.is_file() and not any(part.startswith((".", "__MACOSX")) for part in p.relative_to(self.root).parts))

    def label_of(self, rel: Path) -> str:
        return self.label if self.only is not None else f"{self.label}/{rel.as_posix()}"


@contextmanager
def open_source(path: str | None, dataset: str | None) -> Iterator[Source]:
    if dataset is not None:
        if dataset not in EMBEDDED:
            raise BatchrecError(f"unknown dataset {dataset!r}, expected one of {', '.join(EMBEDDED)}")
        yield Source(DATASETS_DIR / dataset, dataset)
        return
    p = Path(path)
    if not p.exists():
        raise BatchrecError(f"{path}: no such file or directory, expected a dataset directory or .zip")
    if p.is_dir():
        yield Source(p, path.rstrip("/"))
    elif p.suffix.lower() == ".zip" or zipfile.is_zipfile(p):
        with tempfile.TemporaryDirectory(prefix="batchrec-ingest-") as tmp:
            _extract(p, Path(tmp), path)
            yield Source(Path(tmp), path)
    else:
        yield Source(p.parent, path, only=p)


def _extract(archive: Path, into: Path, label: str) -> None:
    if not zipfile.is_zipfile(archive):
        raise BatchrecError(f"{label}: not a zip archive (no zip directory found), expected a .zip file or a directory")
    try:
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(into)  # drops absolute paths and '..'; a CRC mismatch raises BadZipFile
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise BatchrecError(f"{label}: unreadable zip archive ({exc}), expected an intact .zip file") from None


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def is_utf8(path: Path) -> bool:
    """Whether a (small) metadata file decodes as UTF-8; MovieLens' older releases are latin-1."""
    try:
        path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def first_line(path: Path, encoding: str = "utf-8") -> str:
    with open(path, "rb") as fh:
        return fh.readline(1 << 16).decode(encoding, errors="replace").rstrip("\r\n").lstrip("\ufeff")
