"""Parquet manifests: the only interface between stages.

Each manifest kind has a pyarrow schema carrying its name and version in the schema metadata.
Writes are atomic (temporary name, then rename). ``upsert`` merges new rows into an existing
manifest by its key columns without ever duplicating a row. Files are plain Parquet, readable
by pandas, pyarrow and DuckDB alike.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from dermt2im import storage

SCHEMA_VERSION = 1


class ManifestError(ValueError):
    pass


@dataclass(frozen=True)
class ManifestSchema:
    name: str
    schema: pa.Schema
    key: tuple[str, ...]
    version: int = SCHEMA_VERSION

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
            _s("processed_path"),
            _s("preprocess_key"),  # hash of (sample_id, preprocess params) that produced processed_path
            pa.field("hair_fraction", pa.float64()),
        ]
    ),
)

MANIFESTS: dict[str, ManifestSchema] = {SEEDS.name: SEEDS}


def register(schema: ManifestSchema) -> ManifestSchema:
    MANIFESTS[schema.name] = schema
    return schema


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
    returned as a Path for local paths and unchanged for URLs (``dermt2im.storage``)."""
    table = conform(df, kind)
    dupes = _duplicate_keys(table.to_pandas(), kind)
    if dupes:
        raise ManifestError(f"{kind.name} manifest would hold duplicate keys {kind.key}: {dupes[:3]}")
    with storage.atomic_target(path) as tmp:
        pq.write_table(table, tmp)
    return str(path) if storage.is_remote(path) else storage.local_path(path)


def read_manifest(path: str | Path, kind: ManifestSchema) -> pd.DataFrame:
    """The manifest at a local path or fsspec URL; an empty frame of the schema when there is none."""
    if storage.is_remote(path):
        if not storage.exists(path):
            return kind.empty()
        with storage.open_read(path) as fh:
            table = pq.read_table(fh)
    else:
        path = storage.local_path(path)
        if not path.exists():
            return kind.empty()
        table = pq.read_table(path)
    meta = table.schema.metadata or {}
    name = meta.get(b"dermt2im.manifest", b"").decode()
    version = int(meta.get(b"dermt2im.schema_version", b"0") or 0)
    if name != kind.name:
        raise ManifestError(f"{path} is a {name or 'foreign'} manifest, expected {kind.name}")
    if version > kind.version:
        raise ManifestError(f"{path} has schema version {version}; this dermt2im reads up to {kind.version}")
    df = table.to_pandas()
    for col in kind.columns:  # older versions: add columns introduced since
        if col not in df.columns:
            df[col] = None
    return df[kind.columns]


def _duplicate_keys(df: pd.DataFrame, kind: ManifestSchema) -> list:
    if df.empty:
        return []
    dup = df.duplicated(list(kind.key), keep=False)
    return df.loc[dup, list(kind.key)].drop_duplicates().values.tolist()


def upsert(path: str | Path, rows: pd.DataFrame, kind: ManifestSchema) -> pd.DataFrame:
    """Merge ``rows`` into the manifest at ``path`` by key: new keys are appended, existing keys
    are replaced by the new row. Row order is stable (existing rows first). Returns the result."""
    existing = read_manifest(path, kind)
    new = conform(rows, kind).to_pandas()
    if _duplicate_keys(new, kind):
        raise ManifestError(f"rows for {kind.name} repeat a key: {_duplicate_keys(new, kind)[:3]}")
    if existing.empty or new.empty:
        merged = new if existing.empty else existing
    else:
        key = list(kind.key)
        new_keys = [tuple(r) for r in new[key].itertuples(index=False, name=None)]
        position = {k: i for i, k in enumerate(new_keys)}
        old_keys = [tuple(r) for r in existing[key].itertuples(index=False, name=None)]
        old_set = set(old_keys)
        # replaced rows keep the position of the row they replace; new keys are appended
        pieces = [new.iloc[[position[k]]] if k in position else existing.iloc[[i]] for i, k in enumerate(old_keys)]
        pieces.append(new.iloc[[i for i, k in enumerate(new_keys) if k not in old_set]])
        merged = pd.concat([p for p in pieces if not p.empty], ignore_index=True)
    write_manifest(merged, path, kind)
    return read_manifest(path, kind)


def digest(path: str | Path, kind: ManifestSchema, columns: list[str] | None = None) -> str:
    """Content hash of a manifest independent of row order and file encoding (for cache keys)."""
    df = read_manifest(path, kind)
    cols = columns or kind.columns
    df = df[cols].sort_values(list(k for k in kind.key if k in cols) or cols).reset_index(drop=True)
    h = hashlib.sha256()
    h.update(",".join(cols).encode())
    h.update(pd.util.hash_pandas_object(df.astype("string").fillna("\x00"), index=False).values.tobytes())
    return h.hexdigest()


# Owned by the generation stage (dermt2im.generation); read by quality, validation and export.
PLAN = register(
    ManifestSchema(
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
)

SYNTHETIC = register(
    ManifestSchema(
        name="synthetic",
        key=("sample_key",),
        schema=pa.schema(
            PLAN.schema.remove(PLAN.schema.get_field_index("shard"))
            .append(pa.field("shard", pa.int64()))
            .append(_s("path"))  # absolute path of the PNG (W/synthetic/<label>/<sample_key>.png)
            .append(_s("sha256"))
            .append(_s("base_model"))  # content identity (dermt2im.models.base_model_identity)
            .append(_s("base_revision"))
            .append(_s("lora_path"))  # weights file used for this label; null when rendered with the base model
            .append(_s("lora_sha256"))
            .append(_s("library_versions"))  # JSON: torch, diffusers, peft, transformers, python
            .append(_s("status"))  # rendered (not yet assessed) | accepted | rejected
            .append(_s("reason"))
            .append(pa.field("sharpness", pa.float64()))
            .append(pa.field("high_frequency_ratio", pa.float64()))
            .append(pa.field("lesion_fraction", pa.float64()))
            .append(_s("phash"))
            .append(_s("nearest_seed"))  # sample_id of the closest seed image
            .append(pa.field("nearest_seed_distance", pa.float64()))
            .append(pa.field("memorised", pa.bool_()))
            # sha256 of (render parameters, base model identity, LoRA sha256): what the pixels depend on
            .append(_s("render_key"))
            .append(_s("dtype"))  # torch dtype the pipeline ran in (fp16 and fp32 give different pixels)
            .append(_s("device"))  # cpu | cuda (+ device name)
            .append(pa.field("grey_std", pa.float64()))
            .append(pa.field("saturated_fraction", pa.float64()))
            .append(pa.field("lesion_contrast", pa.float64()))
            .append(_s("duplicate_of"))  # sample_key of the kept image for exact / near duplicates
        ),
    )
)

# Test sets are ingested like seeds, into W/manifests/test_sets/<name>.parquet.
TEST_SET = SEEDS
