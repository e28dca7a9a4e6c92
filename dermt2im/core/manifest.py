"""Parquet manifests: the only interface between stages.

Each manifest kind has a pyarrow schema carrying its name and version in the schema metadata.
Writes are atomic (temporary name, then rename). ``upsert`` merges new rows into an existing
manifest by its key columns without ever duplicating a row. Files are plain Parquet, readable
by pandas, pyarrow and DuckDB alike. A manifest is a local path or an fsspec URL (``s3://...``).

Every manifest has one writer, the stage named beside its schema below. A stage that adds columns
to another stage's rows writes a table of its own keyed by the row's id, and readers join
(``dermt2im.core.views``):

=================================  ===================  =========================================
manifest                           written by           keyed by
=================================  ===================  =========================================
``seeds.parquet``, ``test_sets/``  ingest               ``source_path``
``processed/<dataset>.parquet``    preprocess           ``source_path`` (of the ingested row)
``plan.parquet``                   generate             ``sample_key``
``synthetic.parquet``              generate             ``sample_key`` (the renders)
``imported.parquet``               import-synthetic     ``sample_key`` (external sets)
``quality.parquet``                quality              ``sample_key`` (of a render or import)
``flag_rates.parquet``             quality              ``images``, ``label``
``fidelity.parquet``               quality              ``sample_key`` (typicality, skin tone)
=================================  ===================  =========================================

Many writers of one stage at once (scale-out generation): ``dermt2im.core.writers``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from dermt2im.core import storage
from dermt2im.core.errors import ManifestError

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class ManifestSchema:
    name: str
    schema: pa.Schema
    key: tuple[str, ...]
    version: int = SCHEMA_VERSION
    optional: tuple[str, ...] = ()  # columns added since the first version: absent in older files

    @property
    def arrow(self) -> pa.Schema:
        return self.schema.with_metadata(
            {b"dermt2im.manifest": self.name.encode(), b"dermt2im.schema_version": str(self.version).encode()}
        )

    @property
    def columns(self) -> list[str]:
        return self.schema.names

    def empty(self) -> pd.DataFrame:
        return self.arrow.empty_table().to_pandas()


def _s(name: str) -> pa.Field:
    return pa.field(name, pa.string())


SEEDS = ManifestSchema(
    name="seeds",
    key=("source_path",),
    schema=pa.schema(
        [
            _s("sample_id"),  # sha256 of the file's bytes; null when the file is missing or unreadable
            _s("source_path"),  # absolute path of the original file (or of the missing file a CSV named)
            _s("source_root"),
            _s("dataset"),  # detected / given layout: isic, ham10000, folders, csv
            _s("label"),  # benign | malignant | null
            _s("diagnosis"),
            _s("lesion_id"),
            pa.field("width", pa.int64()),
            pa.field("height", pa.int64()),
            _s("mode"),  # PIL mode as decoded, before conversion to RGB
            pa.field("exif_rotated", pa.bool_()),
            _s("status"),  # accepted | quarantined
            _s("reason"),
            _s("duplicate_of"),  # source_path of the accepted copy for byte-identical duplicates
            _s("split"),  # train | val | test, for accepted rows
            # generator named by the file's metadata ("AUTOMATIC1111, Steps 20, ..."; such rows are
            # quarantined as synthetic); "" when it names none; null in manifests made before
            _s("provenance"),
            # the licence the source states (dermt2im.ingest.licences): CC0-1.0, CC-BY-NC-4.0, ..., other
            # or unknown; where it was read with the text as found; the attribution asked for
            _s("license"),
            _s("license_note"),
            _s("attribution"),
            # where the file really is when a symbolic link leads there (source_path is the link); null otherwise
            _s("link_target"),
        ]
    ),
    optional=("link_target", "license", "license_note", "attribution"),
)

# What preprocess made of each row of a seeds or test-set manifest (dermt2im.preprocess.stage),
# beside it in processed/<the same name>: the row's id, the bytes it saw, and the outcome.
PROCESSED = ManifestSchema(
    name="processed",
    key=("source_path",),
    schema=pa.schema(
        [
            _s("source_path"),  # the ingested row it belongs to
            _s("sample_id"),  # the bytes it processed: a row whose file changed since is joined to nothing
            # processed | failed (a lasting verdict for these bytes and this key) | unreadable (the file
            # could not be read: a share away, a permission being fixed; the next preprocess tries again)
            _s("status"),
            _s("reason"),
            _s("processed_path"),
            _s("preprocess_key"),  # hash of (sample_id, preprocess params, code) that produced processed_path
            pa.field("hair_fraction", pa.float64()),
            # share of pixels hair removal moved by more than 10 grey levels (the preprocess report's figure)
            pa.field("hair_changed_fraction", pa.float64()),
        ]
    ),
)


def processed_location(manifest: str | Path) -> str | Path:
    """Where preprocess records what it made of the rows of ``manifest``: ``processed/<name>`` beside it."""
    if storage.is_remote(manifest):
        parent, _, name = str(manifest).rstrip("/").rpartition("/")
        return f"{parent}/processed/{name}"
    p = storage.local_path(manifest)
    return p.parent / "processed" / p.name


def conform(df: pd.DataFrame, kind: ManifestSchema) -> pa.Table:
    """Cast a frame to the manifest's schema: missing columns become null, unknown ones are an error."""
    unknown = [c for c in df.columns if c not in kind.columns]
    if unknown:
        raise ManifestError(f"{kind.name} manifest has no column(s) {unknown}")
    df = df.copy()
    for col in kind.columns:
        if col not in df.columns:
            df[col] = None
    df = df[kind.columns]
    try:
        return pa.Table.from_pandas(df, schema=kind.arrow, preserve_index=False)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as err:
        raise ManifestError(f"rows do not fit the {kind.name} schema: {err}") from err


def write_manifest(df: pd.DataFrame, path: str | Path, kind: ManifestSchema) -> Path | str:
    """Write atomically; ``path`` is a local path or an fsspec URL (``s3://...``, ``memory://...``),
    returned as a Path for local paths and unchanged for URLs (``dermt2im.core.storage``)."""
    table = conform(df, kind)
    dupes = _duplicate_keys(table.to_pandas(), kind)
    if dupes:
        raise ManifestError(f"{kind.name} manifest would hold duplicate keys {kind.key}: {dupes[:3]}")
    with storage.atomic_target(path) as tmp:
        pq.write_table(table, tmp)
    return str(path) if storage.is_remote(path) else storage.local_path(path)


class _ReplacedWhileRead(Exception):
    """A compaction replaced the file while it was being read (object stores): read it again."""


def _read_file(path: str | Path, kind: ManifestSchema) -> pd.DataFrame | None:
    """One Parquet file of ``kind`` (base or part); None when it does not exist."""
    try:
        if storage.is_remote(path):
            with storage.open_read(path) as fh:
                table = pq.read_table(fh)
        else:  # one handle: by path, pyarrow may size the file and read it apart, across a replace
            with pa.OSFile(str(storage.local_path(path))) as fh:
                table = pq.read_table(fh)
    except FileNotFoundError:
        return None
    except OSError as err:
        if storage.changed_while_read(err):
            raise _ReplacedWhileRead(str(path)) from None
        if err.errno is not None:  # the system's word: permission denied, an I/O error, ...
            raise ManifestError(f"{path} cannot be read ({err.strerror or err}); check that it is there and readable")
        raise _damaged(path, kind, err) from None  # pyarrow's: a page cut short
    except pa.ArrowInvalid as err:  # cut short, zero bytes, not Parquet at all
        raise _damaged(path, kind, err) from None
    meta = table.schema.metadata or {}
    name = meta.get(b"dermt2im.manifest", b"").decode()
    version = int(meta.get(b"dermt2im.schema_version", b"0") or 0)
    if name != kind.name:
        raise ManifestError(f"{path} is a {name or 'foreign'} manifest, expected {kind.name}")
    if version > kind.version:
        raise ManifestError(f"{path} has schema version {version}; this dermt2im reads up to {kind.version}")
    df = table.to_pandas()
    lost = [c for c in kind.columns if c not in df.columns and c not in kind.optional]
    if lost:
        raise ManifestError(
            f"{path} lacks the column(s) {', '.join(lost)} that every {kind.name} manifest has: it was damaged or "
            f"not written by dermt2im; delete it and run again the stage that writes it ({_WRITER[kind.name]})"
        )
    for col in kind.optional:  # columns introduced after the file was written
        if col not in df.columns:
            df[col] = None
    return df[kind.columns]


def _damaged(path: str | Path, kind: ManifestSchema, err: BaseException) -> ManifestError:
    return ManifestError(
        f"{path} cannot be read as a {kind.name} manifest ({str(err).strip()[:160]}): the file is damaged; "
        f"restore it from a copy, or delete it and run again the stage that writes it ({_WRITER[kind.name]})"
    )


# Which command writes each manifest, for error messages.
_WRITER = {"seeds": "`dermt2im ingest`", "processed": "`dermt2im preprocess`", "plan": "`dermt2im generate`",
           "synthetic": "`dermt2im generate`", "imported": "`dermt2im import-synthetic`",
           "quality": "`dermt2im quality`", "flag_rates": "`dermt2im quality`",
           "fidelity": "`dermt2im quality`"}


def parts_folder(path: str | Path) -> str | Path:
    """Where appended parts of the manifest at ``path`` live: ``<path>.parts/``."""
    if storage.is_remote(path):
        return f"{str(path).rstrip('/')}.parts"
    p = storage.local_path(path)
    return p.with_name(p.name + ".parts")


def pending_parts(path: str | Path) -> list[str | Path]:
    """Parts appended to the manifest and not yet compacted, oldest first."""
    return storage.files_in(parts_folder(path), ".parquet")


def _read_with_parts(path: str | Path, kind: ManifestSchema) -> tuple[pd.DataFrame, list[str | Path]]:
    """The base merged with its parts, and the parts that went into it.

    Parts are listed before the base is read: a part compacted meanwhile is then either in the base
    already or gone when read, and a vanished part, or a base replaced while it was read, makes the
    whole read start again.
    """
    for _attempt in range(5):
        parts = pending_parts(path)
        try:
            base = _read_file(path, kind)
            appended = [_read_file(part, kind) for part in parts]
        except _ReplacedWhileRead:
            storage.forget_listing(path)
            continue
        frame = kind.empty() if base is None else base
        if any(rows is None for rows in appended):  # compacted under our feet: read again
            continue
        if appended:
            frame = _merge(frame, _latest_per_key(pd.concat(appended, ignore_index=True), kind), kind)
        return frame, parts
    raise ManifestError(f"{path}: parts kept changing while reading; try again")


def _latest_per_key(rows: pd.DataFrame, kind: ManifestSchema) -> pd.DataFrame:
    """One row per key: the last one, at the position of the key's first row (what merging the rows
    one after the other would give)."""
    codes = _key_index(rows, list(kind.key)).factorize()[0]  # numbered in order of first appearance
    last = pd.Series(np.arange(len(rows))).groupby(codes).max()  # by code: first-appearance order
    return rows.iloc[last.to_numpy()].reset_index(drop=True)


def _key_index(df: pd.DataFrame, key: list[str]) -> pd.Index:
    return pd.MultiIndex.from_frame(df[key]) if len(key) > 1 else pd.Index(df[key[0]])


def manifest_exists(path: str | Path) -> bool:
    """A base file or at least one appended part is there."""
    return storage.is_file(path) or bool(pending_parts(path))


def read_manifest(path: str | Path, kind: ManifestSchema) -> pd.DataFrame:
    """The manifest at a local path or fsspec URL, with any appended parts merged in; an empty frame
    of the schema when there is none."""
    return _read_with_parts(path, kind)[0]


def _duplicate_keys(df: pd.DataFrame, kind: ManifestSchema) -> list:
    if df.empty:
        return []
    dup = df.duplicated(list(kind.key), keep=False)
    return df.loc[dup, list(kind.key)].drop_duplicates().values.tolist()


def _merge(existing: pd.DataFrame, rows: pd.DataFrame, kind: ManifestSchema) -> pd.DataFrame:
    """``existing`` with ``rows`` merged in by key: replaced rows keep their position, new keys are
    appended in order."""
    new = conform(rows, kind).to_pandas()
    if _duplicate_keys(new, kind):
        raise ManifestError(f"rows for {kind.name} repeat a key: {_duplicate_keys(new, kind)[:3]}")
    if existing.empty or new.empty:
        return new if existing.empty else existing
    key = list(kind.key)
    where = _key_index(new, key).get_indexer(_key_index(existing, key))  # row of `new` replacing it, or -1
    replaced = where >= 0
    order = np.empty(len(new), dtype=np.int64)
    order[where[replaced]] = np.flatnonzero(replaced)  # a replacing row takes the old row's place
    appended = np.ones(len(new), dtype=bool)
    appended[where[replaced]] = False
    order[appended] = len(existing) + np.arange(int(appended.sum()))  # new keys go last, in order
    kept = existing.loc[~replaced].assign(_order=np.flatnonzero(~replaced))
    merged = pd.concat([kept, new.assign(_order=order)], ignore_index=True)
    return merged.sort_values("_order", kind="stable").drop(columns="_order").reset_index(drop=True)


def _rewrite(path: str | Path, kind: ManifestSchema,
             change: Callable[[pd.DataFrame], pd.DataFrame]) -> tuple[pd.DataFrame, list[str | Path]]:
    current, parts = _read_with_parts(path, kind)
    table = conform(change(current), kind)
    write_manifest(table.to_pandas(), path, kind)
    for part in parts:
        storage.remove(part)
    return table.to_pandas(), parts


def rewrite(path: str | Path, kind: ManifestSchema, change: Callable[[pd.DataFrame], pd.DataFrame]) -> pd.DataFrame:
    """Read the manifest (parts included), write ``change(frame)`` as the new base, then delete the
    parts that were read; returns what was written. One rewriter per manifest at a time (see the
    module docstring)."""
    return _rewrite(path, kind, change)[0]


def upsert(path: str | Path, rows: pd.DataFrame, kind: ManifestSchema) -> pd.DataFrame:
    """Merge ``rows`` into the manifest at ``path`` by key: new keys are appended, existing keys
    are replaced by the new row. Row order is stable (existing rows first). Returns the result."""
    conform(rows, kind)  # fail before touching anything
    return rewrite(path, kind, lambda current: _merge(current, rows, kind))


# Owned by the generation stage (dermt2im.generate.stage); read by quality, validation and export.
PLAN = ManifestSchema(
        name="plan",
        key=("sample_key",),
        schema=pa.schema(
            [
                _s("sample_key"),  # e.g. "benign-000017": stable for a given (label, index)
                _s("label"),
                pa.field("index", pa.int64()),  # position within its class; extending the plan appends
                _s("prompt"),
                _s("negative_prompt"),
                _s("transformation"),
                _s("sampler"),
                pa.field("steps", pa.int64()),
                pa.field("guidance_scale", pa.float64()),
                pa.field("lora_scale", pa.float64()),
                pa.field("seed", pa.int64()),
                pa.field("width", pa.int64()),
                pa.field("height", pa.int64()),
                pa.field("shard", pa.int64()),
            ]
        ),
)

# The factory's renders, one row per image, with everything needed to render it again. Written by
# generate only; ``status`` is how the image came in: rendered (imports: or quarantined as bad input).
_MADE = (
    PLAN.schema.remove(PLAN.schema.get_field_index("shard"))
    .append(pa.field("shard", pa.int64()))
    .append(_s("path"))  # absolute path of the PNG (W/synthetic/<label>/<sample_key>.png)
    .append(_s("sha256"))
    .append(_s("base_model"))  # content identity (dermt2im.diffusion.models.base_model_identity)
    .append(_s("base_revision"))
    .append(_s("lora_path"))  # weights file used for this label; null when rendered with the base model
    .append(_s("lora_sha256"))
    .append(_s("library_versions"))  # JSON: torch, diffusers, peft, transformers, python
    .append(_s("status"))  # rendered | quarantined (an imported file with bad input: never assessed)
    .append(_s("reason"))
    # sha256 of (render parameters, base model identity, LoRA sha256, code): what the pixels depend on
    .append(_s("render_key"))
    .append(_s("dtype"))  # torch dtype the pipeline ran in (fp16 and fp32 give different pixels)
    .append(_s("device"))  # cpu | cuda (+ device name)
    # rendered with the base model alone (--base-model-only): no lesion of a class, never trained on
    .append(pa.field("base_model_only", pa.bool_()))
    # "dermt2im" for the factory's own renders (null in older manifests: the same), else the
    # name given to `dermt2im import-synthetic`; imported rows carry what their metadata said
    .append(_s("source"))
    .append(_s("generator"))  # AUTOMATIC1111, ComfyUI, ... (imports)
    .append(_s("model_hash"))
    .append(_s("generation_parameters"))  # the metadata text as found
    # the size of the batch the image was rendered in and its place there (pixels depend on both,
    # slightly): generate.pipeline.render_as_recorded renders it again as it was
    .append(pa.field("batch_size", pa.int64()))
    .append(pa.field("batch_position", pa.int64()))
    # an imported set's licence as its source states it (dermt2im.ingest.licences); null for renders
    .append(_s("license"))
    .append(_s("license_note"))
    .append(_s("attribution"))
)

_MADE_OPTIONAL = ("base_model_only", "batch_size", "batch_position", "license", "license_note", "attribution")
SYNTHETIC = ManifestSchema(name="synthetic", key=("sample_key",), schema=_MADE,
                           optional=_MADE_OPTIONAL)

# External synthetic sets (dermt2im.generate.imports): the same columns, written by import-synthetic only.
IMPORTED = ManifestSchema(name="imported", key=("sample_key",), schema=_MADE,
                          optional=_MADE_OPTIONAL)

# The quality gate's verdict on each image (dermt2im.quality), keyed by the image's sample_key and
# holding the sha256 it assessed: a verdict on bytes that have changed since is joined to nothing.
QUALITY = ManifestSchema(
    name="quality",
    key=("sample_key",),
    schema=pa.schema(
        [
            _s("sample_key"),
            _s("sha256"),
            _s("status"),  # accepted | rejected
            _s("reason"),  # why rejected: its first word is the check that failed
            pa.field("grey_std", pa.float64()),
            pa.field("saturated_fraction", pa.float64()),
            pa.field("sharpness", pa.float64()),
            pa.field("high_frequency_ratio", pa.float64()),
            pa.field("lesion_fraction", pa.float64()),
            pa.field("lesion_contrast", pa.float64()),
            # the gate's detectors (dermt2im.quality.checks): each score, and the comma-separated flags
            pa.field("face_score", pa.float64()),
            pa.field("text_score", pa.float64()),
            pa.field("ruler_score", pa.float64()),
            pa.field("ink_score", pa.float64()),
            pa.field("frame_score", pa.float64()),
            pa.field("hair_fraction", pa.float64()),
            _s("flags"),
            _s("phash"),
            _s("duplicate_of"),  # sample_key of the kept image for exact / near duplicates
            _s("nearest_seed"),  # sample_id of the closest seed image
            pa.field("nearest_seed_distance", pa.float64()),
            pa.field("memorised", pa.bool_()),
            pa.field("audit_inliers", pa.int64()),  # SIFT matches verified with the nearest seed
            _s("audit_method"),  # geometric | global
        ]
    ),
)

# The shortcut audit (dermt2im.quality.shortcuts), beside the verdicts: per image set (a synthetic
# source, or the real seeds) and class, how many images and the rate of each flag among them.
_FLAGS = ("ruler", "ink", "frame", "hair", "text")
FLAG_RATES = ManifestSchema(
    name="flag_rates",
    key=("images", "label"),
    schema=pa.schema(
        [_s("images"), _s("label"), pa.field("n", pa.int64())]
        + [pa.field(f, pa.float64()) for f in _FLAGS]
        + [pa.field(f"{f}_n", pa.int64()) for f in _FLAGS]
        # the flags called out for this set, on the row of the class with the higher rate ("; " between)
        + [_s("shortcut")]
    ),
)

# Owned by the quality gate (dermt2im.quality.stage, computed by dermt2im.fidelity.measures): each assessed
# image's typicality and skin tone, keyed like the synthetic manifest; the fidelity report and export join it.
FIDELITY = ManifestSchema(
    name="fidelity",
    key=("sample_key",),
    schema=pa.schema(
        [
            _s("sample_key"),
            _s("sha256"),  # the image measured
            _s("source"),
            _s("label"),
            # mean distance to the nearest training seeds in the learned seed embedding
            pa.field("typicality_distance", pa.float64()),
            # share of held-out real images at least as far from the seeds (1 typical ... 0 beyond all)
            pa.field("typicality", pa.float64()),
            pa.field("atypical", pa.bool_()),
            pa.field("ita", pa.float64()),  # individual typology angle of the skin around the lesion
            _s("skin_tone"),  # its category: very light ... dark, or undefined
            pa.field("skin_fraction", pa.float64()),
            _s("embedding"),  # which embedding typicality was measured in (name and key)
        ]
    ),
)
