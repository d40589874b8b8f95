"""Where shard files and model artifacts live: a local path, a `file://` URI or an object store
(`s3://bucket/prefix`), all through `pyarrow.fs`, so every step that reads or writes them works
the same on a laptop, a shared file system and S3-compatible storage.

S3 settings come from the usual environment variables, read when a location is opened:
`AWS_ENDPOINT_URL` (e.g. `http://127.0.0.1:9000` for MinIO or moto; its scheme picks http or
https), `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY` / `AWS_SESSION_TOKEN`, `AWS_REGION` (or
`AWS_DEFAULT_REGION`). Without keys pyarrow's default AWS chain applies (profiles, instance roles).

Writes are whole-or-nothing: a local file is written under a temporary name and renamed; an
object store makes an object visible only when its upload completes. So a killed writer never
leaves a half file under the final name, wherever the location is.
"""

from __future__ import annotations

import os
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from batchrec.errors import BatchrecError

SCHEMES = ("file", "s3")


def is_remote(uri: str | os.PathLike) -> bool:
    """Whether `uri` names an object store (anything with a scheme other than file://)."""
    text = str(uri)
    return "://" in text and not text.startswith("file://")


def _s3_filesystem() -> pafs.S3FileSystem:
    """An S3 file system configured from the environment (see the module docstring)."""
    settings: dict = {}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
        settings |= {"endpoint_override": parsed.netloc + parsed.path.rstrip("/"), "scheme": parsed.scheme}
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        settings["region"] = region
    if os.environ.get("AWS_ACCESS_KEY_ID") and os.environ.get("AWS_SECRET_ACCESS_KEY"):
        settings |= {
            "access_key": os.environ["AWS_ACCESS_KEY_ID"],
            "secret_key": os.environ["AWS_SECRET_ACCESS_KEY"],
        }
        if os.environ.get("AWS_SESSION_TOKEN"):
            settings["session_token"] = os.environ["AWS_SESSION_TOKEN"]
    # Fail in seconds, not minutes, when the endpoint is down: the error names the location.
    return pafs.S3FileSystem(connect_timeout=5, request_timeout=60, **settings)


@dataclass(frozen=True)
class Location:
    """A file or folder on some file system: `fs` and `path` for pyarrow, `uri` as the user wrote
    it (what messages and `model_runs` show)."""

    fs: pafs.FileSystem
    path: str
    uri: str

    @property
    def local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    @property
    def name(self) -> str:
        return self.path.rstrip("/").rsplit("/", 1)[-1]

    def __truediv__(self, name: str) -> Location:
        return Location(self.fs, f"{self.path.rstrip('/')}/{name}", f"{self.uri.rstrip('/')}/{name}")

    def __str__(self) -> str:
        return self.uri


def location(uri: str | os.PathLike | Location) -> Location:
    """The `Location` a path or URI names: a local path (relative ones resolved against the
    current folder), `file:///abs/path`, or `s3://bucket/prefix`. Any other scheme is a one-line
    error naming the supported ones."""
    if isinstance(uri, Location):
        return uri
    text = str(uri)
    if "://" not in text:
        path = Path(text).expanduser().resolve()
        return Location(pafs.LocalFileSystem(), path.as_posix(), str(path))
    scheme, _, rest = text.partition("://")
    if scheme == "file":
        path = Path(rest).resolve()
        return Location(pafs.LocalFileSystem(), path.as_posix(), text)
    if scheme == "s3":
        if not rest.strip("/"):
            raise BatchrecError(f"{text}: no bucket named (expected s3://bucket/prefix)")
        return Location(_s3_filesystem(), rest.rstrip("/"), text.rstrip("/"))
    raise BatchrecError(f"{text}: unsupported storage scheme {scheme}:// (expected a path, file:// or s3://)")


def _fail(what: str, loc: Location, exc: BaseException) -> BatchrecError:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return BatchrecError(f"{what} {loc.uri} failed: {lines[0] if lines else type(exc).__name__}")


def exists(loc: Location) -> bool:
    try:
        return loc.fs.get_file_info(loc.path).type != pafs.FileType.NotFound
    except OSError as exc:
        raise _fail("looking up", loc, exc) from None


def files(folder: Location, prefix: str = "", suffix: str = "") -> list[Location]:
    """The files directly in `folder` whose names start with `prefix` and end with `suffix`,
    sorted by name; none when the folder does not exist."""
    try:
        infos = folder.fs.get_file_info(pafs.FileSelector(folder.path, allow_not_found=True))
    except OSError as exc:
        raise _fail("listing", folder, exc) from None
    names = sorted(i.base_name for i in infos if i.type == pafs.FileType.File)
    return [folder / n for n in names if n.startswith(prefix) and n.endswith(suffix)]


def delete(loc: Location) -> None:
    try:
        loc.fs.delete_file(loc.path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise _fail("deleting", loc, exc) from None


def _tmp_name(loc: Location) -> Location:
    parent = loc.path.rsplit("/", 1)[0]
    name = f".{loc.name}.{os.getpid()}@{socket.gethostname()}.tmp"
    return Location(loc.fs, f"{parent}/{name}", f"{loc.uri.rsplit('/', 1)[0]}/{name}")


def write_table(table: pa.Table, loc: Location) -> Location:
    """Write `table` as Parquet at `loc`, whole or not at all (see the module docstring)."""
    parent = loc.path.rsplit("/", 1)[0]
    try:
        loc.fs.create_dir(parent, recursive=True)
        if not loc.local:  # an object appears only when its upload completes
            pq.write_table(table, loc.path, filesystem=loc.fs)
            return loc
        tmp = _tmp_name(loc)
        try:
            pq.write_table(table, tmp.path, filesystem=loc.fs)
            loc.fs.move(tmp.path, loc.path)
        except BaseException:
            delete(tmp)
            raise
    except OSError as exc:
        if loc.local:
            raise  # a full or read-only local disk: errors.as_fault says so in one line
        raise _fail("writing", loc, exc) from None
    return loc


def read_schema(loc: Location) -> pa.Schema:
    with loc.fs.open_input_file(loc.path) as f:
        return pq.read_schema(f)


def read_tables(locs: list[Location], columns: list[str] | None = None) -> pa.Table:
    """The rows of Parquet files (all on one file system) as one Arrow table."""
    if not locs:
        return pa.table({})
    # no partitioning: the folder names (run_id=...) must not become columns
    return pq.read_table(
        [loc.path for loc in locs], filesystem=locs[0].fs, columns=columns, partitioning=None
    )


def upload_dir(local: Path, dest: Location) -> None:
    """Copy the files of local folder `local` to `dest` (files in sorted order: name the one that
    marks a complete copy last, see `put_files`)."""
    put_files(sorted(p for p in local.iterdir() if p.is_file()), dest)


def put_files(paths: list[Path], dest: Location) -> None:
    """Copy local files into folder `dest`, in the order given."""
    try:
        dest.fs.create_dir(dest.path, recursive=True)
        for p in paths:
            with open(p, "rb") as src, dest.fs.open_output_stream((dest / p.name).path) as out:
                shutil.copyfileobj(src, out, 8 << 20)
    except OSError as exc:
        if dest.local:
            raise
        raise _fail("uploading to", dest, exc) from None


def download_dir(src: Location, local: Path) -> Path:
    """Copy the files of folder `src` into local folder `local` (created)."""
    local.mkdir(parents=True, exist_ok=True)
    try:
        for f in files(src):
            with f.fs.open_input_stream(f.path) as inp, open(local / f.name, "wb") as out:
                shutil.copyfileobj(inp, out, 8 << 20)
    except OSError as exc:
        raise _fail("downloading", src, exc) from None
    return local
