"""Export the synthetic set as a Hugging Face ``imagefolder`` dataset.

``OUT/<label>/<sample_key>.png`` plus ``OUT/metadata.csv`` whose ``file_name`` column is relative
to OUT (``datasets.load_dataset("imagefolder", data_dir=OUT)`` reads it; the ``label`` column
carries the class, since imagefolder does not infer labels from folders when metadata exists), and
``OUT/README.md``, the dataset card (``dermt2im.fidelity.card``): what the images are and are not,
counts, gate and audit, fidelity, provenance, and the terms that follow from the seeds', the base
model's and each imported set's licences. Per image, ``metadata.csv`` also carries the gate's skin
tone and typicality (the ``fidelity`` manifest) and an imported image's licence.
The export is built in a temporary folder beside OUT and renamed into place, so OUT is always
either the previous complete export or the new complete one. OUT is only ever replaced when it is
empty or an earlier export (it holds the ``.dermt2im-export`` marker): any other folder, the workdir,
a folder inside it or one holding it, is refused before anything is written.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import pandas as pd

from dermt2im.core import storage
from dermt2im.core.errors import DermT2imError
from dermt2im.core.fileio import as_new_folder, sha256_bytes, sha256_file
from dermt2im.core.manifest import FIDELITY, manifest_exists, read_manifest
from dermt2im.core.views import seeds_view, synthetic_view
from dermt2im.core.workdir import Workdir

log = logging.getLogger(__name__)

METADATA_COLUMNS = [
    "file_name",
    "label",
    "sample_key",
    "source",
    "prompt",
    "negative_prompt",
    "transformation",
    "sampler",
    "steps",
    "guidance_scale",
    "seed",
    "width",
    "height",
    "lora_scale",
    "lora_sha256",
    "base_model",
    "base_revision",
    "sha256",
    "status",
    "reason",
    "nearest_seed_distance",
    "memorised",
    "ita",
    "skin_tone",
    "typicality",
    "atypical",
    "license",
    "license_note",
    "attribution",
]
MEASURED = ["ita", "skin_tone", "typicality", "atypical"]  # from the gate's fidelity manifest


class ExportError(DermT2imError, ValueError):
    pass


MARKER = ".dermt2im-export"  # says "dermt2im wrote this folder": only such a folder is ever replaced


def _inside(a: Path, b: Path) -> bool:
    return a == b or b in a.parents


def check_target(out: Path, workdir: Path) -> None:
    """Refuse any export target whose replacement could lose files dermt2im did not write."""
    out, workdir = Path(out).resolve(), Path(workdir).resolve()
    if _inside(out, workdir):
        where = "is the workdir" if out == workdir else f"is inside the workdir {workdir}"
        raise ExportError(f"refusing to export to {out}: it {where}; choose a folder outside it")
    if _inside(workdir, out):
        raise ExportError(f"refusing to export to {out}: it holds the workdir {workdir}; choose a folder outside it")
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise ExportError(f"refusing to replace {out}: it holds files dermt2im did not write (no {MARKER} marker); "
                          "choose an empty or new folder")


def select_for_export(df: pd.DataFrame, *, include_rejected: bool = False, include_memorised: bool = False) -> pd.DataFrame:
    if df.empty:
        return df
    assessed = df["status"].isin(["accepted", "rejected"])
    if not assessed.any():
        raise ExportError("no synthetic image has been assessed yet: run `dermt2im quality` first")
    keep = df["status"] == "accepted"
    if include_rejected:
        keep |= df["status"] == "rejected"
    if not include_memorised:
        keep &= ~df["memorised"].fillna(False).astype(bool)
    return df[keep]


def _with_measures(workdir: Workdir, df: pd.DataFrame) -> pd.DataFrame:
    """The gate's per-image skin tone and typicality joined by sample key (where the image is the one measured)."""
    if not manifest_exists(workdir.fidelity_manifest):
        return df.assign(**{c: None for c in MEASURED})
    measured = read_manifest(workdir.fidelity_manifest, FIDELITY)[["sample_key", "sha256", *MEASURED]]
    return df.merge(measured, on=["sample_key", "sha256"], how="left")


def _card(workdir: Workdir, rows: pd.DataFrame, df: pd.DataFrame, *, name: str, base_model: str | None,
          fidelity_csv: str | Path | None, include_rejected: bool) -> str:
    from dermt2im.fidelity.card import CardInputs, card, fidelity_table

    seeds = seeds_view(workdir.seeds_manifest)
    seeds = seeds[seeds["status"] == "accepted"]
    return card(CardInputs(name=name, rows=rows, assessed=df, seeds=seeds, fidelity=fidelity_table(fidelity_csv),
                           base_model=base_model, include_rejected=include_rejected))


def export_imagefolder(
    workdir: Workdir, out: Path, *, include_rejected: bool = False, include_memorised: bool = False,
    base_model: str | None = None, fidelity_csv: str | Path | None = None,
) -> Path:
    """Write accepted (and not memorised) synthetic images as an imagefolder dataset at ``out``, with
    its dataset card.

    ``include_rejected`` adds the rejected ones (their ``status`` / ``reason`` are in the metadata);
    near-copies of seed images stay out unless ``include_memorised`` is also set. ``base_model``: the
    config's ``train.base_model`` (for its licence); ``fidelity_csv``: the fidelity report's table.
    Returns ``out``.
    """
    out = Path(out).expanduser().resolve()
    df = synthetic_view(workdir)
    if df.empty:
        raise ExportError(f"no synthetic images in {workdir.synthetic_manifest}: run `dermt2im generate` first")
    rows = select_for_export(df, include_rejected=include_rejected, include_memorised=include_memorised)
    if rows.empty:
        raise ExportError(
            f"nothing to export: 0 of {len(df)} synthetic images are accepted "
            f"({df['reason'].dropna().str.split(':').str[0].value_counts().to_dict()}); "
            "see W/reports/quality.md, or pass --include-rejected"
        )
    check_target(out, workdir.root)
    rows = _with_measures(workdir, rows)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        records = []
        for r in rows.to_dict("records"):
            src = storage.resolve(r["path"], workdir.root)  # a local path or an image-store URL
            if not storage.is_file(src):
                raise ExportError(f"{r['sample_key']}: {src} is missing (render again with `dermt2im generate`)")
            suffix = Path(str(r["path"])).suffix.lower() or ".png"  # an imported set may hold JPEGs
            rel = f"{r['label']}/{r['sample_key']}{suffix}"
            dst = tmp / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            if storage.is_remote(src):  # one read: the bytes checked are the bytes written
                data = storage.read_bytes(src)
                if r.get("sha256") and sha256_bytes(data) != r["sha256"]:
                    raise ExportError(f"{r['sample_key']}: {src} does not match its recorded sha256")
                dst.write_bytes(data)
            else:
                if r.get("sha256") and sha256_file(src) != r["sha256"]:
                    raise ExportError(f"{r['sample_key']}: {src} does not match its recorded sha256")
                shutil.copyfile(src, dst)
            records.append({**{c: r.get(c) for c in METADATA_COLUMNS}, "file_name": rel,
                            "source": r.get("source") or "dermt2im"})
        meta = pd.DataFrame(records, columns=METADATA_COLUMNS)
        meta.to_csv(tmp / "metadata.csv", index=False)
        made_by = meta.assign(generator=rows["generator"].tolist(), model_hash=rows["model_hash"].tolist())
        (tmp / "README.md").write_text(_card(workdir, made_by, df, base_model=base_model, fidelity_csv=fidelity_csv,
                                             name=f"derm-t2im synthetic dermoscopy ({workdir.root.name})",
                                             include_rejected=include_rejected))
        (tmp / MARKER).write_text(json.dumps({"workdir": str(workdir.root), "images": len(meta),
                                              "made_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}))
        as_new_folder(tmp)
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("exported %d images (%s) to %s", len(meta), meta["label"].value_counts().to_dict(), out)
    return out


def _replace_dir(new: Path, target: Path) -> None:
    """Put ``new`` at ``target``: rename the old folder aside, rename the new one in, then delete the old."""
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
        os.rmdir(old)
        os.replace(target, old)
    try:
        os.replace(new, target)
    except BaseException:
        if old is not None:
            os.replace(old, target)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
