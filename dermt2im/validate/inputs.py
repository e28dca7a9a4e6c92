"""What validation trains and tests on: the seeds' real train / val splits, the usable synthetic
images, and every unseen real test set, checked for leakage before anything is trained.

- Training data: the seeds' ``train`` split (real) and usable synthetic images, mixed per regime
  (``regimes``). Early stopping uses the seeds' ``val`` split (real images only).
- Test sets: every named real test set and the seeds' own ``test`` split ("seeds-test"). None of
  them is used for training or model selection, and no ``lesion_id`` (nor the same image) may be
  both in a test set and in the train / val data: that is a ``ValidationError`` naming the lesion.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from dermt2im.core import identity, storage
from dermt2im.core.errors import DermT2imError, ManifestError
from dermt2im.core.manifest import manifest_exists
from dermt2im.core.views import seeds_view, synthetic_view
from dermt2im.core.specs import LABELS
from dermt2im.core.tracking import metric_key
from dermt2im.core.workdir import Workdir
from dermt2im.validate import regimes as rg

log = logging.getLogger(__name__)

SEEDS_TEST = "seeds-test"


class ValidationError(DermT2imError, ValueError):
    """The validation cannot run as asked; the message says why and what to do."""


@dataclass(frozen=True, eq=False)
class TestSet:
    name: str
    manifest: str
    rows: pd.DataFrame  # path, label, lesion_id, sample_id, key
    digest: str


@dataclass(frozen=True, eq=False)
class ValidationInputs:
    real_train: pd.DataFrame
    real_val: pd.DataFrame
    synthetic: pd.DataFrame  # usable rows only (path, label, source)
    synthetic_note: str
    test_sets: dict[str, TestSet]
    seeds_digest: str
    synthetic_digest: str
    synthetic_sources: tuple[str, ...] = ()  # every source in the synthetic manifest, usable or not


def _with_keys(df: pd.DataFrame) -> pd.DataFrame:
    df = df.copy()
    df["key"] = df["sample_id"].where(df["sample_id"].notna(), df["path"]).astype(str)
    return df


def _read_test_set(path: str | Path) -> pd.DataFrame:
    try:
        return seeds_view(path)
    except ManifestError as err:
        raise ValidationError(f"test set manifest {path}: {err}") from err


def _test_rows(df: pd.DataFrame) -> pd.DataFrame:
    df = df[(df["status"] == "accepted") & df["label"].isin(LABELS)]
    rows = pd.DataFrame(
        {
            "path": df["processed_path"].where(df["processed_path"].notna(), df["source_path"]).astype(str).values,
            "label": df["label"].values,
            "lesion_id": df["lesion_id"].values,
            "sample_id": df["sample_id"].values,
        }
    )
    return _with_keys(rows.drop_duplicates("path").reset_index(drop=True))


def _usable_synthetic(synthetic_all: pd.DataFrame, workdir: Workdir) -> tuple[pd.DataFrame, str]:
    synthetic = rg.usable_synthetic(synthetic_all)
    if not synthetic.empty:  # relative paths are relative to the workdir; image-store URLs as they are
        synthetic["path"] = [p if storage.is_remote(p) or Path(p).is_absolute() else str(workdir.root / p)
                             for p in synthetic["path"]]
    return synthetic, rg.synthetic_summary(synthetic_all)


def check_no_synthetic_as_real(seeds: pd.DataFrame, test_sets: dict[str, TestSet], synthetic: pd.DataFrame) -> None:
    """No image used as real (any split of the seeds, any test set) may be byte-identical to a
    synthetic one: a generated image that slipped in as real would leak into training or testing."""
    generated = dict(zip(synthetic["sha256"].dropna().astype(str), synthetic.loc[synthetic["sha256"].notna(), "sample_key"]))
    if not generated:
        return
    real = seeds[(seeds["status"] == "accepted")]
    places = [(f"the seeds' {r.split!r} split", str(r.sample_id), str(r.source_path))
              for r in real.itertuples() if r.sample_id in generated]
    for ts in test_sets.values():
        places += [(f"test set {ts.name!r}", str(k), str(p)) for k, p in zip(ts.rows["sample_id"], ts.rows["path"])
                   if k in generated]
    if places:
        where, sid, path = places[0]
        raise ValidationError(
            f"{path} in {where} is byte-identical to synthetic image {generated[sid]} ({len(places)} such images "
            "in all): a generated image must never count as real. Re-ingest the source (provenance is checked at "
            "the door) or remove the file.")


def _test_sets(workdir: Workdir, seeds: pd.DataFrame, test_sets: dict[str, str | Path] | None) -> dict[str, TestSet]:
    sets: dict[str, TestSet] = {}
    explicit = test_sets is not None
    if test_sets is None:
        test_sets = {str(p).rsplit("/", 1)[-1].removesuffix(".parquet"): p
                     for p in storage.files_in(workdir.test_sets_folder, ".parquet")}
    for name, path in test_sets.items():
        path = path if storage.is_remote(path) else Path(path)
        safe = metric_key(name)
        if safe in sets:
            raise ValidationError(f"two test sets map to the same name {safe!r}")
        if not manifest_exists(path):
            raise ValidationError(f"test set {name!r}: manifest {path} not found")
        view = _read_test_set(path)
        rows = _test_rows(view)
        if rows.empty:
            if explicit:
                raise ValidationError(f"test set {name!r} ({path}) has no accepted, labelled images")
            log.warning("test set %s (%s) has no accepted, labelled images: skipped", name, path)
            continue
        sets[safe] = TestSet(safe, str(path), rows, identity.frame_digest(view, list(view.columns)))
    if not explicit:
        own = _with_keys(rg.real_rows(seeds, "test"))
        if not own.empty and SEEDS_TEST not in sets:
            own_digest = identity.frame_digest(own, list(own.columns))
            sets[SEEDS_TEST] = TestSet(SEEDS_TEST, str(workdir.seeds_manifest), own.drop(columns="source"), own_digest)
    if not sets:
        raise ValidationError(
            "no test set: ingest one (`dermt2im validate --test-set NAME=SOURCE`) or keep a 'test' split in the seeds"
        )
    return sets


def load_inputs(workdir: Workdir, test_sets: dict[str, str | Path] | None = None) -> ValidationInputs:
    """``test_sets``: name -> test-set manifest (a local path or URL); None: every manifest in the
    workdir's test_sets folder plus the seeds' own test split."""
    if not manifest_exists(workdir.seeds_manifest):
        raise ValidationError(f"no seeds manifest at {workdir.seeds_manifest}: run `dermt2im ingest` first")
    seeds = seeds_view(workdir.seeds_manifest)
    real_train = _with_keys(rg.real_rows(seeds, "train"))
    real_val = _with_keys(rg.real_rows(seeds, "val"))
    if real_train.empty:
        raise ValidationError("the seeds manifest has no accepted, labelled images in the 'train' split")
    synthetic_all = synthetic_view(workdir)
    synthetic, note = _usable_synthetic(synthetic_all, workdir)
    inputs = ValidationInputs(
        real_train=real_train,
        real_val=real_val,
        synthetic=synthetic,
        synthetic_note=note,
        test_sets=_test_sets(workdir, seeds, test_sets),
        seeds_digest=identity.frame_digest(seeds, list(seeds.columns)),
        synthetic_digest=identity.frame_digest(synthetic_all, list(synthetic_all.columns)) if len(synthetic_all) else "none",
        synthetic_sources=tuple(sorted(set(rg.synthetic_sources(synthetic_all)))),
    )
    check_no_leakage(inputs)
    check_no_synthetic_as_real(seeds, inputs.test_sets, synthetic_all)
    _check_files(inputs)
    return inputs


def check_no_leakage(inputs: ValidationInputs) -> None:
    """No lesion (``lesion_id``) and no image (``sample_id``) may be both trained / selected on and
    tested on. Raises ``ValidationError`` naming the first offending lesion."""
    fit_rows = pd.concat([inputs.real_train.assign(split="train"), inputs.real_val.assign(split="val")])
    for column, what in (("lesion_id", "lesion"), ("sample_id", "image")):
        seen = fit_rows.dropna(subset=[column])
        where = dict(zip(seen[column].astype(str), seen["split"]))
        for ts in inputs.test_sets.values():
            ids = ts.rows[column].dropna().astype(str)
            shared = sorted(set(ids) & set(where))
            if shared:
                first = shared[0]
                raise ValidationError(
                    f"{what} {first!r} is in the seeds' {where[first]!r} split and in test set {ts.name!r} "
                    f"({len(shared)} shared {what}s in all): a test set must never contain training data. "
                    "Remove these from the test set or re-split the seeds by lesion."
                )


def _check_files(inputs: ValidationInputs) -> None:
    paths = list(inputs.real_train["path"]) + list(inputs.real_val["path"]) + list(inputs.synthetic["path"])
    for ts in inputs.test_sets.values():
        paths += list(ts.rows["path"])
    missing = [p for p in paths if not storage.is_file(p)]
    if missing:
        raise ValidationError(
            f"{len(missing)} image file(s) named in the manifests are missing, e.g. {missing[:3]}; "
            "re-run preprocess (seeds / test sets) or generate (synthetic)"
        )
