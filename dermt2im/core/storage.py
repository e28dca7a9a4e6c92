"""Files on any fsspec filesystem: local paths by default, ``s3://`` (through s3fs), ``memory://``, ...

A *location* is a local path (``str`` or ``Path``; ``file://`` URLs count as local) or an fsspec URL
(``protocol://...``). Writes are atomic either way:

* local: temporary name beside the target, then ``os.replace`` (``dermt2im.core.fileio``);
* object stores / other filesystems: the full bytes are staged locally and sent in a single
  put, which S3-compatible stores apply atomically per object (readers see the old object or the
  new one, never a part). Nothing is written remotely when producing the bytes fails.

There is no cross-writer lock on object stores: a read-modify-write of one manifest object there
(``manifest.upsert``) is last-writer-wins. Many writers instead *append* uniquely named parts
(``manifest.append_rows``) that readers merge and one coordinator later folds in
(``manifest.compact``); on local / shared POSIX storage ``manifest.writer_lock`` serialises writers.

Synthetic images can live on such a location too (``storage.images``): the manifest's
``path`` column then holds the image's URL and every reader goes through ``resolve`` /
``is_file`` / ``read_bytes`` / ``sha256`` / ``version_token`` here. So can the manifests
(``storage.manifests``). The workdir itself (config snapshot, lock files, LoRA weights, processed
seeds, reports) stays on a POSIX filesystem that every worker sees.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from dermt2im.core.fileio import (
    atomic_path,
    atomic_write_bytes,
    sha256_bytes,
    sha256_file,
)

__all__ = ["atomic_put_bytes", "atomic_target", "exists", "files_in", "is_file", "is_remote", "join", "local_path",
           "open_read", "read_bytes", "remove", "resolve", "sha256", "to_fs", "version_token"]

Location = str | Path


def _text(loc: Location) -> str:
    return os.fspath(loc)


def is_remote(loc: Location) -> bool:
    """True for fsspec URLs other than ``file://`` (local paths and file URLs are handled natively)."""
    if isinstance(loc, Path):
        return False
    s = _text(loc)
    if "://" not in s:
        return False
    return s.split("://", 1)[0].lower() not in ("file", "local")


def local_path(loc: Location) -> Path:
    """The local path of a local location (a ``file://`` URL is stripped to its path)."""
    s = _text(loc)
    if "://" in s:
        if is_remote(s):
            raise ValueError(f"{s} is not a local path")
        s = s.split("://", 1)[1]
    return Path(s)


def to_fs(loc: Location, **storage_options: Any):
    """``(filesystem, path within it)`` for a location (fsspec's ``url_to_fs``)."""
    from fsspec.core import url_to_fs

    if is_remote(loc):  # other processes write there too: a cached listing would hide their files
        storage_options.setdefault("use_listings_cache", False)
    return url_to_fs(_text(loc), **storage_options)


def exists(loc: Location) -> bool:
    if not is_remote(loc):
        return local_path(loc).exists()
    fs, path = to_fs(loc)
    return fs.exists(path)


def is_file(loc: Location) -> bool:
    """A regular file (local) or an object / file (remote) is at ``loc``."""
    if not is_remote(loc):
        return local_path(loc).is_file()
    fs, path = to_fs(loc)
    return fs.isfile(path)


def resolve(loc: Location, root: Path) -> Location:
    """A path from a manifest made usable: URLs unchanged (``str``), local paths as ``Path``,
    relative ones taken relative to ``root`` (the workdir)."""
    if is_remote(loc):
        return _text(loc)
    p = local_path(loc)
    return p if p.is_absolute() else Path(root) / p


def join(base: Location, *parts: str) -> Location:
    """``base / parts`` for a local path (``Path``) or a URL (``str``, joined with ``/``)."""
    if not is_remote(base):
        return local_path(base).joinpath(*parts)
    return "/".join([_text(base).rstrip("/"), *parts])


def files_in(folder: Location, suffix: str = "") -> list[Location]:
    """The files directly inside ``folder`` whose names end with ``suffix``, sorted by name; names
    starting with "." (temporaries) are left out. An absent folder has none."""
    if not is_remote(folder):
        root = local_path(folder)
        if not root.is_dir():
            return []
        return sorted((p for p in root.iterdir() if p.is_file() and p.name.endswith(suffix)
                       and not p.name.startswith(".")), key=lambda p: p.name)
    fs, path = to_fs(folder)
    try:
        entries = fs.ls(path, detail=True, refresh=True)
    except FileNotFoundError:
        return []
    names = (e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e.get("type") == "file")
    return [join(folder, n) for n in sorted(n for n in names if n.endswith(suffix) and not n.startswith("."))]


def remove(loc: Location) -> None:
    """Delete the file at ``loc``; an absent one is not an error."""
    if not is_remote(loc):
        local_path(loc).unlink(missing_ok=True)
        return
    fs, path = to_fs(loc)
    try:
        fs.rm_file(path)
    except FileNotFoundError:
        pass


def sha256(loc: Location) -> str:
    """The hex sha256 of the file's bytes (local files are streamed)."""
    if not is_remote(loc):
        return sha256_file(local_path(loc))
    return sha256_bytes(read_bytes(loc))


def version_token(loc: Location) -> str | int:
    """Something that changes when the file is replaced (cache keys): ``st_mtime_ns`` locally,
    the filesystem's ``ukey`` (ETag / info hash) remotely. ``FileNotFoundError`` when absent."""
    if not is_remote(loc):
        return Path(local_path(loc)).stat().st_mtime_ns
    fs, path = to_fs(loc)
    if not fs.isfile(path):
        raise FileNotFoundError(_text(loc))
    return str(fs.ukey(path))


@contextmanager
def open_read(loc: Location) -> Iterator[IO[bytes]]:
    """A binary file object for reading (seekable: Parquet readers need it)."""
    if not is_remote(loc):
        with open(local_path(loc), "rb") as fh:
            yield fh
        return
    fs, path = to_fs(loc)
    with fs.open(path, "rb") as fh:
        yield fh


def changed_while_read(err: BaseException) -> bool:
    """An object store saying a file was replaced while it was being read (s3fs: EBUSY): read again."""
    import errno

    return isinstance(err, OSError) and err.errno == errno.EBUSY


def forget_listing(loc: Location) -> None:
    """Drop fsspec's cached listing around a remote location, so the next read sees it as it is now."""
    if is_remote(loc):
        fs, path = to_fs(loc)
        fs.invalidate_cache(path.rsplit("/", 1)[0])


def read_bytes(loc: Location) -> bytes:
    with open_read(loc) as fh:
        return fh.read()


@contextmanager
def atomic_target(loc: Location) -> Iterator[Path]:
    """Yield a local temporary path to write; on success it becomes ``loc`` in one step.

    Local: renamed onto the target (same directory, so atomic). Remote: uploaded with one put of
    the complete file, then the temporary is removed. On an exception nothing reaches ``loc``.
    """
    if not is_remote(loc):
        with atomic_path(local_path(loc)) as tmp:
            yield tmp
        return
    fs, path = to_fs(loc)
    fd, tmp = tempfile.mkstemp(prefix=".dermt2im-put.", suffix=".tmp")
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        _make_parent(fs, path)
        with _naming(loc):
            fs.put_file(str(tmp_path), path)
    finally:
        tmp_path.unlink(missing_ok=True)


# Object stores have no folders to make, and s3fs / gcsfs / adlfs ``makedirs`` would create a missing
# *bucket*: a typo in a URL must fail, not make a new bucket.
_BUCKET_PROTOCOLS = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "oss"})


def _make_parent(fs, path: str) -> None:
    """Create the folder that will hold ``path`` on hierarchical filesystems (memory, sftp, ...)."""
    protocols = {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    if parent and not protocols & _BUCKET_PROTOCOLS:
        fs.makedirs(parent, exist_ok=True)


@contextmanager
def _naming(loc: Location) -> Iterator[None]:
    """Say where a remote write failed: s3fs's "The specified bucket does not exist" names no URL."""
    try:
        yield
    except FileNotFoundError as err:
        raise FileNotFoundError(f"cannot write {_text(loc)}: {err} (check the bucket name and endpoint)") from err


def atomic_put_bytes(loc: Location, data: bytes) -> str | Path:
    """Write ``data`` to ``loc`` atomically (see the module docstring); returns the location."""
    if not is_remote(loc):
        return atomic_write_bytes(local_path(loc), data)
    fs, path = to_fs(loc)
    _make_parent(fs, path)
    with _naming(loc):
        fs.pipe_file(path, bytes(data))  # one request with the full body
    return _text(loc)
