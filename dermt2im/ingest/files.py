"""Reading files: hash every file once, decode each distinct image at most once, keep only the facts."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from dermt2im.core import progress
from dermt2im.core.errors import DecodeError
from dermt2im.core.fileio import sha256_bytes
from dermt2im.core.imaging import decode_image
from dermt2im.ingest.provenance import Generation, describe, read_generation


@dataclass(frozen=True)
class FileFacts:
    """What reading a file told us."""

    sample_id: str | None
    width: int | None = None
    height: int | None = None
    mode: str | None = None
    exif_rotated: bool | None = None
    problem: str | None = None
    # what the metadata says about a generator: "" when nothing, None when not looked at
    provenance: str | None = None
    generation: Generation | None = None  # parsed, when looked at in this run (never cached)

    @property
    def synthetic(self) -> bool:
        return bool(self.provenance)


def provenance_facts(data: bytes) -> FileFacts:
    """What the file's metadata says about a generator (no pixels decoded)."""
    found = read_generation(data)
    return FileFacts(None, provenance=describe(found), generation=found)


def decode_facts(data: bytes, max_pixels: int) -> FileFacts:
    """Decode fully (catching truncation) and keep only the facts, provenance included; the pixels
    are dropped. Runs in many threads at once: ``decode_image`` changes no global Pillow state, and
    Pillow decodes without the GIL."""
    origin = provenance_facts(data)
    try:
        img = decode_image(data, max_pixels=max_pixels)
    except DecodeError as err:
        return replace(origin, problem=str(err))
    except Exception as err:  # noqa: BLE001 - Pillow's parsers raise assorted errors on corrupt headers
        return replace(origin, problem=f"truncated or corrupt image data: {type(err).__name__}: {err}")
    return replace(origin, width=img.width, height=img.height, mode=img.mode, exif_rotated=img.exif_rotated)


class _DecodeOnce:
    """Decode each distinct sample_id once, even when several threads hold identical bytes."""

    def __init__(self, known: Mapping[str, FileFacts], max_pixels: int,
                 decoder: Callable[[bytes, int], FileFacts]) -> None:
        self._known, self._max_pixels, self._decoder = known, max_pixels, decoder
        self._lock = threading.Lock()
        self._results: dict[str, Future[FileFacts]] = {}

    def __call__(self, sample_id: str, data: bytes) -> FileFacts:
        if sample_id in self._known:
            return self._known[sample_id]
        with self._lock:
            future = self._results.get(sample_id)
            owner = future is None
            if owner:
                future = self._results[sample_id] = Future()
        assert future is not None
        if owner:
            future.set_result(self._decoder(data, self._max_pixels))
        return future.result()


def _examine(path: str, decode: bool, decoder: _DecodeOnce) -> FileFacts:
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        return FileFacts(None, problem=f"unreadable file: {err.strerror or err}")
    sample_id = sha256_bytes(data)
    if not decode:  # quarantined for another reason; the metadata is still read, it is cheap
        return replace(provenance_facts(data), sample_id=sample_id)
    return replace(decoder(sample_id, data), sample_id=sample_id)


def examine_files(
    jobs: Sequence[tuple[str, bool]],
    known: Mapping[str, FileFacts],
    max_pixels: int,
    workers: int | None = None,
    description: str = "ingest",
) -> dict[str, FileFacts]:
    """path -> facts for (path, decode?) jobs. Images whose sample_id is in ``known`` are not decoded."""
    decoder = _DecodeOnce(known, max_pixels, decode_facts)
    workers = workers or min(4, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = pool.map(lambda job: _examine(job[0], job[1], decoder), jobs)
        out: dict[str, FileFacts] = {}
        with progress.task(description, total=len(jobs), unit="files") as bar:
            for (path, _), facts in zip(jobs, results):
                out[path] = facts
                bar.advance()
        return out


def _decode_cache(rows: Iterable[Mapping[str, Any]]) -> dict[str, FileFacts]:
    """Image facts already in the manifest, by sample_id: those images need no decoding again.
    Rows from before provenance was read (``provenance`` null) are decoded once more."""
    cache: dict[str, FileFacts] = {}
    for r in rows:
        if (r.get("sample_id") and r.get("width") is not None and r.get("mode") is not None
                and isinstance(r.get("provenance"), str)):
            cache.setdefault(r["sample_id"], FileFacts(r["sample_id"], r["width"], r["height"], r["mode"],
                                                       bool(r["exif_rotated"]), provenance=r["provenance"]))
    return cache
