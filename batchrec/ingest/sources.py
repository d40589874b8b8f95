"""Where the files come from: a directory, a .zip archive, a single file, or an embedded dataset.

`open_source` yields a `Source`: the files to look at plus the label that error messages,
`ingest_log.file` and `sources.file` use for each (the path as the user gave it, so
`ml-1m.zip/ml-1m/ratings.dat:17: ...` points at the right place).

A zip is listed, not extracted: a member is extracted (streamed, into a temporary directory that
is removed afterwards) only when a reader asks for it, and it may unzip to at most
`ZipLimits.max_size` bytes and `ZipLimits.max_ratio` times its compressed size (members under
1 MiB are not held to the ratio). Both are counted on the bytes actually written, not on the
sizes the archive claims, so a zip bomb stops at the limit.
"""

from __future__ import annotations

import errno
import hashlib
import re
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from batchrec.errors import BatchrecError

DATASETS_DIR = Path(__file__).resolve().parent.parent / "datasets"
EMBEDDED = ("ml-latest-small",)

ZIP_MAX_SIZE = "8GB"  # the largest member `batchrec ingest` unzips (ml-32m's ratings.csv is 0.9 GB)
ZIP_MAX_RATIO = 100.0  # MovieLens CSVs compress 4-6x; a zip bomb 1000x and more
_RATIO_FLOOR = 1 << 20  # members up to this size are not held to the ratio
_CHUNK = 1 << 20
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?\s*", re.IGNORECASE)


@dataclass(frozen=True)
class ZipLimits:
    max_size: int  # bytes one member may unzip to
    max_ratio: float  # times its compressed size

    @classmethod
    def parse(cls, max_size: str | int, max_ratio: str | float) -> ZipLimits:
        """'8GB' / '512MB' / bytes, and a ratio > 1."""
        m = _SIZE.fullmatch(str(max_size))
        try:
            ratio = float(max_ratio)
        except ValueError:
            ratio = 0.0
        if not m:
            raise BatchrecError(f"--zip-max-size {max_size!r} is not a size (expected e.g. 8GB or 512MB)")
        if not ratio > 1:
            raise BatchrecError(f"--zip-max-ratio {max_ratio!r} is not a number above 1 (expected e.g. 100)")
        return cls(int(float(m[1]) * 1024 ** " KMGT".index(m[2].upper() or " ")), ratio)


@dataclass
class Source:
    root: Path  # directory holding the files (a zip's: where members are extracted)
    label: str  # how the user named it
    only: Path | None = None  # a single file given directly
    archive: zipfile.ZipFile | None = None
    limits: ZipLimits | None = None

    def files(self) -> list[Path]:
        """Every regular file, relative to root, in a stable order (a zip's top folder included)."""
        if self.only is not None:
            return [self.only.relative_to(self.root)]
        if self.archive is not None:
            names = [_member_path(info.filename) for info in self.archive.infolist() if not info.is_dir()]
        else:
            names = [p.relative_to(self.root) for p in self.root.rglob("*") if p.is_file()]
        return sorted(
            rel
            for rel in names
            if rel.parts and not any(part.startswith((".", "__MACOSX")) for part in rel.parts)
        )

    def path(self, rel: Path) -> Path:
        """Where file `rel` is on disk (a zip member is extracted on first use)."""
        path = self.root / rel
        if self.archive is not None and not path.exists():
            info = next(i for i in self.archive.infolist() if _member_path(i.filename) == rel)
            _extract(self.archive, info, path, self.label_of(rel), self.limits)
        return path

    def label_of(self, rel: Path) -> str:
        return self.label if self.only is not None else f"{self.label}/{rel.as_posix()}"


@contextmanager
def open_source(path: str | None, dataset: str | None, limits: ZipLimits) -> Iterator[Source]:
    if dataset is not None:
        if dataset not in EMBEDDED:
            raise BatchrecError(f"unknown dataset {dataset!r} (expected one of {', '.join(EMBEDDED)})")
        yield Source(DATASETS_DIR / dataset, dataset)
        return
    p = Path(path)
    if not p.exists():
        raise BatchrecError(f"{path}: no such file or directory (expected a dataset directory, .zip or file)")
    if p.is_dir():
        yield Source(p, path.rstrip("/"))
    elif p.suffix.lower() == ".zip" or zipfile.is_zipfile(p):
        with _open_zip(p, path) as archive, tempfile.TemporaryDirectory(prefix="batchrec-ingest-") as tmp:
            yield Source(Path(tmp), path, archive=archive, limits=limits)
    else:
        yield Source(p.parent, path, only=p)


@contextmanager
def _open_zip(archive: Path, label: str) -> Iterator[zipfile.ZipFile]:
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise BatchrecError(
            f"{label}: not a zip archive ({exc}) (expected a .zip file or a directory)"
        ) from None
    with zf:
        yield zf


def _member_path(name: str) -> Path:
    """A member's path below the extraction folder: no absolute paths, no '..' (as zipfile.extract)."""
    return Path(
        *[part for part in PurePosixPath(name.replace("\\", "/")).parts if part not in ("/", "..", ".")]
    )


def _extract(zf: zipfile.ZipFile, info: zipfile.ZipInfo, dest: Path, label: str, limits: ZipLimits) -> None:
    """Stream one member to `dest`, stopping at the limits; a CRC mismatch raises BadZipFile."""
    allowed = min(limits.max_size, max(limits.max_ratio * info.compress_size, _RATIO_FLOOR))
    too_big = (
        f"{label}: unzips to more than {_size(allowed)} from {_size(info.compress_size)} compressed "
        f"(expected at most --zip-max-size {_size(limits.max_size)} and --zip-max-ratio "
        f"{limits.max_ratio:g}x; raise them to load it on purpose)"
    )
    if info.file_size > allowed:
        raise BatchrecError(too_big)
    dest.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    try:
        with zf.open(info) as member, open(dest, "wb") as out:
            while chunk := member.read(_CHUNK):
                written += len(chunk)
                if written > allowed:
                    raise BatchrecError(too_big)
                out.write(chunk)
    except (
        zipfile.BadZipFile,
        EOFError,
        NotImplementedError,
        RuntimeError,
    ) as exc:  # RuntimeError: encrypted
        dest.unlink(missing_ok=True)
        raise BatchrecError(
            f"{label}: unreadable zip member ({exc}) (expected an intact .zip file)"
        ) from None
    except OSError as exc:
        dest.unlink(missing_ok=True)
        if exc.errno == errno.ENOSPC:
            raise no_space(dest) from None
        raise
    except BaseException:
        dest.unlink(missing_ok=True)
        raise


def _size(n: float) -> str:
    """Bytes for people: '812 B', '6.1 KiB', '8.0 GiB'."""
    unit = next(u for u in range(4) if n < 1024 ** (u + 1) or u == 3)
    return f"{n:.0f} B" if unit == 0 else f"{n / 1024**unit:.1f} {'KMG'[unit - 1]}iB"


def no_space(path: Path | str) -> BatchrecError:
    """The one-line error for a write that found the disk full."""
    return BatchrecError(f"no space left on device while writing {path}: free space and rerun")


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
