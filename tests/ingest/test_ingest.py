"""Seed ingest: layouts, labels, quarantine of bad input, idempotent re-runs and lesion-wise splits."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

import dermt2im.ingest.files as ingest_files
import dermt2im.ingest.stage as ingest_stage
from dermt2im.core.manifest import SEEDS, read_manifest, upsert
from dermt2im.core.specs import IngestConfig, SplitConfig
from dermt2im.ingest.labels import label_map, resolve_label
from dermt2im.ingest.layouts import IngestError, detect_layout
from dermt2im.ingest.splits import assign_splits, split_counts
from dermt2im.ingest.stage import ingest_source, reason_category
from tests.ingest.ingest_fixtures import (
    TEXT_AS_JPEG,
    class_folders,
    cmyk_jpeg,
    exif_rotated_jpeg,
    grey_png,
    jpeg,
    phantom_like,
    png,
    png16,
    png_bomb,
    put,
    rgba_png,
    truncated,
    write_csv,
)

# The fixtures' images are a few pixels wide: the size limits that refuse such images in real data are
# checked in tests/test_faults.py.
SMALL = {"min_side": 8}
CFG = IngestConfig(**SMALL)


def run(source: Path, manifest: Path, cfg: IngestConfig = CFG, **kw):
    report = ingest_source(source, manifest, cfg, **kw)
    return report, read_manifest(manifest, SEEDS)


def by_rel(df: pd.DataFrame, root: Path) -> pd.DataFrame:
    """Rows indexed by path relative to the (resolved) source folder."""
    root = root.resolve()
    return df.set_index(df["source_path"].map(lambda p: os.path.relpath(p, root)))


def image_files(root: Path) -> list[str]:
    exts = {e.lower() for e in CFG.extensions}
    return sorted(str(p.resolve()) for p in root.rglob("*") if p.is_file() and p.suffix.lower() in exts)


# ---------------------------------------------------------------------------------------------- layouts


def _isic(root: Path) -> None:
    put(root / "ISIC_1.jpg", jpeg(1))
    write_csv(root / "metadata.csv", ("isic_id", "diagnosis", "benign_malignant"), [("ISIC_1", "nevus", "benign")])


def _ham(root: Path) -> None:
    put(root / "HAM10000_images_part_1" / "ISIC_1.jpg", jpeg(1))
    write_csv(root / "HAM10000_metadata.csv", ("lesion_id", "image_id", "dx"), [("HAM_1", "ISIC_1", "nv")])


def _diagnosis_folders(root: Path) -> None:
    put(root / "melanoma" / "a.jpg", jpeg(1))
    put(root / "nevus" / "b.jpg", jpeg(2))


def _csv(root: Path) -> None:
    put(root / "x.jpg", jpeg(1))
    write_csv(root / "labels.csv", ("file", "label"), [("x.jpg", "benign")])


@pytest.mark.parametrize(
    "build, layout, mentions",
    [
        (_isic, "isic", ["metadata.csv", "isic_id", "benign_malignant"]),
        (_ham, "ham10000", ["HAM10000_metadata.csv", "image_id", "lesion_id"]),
        (class_folders, "folders", ["benign/", "malignant/"]),
        (_diagnosis_folders, "folders", ["melanoma/", "nevus/"]),
        (_csv, "csv", ["labels.csv", "file", "label"]),
        (phantom_like, "csv", ["labels.csv", "class folders", "lesion_id", "richer"]),
    ],
    ids=["isic", "ham10000", "class-folders", "diagnosis-folders", "csv", "phantoms-csv-over-folders"],
)
def test_detect_layout_names_the_layout_and_explains_it(tmp_path, build, layout, mentions):
    build(tmp_path)
    got, why = detect_layout(tmp_path)
    assert got == layout
    for word in mentions:
        assert word in why


def test_detect_layout_errors_are_clear(tmp_path):
    with pytest.raises(IngestError, match="source not found"):
        detect_layout(tmp_path / "nope")
    _isic(tmp_path)
    _csv(tmp_path)
    with pytest.raises(IngestError, match=r"ambiguous.*labels\.csv.*metadata\.csv"):
        detect_layout(tmp_path)
    # forcing a layout picks the CSV that fits it
    assert ingest_source(tmp_path, tmp_path / "m.parquet", CFG, layout="isic").layout == "isic"
    loose = tmp_path / "loose"
    put(loose / "a.jpg", jpeg(1))
    write_csv(loose / "stats.csv", ("mean", "std"), [(1, 2)])
    with pytest.raises(IngestError, match=r"no layout recognised.*stats\.csv"):
        detect_layout(loose)
    with pytest.raises(IngestError, match="unknown layout 'kaggle'"):
        ingest_source(loose, tmp_path / "m2.parquet", CFG, layout="kaggle")
    with pytest.raises(IngestError, match="unknown split"):
        ingest_source(loose, tmp_path / "m2.parquet", CFG, split="holdout")


@pytest.mark.parametrize(
    "header, layout, missing",
    [
        (("file", "lbl"), None, "'label' or 'diagnosis'"),
        (("filename", "label"), "csv", "'file'"),
        (("image_id", "dx"), None, "'lesion_id'"),
        (("isic_id", "age_approx"), None, "'diagnosis' or 'benign_malignant'"),
    ],
)
def test_missing_required_column_stops_before_any_work(tmp_path, monkeypatch, header, layout, missing):
    src = tmp_path / "src"
    put(src / "a.jpg", jpeg(1))
    write_csv(src / "meta.csv", header, [("a", "x")])

    def no_work(*a, **k):
        raise AssertionError("files were scanned before the CSV was checked")

    monkeypatch.setattr(ingest_stage, "scan_source", no_work)
    manifest = tmp_path / "m.parquet"
    with pytest.raises(IngestError) as err:
        ingest_source(src, manifest, CFG, layout=layout)
    assert missing in str(err.value) and str(src.resolve() / "meta.csv") in str(err.value)
    assert not manifest.exists()


def test_isic_layout_labels_diagnoses_and_quarantines(tmp_path):
    src = tmp_path / "isic"
    put(src / "images" / "ISIC_1.jpg", jpeg(1))
    put(src / "ISIC_2.png", png(2))
    put(src / "ISIC_3.jpg", jpeg(3))
    put(src / "ISIC_4.jpg", jpeg(4))
    put(src / "more" / "ISIC_5.jpg", jpeg(5))
    put(src / "ISIC_9.jpg", jpeg(9))  # not in the CSV
    put(src / "README.txt", b"not an input")
    put(src / "images" / "meta.json", b"{}")
    write_csv(
        src / "metadata.csv",
        ("isic_id", "diagnosis", "benign_malignant", "lesion_id", "age_approx", "sex"),
        [
            ("ISIC_1", "melanoma", "malignant", "IL_1", 55, "male"),
            ("ISIC_2", "nevus", "benign", "", 30, "female"),
            ("ISIC_3", "nevus", "malignant", "", 40, "male"),
            ("ISIC_4", "lentigo simplex", "benign", "", 40, "male"),
            ("ISIC_5", "basal cell carcinoma", "", "", 70, "female"),
            ("ISIC_6", "nevus", "benign", "", 20, "female"),
        ],
    )
    report, df = run(src, tmp_path / "seeds.parquet")
    assert report.layout == "isic"
    rows = by_rel(df, src)
    assert rows.loc["images/ISIC_1.jpg", ["label", "diagnosis", "lesion_id", "status"]].tolist() == [
        "malignant", "melanoma", "IL_1", "accepted"]
    assert rows.loc["ISIC_2.png", "label"] == "benign" and rows.loc["ISIC_2.png", "status"] == "accepted"
    assert rows.loc["more/ISIC_5.jpg", "label"] == "malignant"  # from the diagnosis alone
    disagree = rows.loc["ISIC_3.jpg"]
    assert disagree["status"] == "quarantined"
    assert "'malignant'" in disagree["reason"] and "'nevus'" in disagree["reason"]
    unknown = rows.loc["ISIC_4.jpg"]
    assert unknown["status"] == "quarantined" and "unknown diagnosis" in unknown["reason"]
    assert "lentigo simplex" in unknown["reason"]
    missing = rows.loc["ISIC_6.jpg"]
    assert missing["status"] == "quarantined" and missing["reason"].startswith("file not found")
    assert pd.isna(missing["sample_id"])
    assert rows.loc["ISIC_9.jpg", "reason"] == "not listed in metadata.csv"
    assert not any(p.endswith(".csv") for p in df["source_path"])  # the metadata describes inputs, is none
    for other in ("README.txt", "images/meta.json"):  # every other file has its row (issue 11)
        assert rows.loc[other, "status"] == "quarantined" and rows.loc[other, "reason"].startswith("not an image file")
    assert len(df) == 9 and df["source_path"].is_unique
    assert set(df.columns) == set(SEEDS.columns)  # no age / sex
    assert not df.isin(["male", "female"]).any().any()
    assert report.reasons == {"file not found": 1, "label disagreement": 1, "not listed in metadata.csv": 1,
                              "unknown diagnosis": 1, "not an image file": 2}


def test_isic_2018_and_2019_one_hot_ground_truth(tmp_path):
    src = tmp_path / "isic2019"
    for i in range(1, 8):
        put(src / "ISIC_2019_Training_Input" / f"ISIC_{i:07d}.jpg", jpeg(700 + i))
    write_csv(
        src / "ISIC_2019_Training_GroundTruth.csv",
        ("image", "MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK"),
        [
            ("ISIC_0000001", "1.0", "0.0", "0.0", "0.0", "0.0", "0.0", "0.0", "0.0", "0.0"),
            ("ISIC_0000002", "0.0", "1.0", "0.0", "0.0", "0.0", "0.0", "0.0", "0.0", "0.0"),
            ("ISIC_0000003", "0.0", "0.0", "0.0", "1.0", "0.0", "0.0", "0.0", "0.0", "0.0"),
            ("ISIC_0000004", "0.0", "0.0", "0.0", "0.0", "0.0", "0.0", "0.0", "0.0", "1.0"),
            ("ISIC_0000005", "1.0", "1.0", "0.0", "0.0", "0.0", "0.0", "0.0", "0.0", "0.0"),
            ("ISIC_0000006", "0.0", "0.0", "0.0", "0.0", "0.0", "0.0", "0.0", "0.0", "0.0"),
            ("ISIC_0000007", "0.0", "0.0", "", "0.0", "0.5", "0.0", "0.0", "0.0", "0.0"),
        ],
    )
    layout, why = detect_layout(src)
    assert layout == "isic-challenge" and "one-hot" in why and "<image>" in why
    report, df = run(src, tmp_path / "seeds.parquet")
    rows = df.set_index(df["source_path"].map(lambda p: Path(p).stem))
    assert rows.loc["ISIC_0000001", ["label", "diagnosis", "status"]].tolist() == ["malignant", "mel", "accepted"]
    assert rows.loc["ISIC_0000002", ["label", "diagnosis"]].tolist() == ["benign", "nv"]
    assert rows.loc["ISIC_0000003", "label"] == "malignant"  # AK grouped with HAM10000's akiec
    assert rows.loc["ISIC_0000004", "reason"].startswith("unknown diagnosis: 'unk'")  # never guessed
    assert "2 classes set (mel, nv)" in rows.loc["ISIC_0000005", "reason"]
    assert "0 classes set" in rows.loc["ISIC_0000006", "reason"]
    assert "not 0 or 1 (bcc=blank, bkl=0.5)" in rows.loc["ISIC_0000007", "reason"]
    assert "line 8 of ISIC_2019_Training_GroundTruth.csv" in rows.loc["ISIC_0000007", "reason"]
    assert report.layout == "isic-challenge" and report.accepted == 3
    assert report.reasons == {"one-hot ground truth": 3, "unknown diagnosis": 1}
    assert set(df["dataset"]) == {"isic-challenge"}


def test_isic_2017_ground_truth_is_told_from_ham10000_by_its_columns(tmp_path):
    src = tmp_path / "isic2017"
    for i in range(1, 5):
        put(src / f"ISIC_{i:07d}.jpg", jpeg(800 + i))
    write_csv(src / "ISIC-2017_Training_Part3_GroundTruth.csv", ("image_id", "melanoma", "seborrheic_keratosis"),
              [("ISIC_0000001", "1.0", "0.0"), ("ISIC_0000002", "0.0", "1.0"), ("ISIC_0000003", "0.0", "0.0"),
               ("ISIC_0000004", "1.0", "1.0")])
    assert detect_layout(src)[0] == "isic-challenge"  # image_id, but not HAM10000's dx / lesion_id
    _, df = run(src, tmp_path / "seeds.parquet")
    rows = df.set_index(df["source_path"].map(lambda p: Path(p).stem))
    assert rows.loc["ISIC_0000001", ["label", "diagnosis"]].tolist() == ["malignant", "melanoma"]
    assert rows.loc["ISIC_0000002", ["label", "diagnosis"]].tolist() == ["benign", "seborrheic keratosis"]
    assert rows.loc["ISIC_0000003", ["label", "diagnosis"]].tolist() == ["benign", "nevus"]  # neither column
    assert rows.loc["ISIC_0000004", "status"] == "quarantined"
    # a HAM10000 file keeps its layout, and a forced layout with the wrong columns says what is missing
    ham = tmp_path / "ham"
    put(ham / "ISIC_0000001.jpg", jpeg(801))
    write_csv(ham / "HAM10000_metadata.csv", ("lesion_id", "image_id", "dx"), [("HAM_1", "ISIC_0000001", "nv")])
    assert detect_layout(ham)[0] == "ham10000"
    with pytest.raises(IngestError, match="missing required column 'dx', 'lesion_id' for the ham10000 layout"):
        ingest_source(src, tmp_path / "x.parquet", CFG, layout="ham10000")


def test_isic_archive_newer_exports_and_the_2020_challenge_csv(tmp_path):
    src = tmp_path / "archive"
    for i in range(1, 6):
        put(src / f"ISIC_{i:07d}.jpg", jpeg(900 + i))
    write_csv(
        src / "metadata.csv",
        ("isic_id", "diagnosis_1", "diagnosis_2", "diagnosis_3", "lesion_id", "age_approx", "sex"),
        [
            ("ISIC_0000001", "Malignant", "Malignant melanocytic proliferations (Melanoma)", "Melanoma Invasive", "IL_1",
             60, "male"),
            ("ISIC_0000002", "Benign", "Benign melanocytic proliferations", "Nevus", "IL_2", 30, "female"),
            ("ISIC_0000003", "Indeterminate", "Indeterminate epidermal proliferations", "Solar or actinic keratosis",
             "", 70, "male"),
            ("ISIC_0000004", "Benign", "Benign epidermal proliferations", "Melanoma, NOS", "", 50, "female"),
            ("ISIC_0000005", "Indeterminate", "", "", "", 40, "male"),
        ],
    )
    assert detect_layout(src)[0] == "isic"
    _, df = run(src, tmp_path / "seeds.parquet")
    rows = df.set_index(df["source_path"].map(lambda p: Path(p).stem))
    assert rows.loc["ISIC_0000001", ["label", "diagnosis", "lesion_id", "status"]].tolist() == [
        "malignant", "Melanoma Invasive", "IL_1", "accepted"]
    assert rows.loc["ISIC_0000002", ["label", "status"]].tolist() == ["benign", "accepted"]
    assert rows.loc["ISIC_0000003", ["label", "status"]].tolist() == ["malignant", "accepted"]  # from diagnosis_3
    assert rows.loc["ISIC_0000004", "reason"].startswith("label disagreement")
    assert rows.loc["ISIC_0000005", "reason"].startswith("no label")
    assert not df.isin(["male", "female", 30, 60]).any().any()  # patient metadata stays out

    c2020 = tmp_path / "isic2020"
    for i in range(1, 4):
        put(c2020 / "train" / f"ISIC_{i:07d}.jpg", jpeg(950 + i))
    write_csv(
        c2020 / "ISIC_2020_Training_GroundTruth.csv",
        ("image_name", "patient_id", "lesion_id", "sex", "age_approx", "anatom_site_general_challenge", "diagnosis",
         "benign_malignant", "target"),
        [("ISIC_0000001", "IP_1", "IL_7", "male", 45, "torso", "unknown", "benign", 0),
         ("ISIC_0000002", "IP_1", "IL_8", "male", 45, "torso", "melanoma", "malignant", 1),
         ("ISIC_0000003", "IP_2", "IL_9", "female", 50, "head/neck", "nevus", "benign", 0)],
    )
    layout, why = detect_layout(c2020)
    assert layout == "isic" and "<image_name>" in why
    _, df = run(c2020, tmp_path / "c2020.parquet")
    assert (df["status"] == "accepted").all() and sorted(df["label"]) == ["benign", "benign", "malignant"]
    assert df["diagnosis"].isna().sum() == 1  # "unknown" is no diagnosis: the benign label stands alone
    assert not df.isin(["IP_1", "IP_2", "torso", "male"]).any().any()


def test_label_map_overrides_from_config(tmp_path):
    src = tmp_path / "isic"
    put(src / "ISIC_4.jpg", jpeg(4))
    write_csv(src / "metadata.csv", ("isic_id", "diagnosis"), [("ISIC_4", "Lentigo_Simplex")])
    cfg = IngestConfig(diagnosis_labels={"lentigo simplex": "benign"}, **SMALL)
    _, df = run(src, tmp_path / "m.parquet", cfg)
    assert df.loc[0, "status"] == "accepted" and df.loc[0, "label"] == "benign"


def test_ham10000_layout_across_part_folders_keeps_lesions_in_one_split(tmp_path):
    src = tmp_path / "ham"
    rows, dx_cycle = [], ["mel", "nv", "bkl", "akiec", "df", "bcc"]
    for i in range(24):
        lesion = f"HAM_{i // 2:04d}"  # two images per lesion
        image_id = f"ISIC_{i:07d}"
        part = 1 if i < 12 else 2
        put(src / f"HAM10000_images_part_{part}" / f"{image_id}.jpg", jpeg(i))
        rows.append((lesion, image_id, dx_cycle[(i // 2) % len(dx_cycle)], "histo", 45.0, "male", "back"))
    # Kaggle's download repeats part 1 in a lower-case folder: byte-identical copies
    for p in sorted((src / "HAM10000_images_part_1").iterdir())[:2]:
        put(src / "ham10000_images_part_1" / p.name, p.read_bytes())
    header = ("lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization")
    write_csv(src / "HAM10000_metadata.csv", header, rows)

    report, df = run(src, tmp_path / "seeds.parquet")
    assert report.layout == "ham10000" and set(df["dataset"]) == {"ham10000"}
    ok = df[df["status"] == "accepted"]
    assert len(ok) == 24 and ok["lesion_id"].notna().all()
    assert dict(Counter(ok["label"])) == {"malignant": 12, "benign": 12}
    assert (ok.groupby("lesion_id")["split"].nunique() == 1).all()
    assert set(ok["split"]) == {"train", "val", "test"}
    dupes = df[df["status"] == "quarantined"]
    assert len(dupes) == 2 and dupes["reason"].str.startswith("duplicate of ").all()
    assert all("HAM10000_images_part_1" in d for d in dupes["duplicate_of"])


def test_class_folders_unknown_folder_and_loose_files(tmp_path):
    src = tmp_path / "folders"
    put(src / "benign" / "a.jpg", jpeg(1))
    put(src / "Malignant" / "b.jpg", jpeg(2))
    put(src / "melanoma" / "c.jpg", jpeg(3))
    put(src / "nevus" / "sub" / "d.png", png(4))
    put(src / "seborrheic_keratosis" / "e.jpg", jpeg(5))
    put(src / "other" / "f.jpg", jpeg(6))
    put(src / "benign" / "melanoma" / "g.jpg", jpeg(7))
    put(src / "loose.jpg", jpeg(8))
    put(src / "benign" / "notes.txt", b"x")
    report, df = run(src, tmp_path / "seeds.parquet")
    assert report.layout == "folders"
    rows = by_rel(df, src)
    assert rows.loc["benign/a.jpg", "label"] == "benign"
    assert rows.loc["Malignant/b.jpg", "label"] == "malignant"
    assert rows.loc["melanoma/c.jpg", ["label", "diagnosis"]].tolist() == ["malignant", "melanoma"]
    assert rows.loc["nevus/sub/d.png", "label"] == "benign"
    assert rows.loc["seborrheic_keratosis/e.jpg", "label"] == "benign"
    good = ["benign/a.jpg", "Malignant/b.jpg", "melanoma/c.jpg", "nevus/sub/d.png", "seborrheic_keratosis/e.jpg"]
    assert (rows.loc[good, "status"] == "accepted").all()
    other = rows.loc["other/f.jpg"]
    assert other["status"] == "quarantined"
    assert "unknown class folder" in other["reason"] and "'other'" in other["reason"]
    assert "label disagreement" in rows.loc["benign/melanoma/g.jpg", "reason"]
    assert rows.loc["loose.jpg", "reason"].startswith("not in a class folder")
    assert rows.loc["benign/notes.txt", "reason"].startswith("not an image file (.txt)")  # issue 11: every file
    assert len(df) == 9


def test_plain_csv_paths_missing_escaping_and_found_below(tmp_path, monkeypatch):
    src = tmp_path / "src"
    outside = put(tmp_path / "secret.jpg", jpeg(99))
    put(src / "benign" / "a.jpg", jpeg(1))
    put(src / "images" / "b.jpg", jpeg(2))  # listed as plain "b.jpg", like the shared data's labels.csv
    put(src / "c.jpg", jpeg(3))
    put(src / "d.jpg", jpeg(4))
    write_csv(
        src / "labels.csv",
        ("file", "label", "diagnosis", "age_approx", "sex"),
        [
            ("benign/a.jpg", "benign", "nevus", 30, "female"),
            ("b.jpg", "malignant", "melanoma", 30, "female"),
            (str((src / "c.jpg").resolve()), "Benign", "", 30, "female"),
            ("../secret.jpg", "benign", "", 30, "female"),
            (str(outside.resolve()), "malignant", "", 30, "female"),
            ("gone.jpg", "benign", "", 30, "female"),
            ("d.jpg", "benign", "", 30, "female"),
            ("d.jpg", "malignant", "", 30, "female"),
        ],
    )
    opened: list[str] = []
    real_examine = ingest_files._examine
    monkeypatch.setattr(ingest_files, "_examine", lambda p, *a: opened.append(p) or real_examine(p, *a))
    report, df = run(src, tmp_path / "seeds.parquet")
    assert report.layout == "csv"
    rows = by_rel(df, src)
    assert rows.loc["benign/a.jpg", "status"] == "accepted"
    assert rows.loc["images/b.jpg", ["label", "status"]].tolist() == ["malignant", "accepted"]
    assert rows.loc["c.jpg", ["label", "status"]].tolist() == ["benign", "accepted"]
    escaped = df[df["reason"].fillna("").str.startswith("path escapes source folder")]
    assert len(escaped) == 1  # both cells name the same outside file: one row, never read
    assert escaped["source_path"].iloc[0] == str(outside.resolve()) and pd.isna(escaped["sample_id"].iloc[0])
    assert str(outside.resolve()) not in opened
    assert rows.loc["gone.jpg", "reason"].startswith("file not found") and pd.isna(rows.loc["gone.jpg", "sample_id"])
    assert "listed 2 times" in rows.loc["d.jpg", "reason"]
    assert len(df) == 6


def test_source_may_be_the_metadata_csv_itself(tmp_path):
    _isic(tmp_path)
    report, df = run(tmp_path / "metadata.csv", tmp_path / "out" / "seeds.parquet")
    assert report.layout == "isic" and df.loc[0, "status"] == "accepted"
    assert df.loc[0, "source_root"] == str(tmp_path.resolve())


def test_phantom_folders_can_be_forced_to_the_folder_layout(tmp_path):
    src = phantom_like(tmp_path / "src")  # manifests outside the source: every file in it has a row
    report, df = run(src, tmp_path / "m.parquet", layout="folders")
    assert report.layout == "folders" and (df["status"] == "accepted").all() and df["lesion_id"].isna().all()
    report, df = run(src, tmp_path / "m2.parquet")
    assert report.layout == "csv" and df["lesion_id"].notna().all() and len(df) == 6


# ---------------------------------------------------------------------------------------------- bad input

BAD_INPUT = {
    # name: (bytes builder, status, reason fragment or None, mode)
    "empty.jpg": (lambda: b"", "quarantined", "empty file", None),
    "text.jpg": (lambda: TEXT_AS_JPEG, "quarantined", "not an image: content is text", None),
    "truncated.jpg": (lambda: truncated(jpeg(7, (64, 64))), "quarantined", "truncated or corrupt JPEG", None),
    "truncated-header.jpg": (lambda: truncated(jpeg(8), 0.3), "quarantined", "truncated or corrupt", None),
    "truncated.png": (lambda: truncated(png(9, (64, 64))), "quarantined", "truncated or corrupt PNG", None),
    "bomb.png": (png_bomb, "quarantined", "too many pixels: 10,000,000,000", None),
    "sixteen-bit.png": (lambda: png16(10), "accepted", None, "I;16"),
    "grey.png": (lambda: grey_png(11), "accepted", None, "L"),
    "rgba.png": (lambda: rgba_png(12), "accepted", None, "RGBA"),
    "cmyk.jpg": (lambda: cmyk_jpeg(13), "accepted", None, "CMYK"),
    "plain.jpg": (lambda: jpeg(14), "accepted", None, "RGB"),
}


@pytest.fixture(scope="module")
def bad_input(tmp_path_factory):
    src = tmp_path_factory.mktemp("bad") / "src"
    for name, (build, *_rest) in BAD_INPUT.items():
        put(src / "benign" / name, build())
    put(src / "benign" / "rot6.jpg", exif_rotated_jpeg(20, 6))
    put(src / "benign" / "rot8.jpg", exif_rotated_jpeg(21, 8))
    put(src / "benign" / "dup-a.jpg", jpeg(30))
    put(src / "benign" / "dup-b.jpg", jpeg(30))
    put(src / "benign" / "same.jpg", jpeg(31))
    put(src / "malignant" / "same.jpg", jpeg(31))
    put(src / "malignant" / "also-same.jpg", jpeg(31))
    report, df = run(src, src.parent / "seeds.parquet")
    return src, report, by_rel(df, src)


@pytest.mark.parametrize("name", sorted(BAD_INPUT))
def test_bad_and_unusual_files_are_quarantined_or_accepted(bad_input, name):
    _, _, rows = bad_input
    _, status, reason, mode = BAD_INPUT[name]
    row = rows.loc[f"benign/{name}"]
    assert row["status"] == status
    if reason is None:
        assert pd.isna(row["reason"]) and row["mode"] == mode and row["width"] > 0
        assert row["split"] in ("train", "val", "test")
    else:
        assert reason in row["reason"] and pd.isna(row["split"])
    if name != "empty.jpg":
        assert isinstance(row["sample_id"], str) and len(row["sample_id"]) == 64


def test_exif_rotation_is_applied(bad_input):
    _, _, rows = bad_input
    for name in ("benign/rot6.jpg", "benign/rot8.jpg"):
        row = rows.loc[name]
        assert row["status"] == "accepted" and bool(row["exif_rotated"]) is True
        assert (row["width"], row["height"]) == (10, 20)  # stored 20x10, upright 10x20
    assert bool(rows.loc["benign/plain.jpg", "exif_rotated"]) is False


def test_duplicates_keep_the_first_and_label_conflicts_quarantine_all(bad_input):
    src, _, rows = bad_input
    first = str((src / "benign" / "dup-a.jpg").resolve())
    assert rows.loc["benign/dup-a.jpg", "status"] == "accepted"
    dup = rows.loc["benign/dup-b.jpg"]
    assert dup["status"] == "quarantined" and dup["reason"] == f"duplicate of {first}" and dup["duplicate_of"] == first
    for name in ("benign/same.jpg", "malignant/same.jpg", "malignant/also-same.jpg"):
        row = rows.loc[name]
        assert row["status"] == "quarantined" and row["reason"].startswith("label conflict")
        assert "benign (benign/same.jpg)" in row["reason"] and "malignant (malignant/same.jpg)" in row["reason"]


def test_every_input_file_is_in_the_manifest_exactly_once(bad_input):
    src, report, rows = bad_input
    assert sorted(rows["source_path"]) == image_files(src)
    assert rows["source_path"].is_unique and all(os.path.isabs(p) for p in rows["source_path"])
    assert report.total == len(rows) == report.accepted + report.quarantined
    assert report.quarantined == sum(report.reasons.values())
    assert report.reasons["label conflict"] == 3 and report.reasons["duplicate"] == 1


def test_max_pixels_comes_from_the_config(tmp_path):
    put(tmp_path / "src" / "benign" / "a.jpg", jpeg(1, (16, 12)))
    _, df = run(tmp_path / "src", tmp_path / "m.parquet", IngestConfig(max_pixels=100, **SMALL))
    assert df.loc[0, "status"] == "quarantined" and "too many pixels: 16x12" in df.loc[0, "reason"]


def test_report_summary_says_what_happened(bad_input):
    _, report, _ = bad_input
    text = report.summary()
    assert "folders" in text and "class folders" in text
    assert f"{report.accepted} accepted, {report.quarantined} quarantined" in text
    assert "label conflict 3" in text
    assert reason_category("duplicate of /x/y.jpg") == "duplicate"
    assert reason_category("empty file (0 bytes)") == "empty file"
    assert reason_category("path escapes source folder: '../a.jpg' (line 2 of l.csv)") == "path escapes source folder"


# ---------------------------------------------------------------------------------------------- re-runs


def _lesion_source(root: Path, n: int, start: int = 0) -> list[tuple]:
    rows = []
    for i in range(start, start + n):
        label = "benign" if i % 2 else "malignant"
        rel = f"{label}/img-{i:03d}.jpg"
        put(root / rel, jpeg(1000 + i))
        rows.append((rel, label, f"L{i // 2:03d}" if i < 8 else ""))
    return rows


def test_rerun_changes_nothing_and_decodes_nothing(tmp_path, monkeypatch):
    src, manifest = tmp_path / "src", tmp_path / "seeds.parquet"
    rows = _lesion_source(src, 12)
    put(src / "other" / "x.jpg", jpeg(5))  # quarantined rows must be stable too
    write_csv(src / "labels.csv", ("file", "label", "lesion_id"), rows)
    first, df1 = run(src, manifest)
    before, mtime = manifest.read_bytes(), manifest.stat().st_mtime_ns

    decoded: list[int] = []
    real = ingest_files.decode_facts
    monkeypatch.setattr(ingest_files, "decode_facts", lambda data, mp: decoded.append(1) or real(data, mp))
    second, df2 = run(src, manifest)
    assert manifest.read_bytes() == before and manifest.stat().st_mtime_ns == mtime
    pd.testing.assert_frame_equal(df1, df2)
    assert decoded == [] and second.new == 0 and first.new == 13
    assert (first.total, first.accepted, first.splits) == (second.total, second.accepted, second.splits)


def test_grown_source_adds_only_new_rows_and_keeps_splits(tmp_path):
    src, manifest = tmp_path / "src", tmp_path / "seeds.parquet"
    rows = _lesion_source(src, 12)
    write_csv(src / "labels.csv", ("file", "label", "lesion_id"), rows)
    _, before = run(src, manifest)

    # a second image of a lesion outside train; the re-run puts every *new* group in train, so only
    # joining its lesion can put this image anywhere else
    lesion, split, label = before.loc[before["split"] != "train", ["lesion_id", "split", "label"]].dropna().iloc[0]
    more = _lesion_source(src, 6, start=12)
    put(src / label / "again.jpg", jpeg(7777))
    more.append((f"{label}/again.jpg", label, lesion))
    write_csv(src / "labels.csv", ("file", "label", "lesion_id"), rows + more)
    all_train = IngestConfig(splits=SplitConfig(train=1.0, val=0.0, test=0.0), **SMALL)
    report, after = run(src, manifest, all_train)

    assert report.new == 7 and len(after) == 19
    pd.testing.assert_frame_equal(after.iloc[:12].reset_index(drop=True), before)  # untouched, same order
    rows_after = by_rel(after, src)
    assert rows_after.loc[f"{label}/again.jpg", "split"] == split
    assert (after.iloc[12:]["split"] == "train").sum() == 6  # the new groups


def test_new_copies_of_existing_images_on_reingest(tmp_path):
    src, manifest = tmp_path / "src", tmp_path / "seeds.parquet"
    class_folders(src, per_class=3)
    run(src, manifest)
    # a byte-identical copy that sorts first: the copy accepted earlier stays the accepted one
    put(src / "benign" / "a-copy.jpg", (src / "benign" / "benign-0.jpg").read_bytes())
    # the same bytes under the other label: a label conflict quarantines the earlier row too
    put(src / "malignant" / "b-copy.jpg", (src / "benign" / "benign-1.jpg").read_bytes())
    report, df = run(src, manifest)
    rows = by_rel(df, src)
    assert rows.loc["benign/benign-0.jpg", "status"] == "accepted"
    assert rows.loc["benign/a-copy.jpg", "duplicate_of"] == str((src / "benign" / "benign-0.jpg").resolve())
    for name in ("benign/benign-1.jpg", "malignant/b-copy.jpg"):
        assert rows.loc[name, "reason"].startswith("label conflict") and pd.isna(rows.loc[name, "split"])
    assert report.new == 2 and report.accepted == 5


def test_reingest_keeps_preprocess_results_unless_the_file_changed(tmp_path):
    """Ingest never writes preprocess's table; readers join the two by row id, and a row whose bytes
    changed is joined to nothing preprocess made of the old bytes."""
    from dermt2im.core.manifest import PROCESSED, processed_location, write_manifest
    from dermt2im.core.views import seeds_view

    src, manifest = tmp_path / "src", tmp_path / "seeds.parquet"
    class_folders(src, per_class=3)
    _, df = run(src, manifest)
    done = pd.DataFrame({"source_path": df["source_path"], "sample_id": df["sample_id"], "status": "processed",
                         "processed_path": "/processed/" + df["sample_id"] + ".png", "preprocess_key": "k1",
                         "hair_fraction": 0.25})
    failed = done.index[done["source_path"].str.endswith("benign-1.jpg")][0]
    done.loc[failed, ["status", "reason", "processed_path", "preprocess_key"]] = [
        "failed", "preprocess: image processing failed", None, "k1"]
    write_manifest(done, processed_location(manifest), PROCESSED)
    before = read_manifest(processed_location(manifest), PROCESSED)
    put(src / "malignant" / "malignant-0.jpg", jpeg(4242))  # changed bytes: old preprocessing is stale

    run(src, manifest)
    assert read_manifest(processed_location(manifest), PROCESSED).equals(before)  # ingest writes only its own
    rows = by_rel(seeds_view(manifest), src)
    kept = rows.loc["benign/benign-0.jpg"]
    assert kept["processed_path"].startswith("/processed/") and kept["preprocess_key"] == "k1"
    assert kept["hair_fraction"] == 0.25
    assert rows.loc["benign/benign-1.jpg", "reason"] == "preprocess: image processing failed"
    changed = rows.loc["malignant/malignant-0.jpg"]
    assert changed["sample_id"] != by_rel(df, src).loc["malignant/malignant-0.jpg", "sample_id"]
    assert pd.isna(changed["processed_path"]) and pd.isna(changed["hair_fraction"])
    assert changed["status"] == "accepted"
    assert changed["split"] == by_rel(df, src).loc["malignant/malignant-0.jpg", "split"]


def test_deleted_file_is_quarantined_not_forgotten(tmp_path):
    src, manifest = tmp_path / "src", tmp_path / "seeds.parquet"
    class_folders(src, per_class=3)
    run(src, manifest)
    (src / "benign" / "benign-2.jpg").unlink()
    report, df = run(src, manifest)
    row = by_rel(df, src).loc["benign/benign-2.jpg"]
    assert row["status"] == "quarantined" and row["reason"].startswith("file not found") and pd.isna(row["split"])
    assert report.total == 6 and report.accepted == 5


def test_a_second_source_leaves_the_first_alone(tmp_path):
    manifest = tmp_path / "seeds.parquet"
    class_folders(tmp_path / "a", per_class=2, seed=0)
    class_folders(tmp_path / "b", per_class=2, seed=50)
    _, first = run(tmp_path / "a", manifest)
    report, both = run(tmp_path / "b", manifest)
    assert report.total == 4 and report.new == 4 and len(both) == 8
    pd.testing.assert_frame_equal(both.iloc[:4].reset_index(drop=True), first)


# ---------------------------------------------------------------------------------------------- splits


def test_split_counts_give_every_split_a_group_when_possible():
    p = {"train": 0.7, "val": 0.15, "test": 0.15}
    assert split_counts(3, p) == {"train": 1, "val": 1, "test": 1}
    assert split_counts(4, p) == {"train": 2, "val": 1, "test": 1}
    assert split_counts(100, p) == {"train": 70, "val": 15, "test": 15}
    assert split_counts(2, p) == {"train": 2, "val": 0, "test": 0}
    assert split_counts(5, {"train": 0.8, "val": 0.0, "test": 0.2}) == {"train": 4, "val": 0, "test": 1}
    assert sum(split_counts(17, p).values()) == 17


def test_assign_splits_is_stratified_seeded_and_deterministic():
    groups = {f"g{i:03d}": ("benign" if i % 3 else "malignant") for i in range(90)}
    cfg = SplitConfig(seed=3)
    a = assign_splits(groups, cfg)
    assert a == assign_splits(dict(reversed(list(groups.items()))), cfg)
    assert a != assign_splits(groups, SplitConfig(seed=4))
    for label, n in Counter(groups.values()).items():
        got = Counter(a[g] for g, lab in groups.items() if lab == label)
        assert got == split_counts(n, {"train": 0.7, "val": 0.15, "test": 0.15})
    tiny = {"b1": "benign", "b2": "benign", "b3": "benign", "m1": "malignant", "m2": "malignant", "m3": "malignant"}
    t = assign_splits(tiny, SplitConfig())
    for label in ("benign", "malignant"):
        assert {t[g] for g, lab in tiny.items() if lab == label} == {"train", "val", "test"}


def test_small_set_gets_every_label_in_every_split(tmp_path):
    class_folders(tmp_path / "src", per_class=3)
    report, df = run(tmp_path / "src", tmp_path / "m.parquet")
    assert report.splits == {"train": 2, "val": 2, "test": 2}
    assert df.groupby("split")["label"].nunique().to_dict() == {"test": 2, "train": 2, "val": 2}


def test_test_set_ingest_marks_every_accepted_row_test(tmp_path):
    class_folders(tmp_path / "src", per_class=3)
    put(tmp_path / "src" / "benign" / "bad.jpg", b"")
    report, df = run(tmp_path / "src", tmp_path / "test_sets" / "phantom.parquet", split="test")
    ok = df[df["status"] == "accepted"]
    assert len(ok) == 6 and (ok["split"] == "test").all() and df.loc[df["status"] != "accepted", "split"].isna().all()
    assert report.splits == {"test": 6}


def test_resolve_label_never_guesses():
    m = label_map(CFG)
    assert resolve_label("Malignant", None, m) == ("malignant", None)
    assert resolve_label(None, "Basal_Cell_Carcinoma", m) == ("malignant", None)
    assert resolve_label("benign", "nevus", m) == ("benign", None)
    label, why = resolve_label("benign", "melanoma", m)
    assert label is None and "'benign'" in why and "'melanoma'" in why
    assert "'mystery'" in resolve_label(None, "mystery", m)[1]
    assert "indeterminate" in resolve_label("indeterminate", None, m)[1]
    assert resolve_label(None, None, m)[1].startswith("no label")


# ---------------------------------------------------------------------------------------------- formats, real data


def test_manifest_is_readable_by_pandas_pyarrow_and_duckdb(tmp_path):
    class_folders(tmp_path / "src", per_class=2)
    manifest = tmp_path / "seeds.parquet"
    run(tmp_path / "src", manifest)
    assert len(pd.read_parquet(manifest)) == 4
    table = pq.read_table(manifest)
    assert table.schema.names == SEEDS.columns and table.num_rows == 4
    duckdb = pytest.importorskip("duckdb")
    assert duckdb.sql(f"select count(*) from '{manifest}' where status = 'accepted'").fetchall() == [(4,)]


@pytest.fixture(scope="module")
def real_ingest(real_dermoscopy, tmp_path_factory):
    manifest = tmp_path_factory.mktemp("real") / "seeds.parquet"
    report = ingest_source(real_dermoscopy, manifest, CFG)
    return report, manifest


def test_real_dermoscopy_images_ingest_cleanly(real_ingest, real_dermoscopy):
    report, manifest = real_ingest
    df = read_manifest(manifest, SEEDS)
    assert report.layout == "csv" and "labels.csv" in report.explanation
    assert (report.total, report.accepted, report.quarantined) == (130, 130, 0)
    assert dict(Counter(df["label"])) == {"benign": 65, "malignant": 65}
    assert set(df["diagnosis"]) == {"melanoma", "nevus"} and set(df["dataset"]) == {"csv"}
    assert set(df["split"]) == {"train", "val", "test"}
    assert all(p.startswith(str(real_dermoscopy.resolve() / "images")) for p in df["source_path"])
    assert df["sample_id"].is_unique and not df["exif_rotated"].any()
    # patient metadata stays in the source CSV
    columns = pq.read_schema(manifest).names
    assert not {"age_approx", "sex", "age"} & set(columns)
    assert not df.astype(str).isin(["male", "female"]).any().any()
    labels = pd.read_csv(real_dermoscopy / "labels.csv")
    expected = labels.set_index("sha256")[["width", "height"]]  # sample_id is the sha256 of the file bytes
    got = df.set_index("sample_id")[["width", "height"]]
    pd.testing.assert_frame_equal(got.loc[expected.index], expected, check_names=False, check_dtype=False)


def test_a_class_folder_of_links_into_one_image_pool_ingests(tmp_path):
    """Links are followed as the file's owner would open them, inside the source or out of it; each row
    keeps the link as its path and records its target; loops are still refused; a change to a linked
    file outside the source re-runs ingest."""
    from dermt2im.ingest.stage import Dataset, IngestStage
    from dermt2im.runners.sequential import run_stage

    pool = tmp_path / "pool"
    for i in range(6):
        put(pool / f"img{i}.jpg", jpeg(40 + i))
    put(tmp_path / "more" / "extra.jpg", jpeg(60))
    src = tmp_path / "dataset"
    (src / "benign").mkdir(parents=True)
    (src / "malignant").mkdir(parents=True)
    for i in range(3):
        (src / "benign" / f"b{i}.jpg").symlink_to(pool / f"img{i}.jpg")
        (src / "malignant" / f"m{i}.jpg").symlink_to(pool / f"img{i + 3}.jpg")
    (src / "malignant" / "more").symlink_to(tmp_path / "more")  # a linked folder outside the source
    (tmp_path / "more" / "back").symlink_to(tmp_path / "more")  # a loop through the linked folder
    (src / "benign" / "self.jpg").symlink_to(src / "benign" / "self.jpg")  # a loop on itself

    report, df = run(src, tmp_path / "seeds.parquet")
    rows = by_rel(df, src)
    linked = [f"benign/b{i}.jpg" for i in range(3)] + [f"malignant/m{i}.jpg" for i in range(3)]
    assert (rows.loc[linked, "status"] == "accepted").all(), rows[["status", "reason"]]
    assert rows.loc["benign/b1.jpg", "link_target"] == str((pool / "img1.jpg").resolve())
    assert rows.loc["malignant/more/extra.jpg", ["status", "label", "link_target"]].tolist() == [
        "accepted", "malignant", str((tmp_path / "more" / "extra.jpg").resolve())]
    assert rows.loc["benign/self.jpg", "reason"].startswith("symbolic link loop")
    assert rows.loc["malignant/more/back", "reason"].startswith("symbolic link loop")
    assert report.accepted == 7 and report.labels == {"benign": 3, "malignant": 4}

    stage = IngestStage(CFG, [Dataset("seeds", str(src), str(tmp_path / "stage.parquet"))],
                        type("W", (), {"stamps": tmp_path / "stamps", "locks": tmp_path / "locks"})())
    assert run_stage(stage).ran == 1 and run_stage(stage).ran == 0  # up to date
    put(pool / "img4.jpg", jpeg(99))  # the pool changes under a link
    assert run_stage(stage).ran == 1
    put(tmp_path / "more" / "extra2.jpg", jpeg(98))  # a file appears in a linked folder
    assert run_stage(stage).ran == 1
