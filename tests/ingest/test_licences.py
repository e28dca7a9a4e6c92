"""Ingest records each seed's licence and attribution: from a licence column of the metadata CSV (ISIC
exports, a labels CSV), else the nearest licence file in the source, else ``unknown``; and the terms a
set made from them carries (any CC BY-NC seed: non-commercial)."""

from __future__ import annotations

import os

import pandas as pd
import pytest

from dermt2im.core.manifest import SEEDS, read_manifest
from dermt2im.core.specs import IngestConfig
from dermt2im.ingest.licences import licence_id, terms
from dermt2im.ingest.stage import ingest_source
from tests.ingest.ingest_fixtures import class_folders, jpeg, put, write_csv

CFG = IngestConfig(min_side=8)
CC0_LEGAL_CODE = "Creative Commons Legal Code\n\nCC0 1.0 Universal\n\n    CREATIVE COMMONS CORPORATION IS NOT A LAW FIRM"
BY_NC_LEGAL_CODE = ("Attribution-NonCommercial 4.0 International\n\n=====\n\nCreative Commons Corporation (\"Creative "
                    "Commons\") is not a law firm")


@pytest.mark.parametrize("text,expected", [
    ("CC-0", "CC0-1.0"), ("CC-BY", "CC-BY-4.0"), ("CC-BY-NC", "CC-BY-NC-4.0"),  # the ISIC Archive's three
    ("CC BY-NC-SA 3.0", "CC-BY-NC-SA-3.0"), ("cc_by_sa", "CC-BY-SA-4.0"),
    ("Creative Commons Attribution 4.0 International", "CC-BY-4.0"),
    ('CC0 1.0 (ISIC Archive UDA-1 "by Anonymous"; see ATTRIBUTION.txt/LICENSE.txt in source repo)', "CC0-1.0"),
    (CC0_LEGAL_CODE, "CC0-1.0"), (BY_NC_LEGAL_CODE, "CC-BY-NC-4.0"),
    ("all rights reserved", "other"), ("", "unknown"), (None, "unknown"),
])
def test_licence_texts_are_recognised(text, expected):
    assert licence_id(text) == expected


def test_a_labels_csv_licence_column_is_recorded_per_image_and_a_licence_file_fills_the_gaps(tmp_path):
    src = tmp_path / "src"
    for i in range(5):
        put(src / "images" / f"im{i}.jpg", jpeg(i))
    write_csv(src / "labels.csv", ["file", "label", "license", "attribution"], [
        ["images/im0.jpg", "benign", "CC-0", ""],
        ["images/im1.jpg", "benign", "CC-BY", "Hospital A"],
        ["images/im2.jpg", "malignant", "CC-BY-NC", "Hospital B"],
        ["images/im3.jpg", "malignant", "", ""],
        ["images/im4.jpg", "benign", "", ""],
    ])
    (src / "LICENSE.txt").write_text(CC0_LEGAL_CODE)
    report = ingest_source(src, tmp_path / "seeds.parquet", CFG)
    df = read_manifest(tmp_path / "seeds.parquet", SEEDS)
    assert (report.total, report.quarantined) == (5, 0)  # the licence file is no input
    by_name = df.set_index(df["source_path"].map(os.path.basename))
    assert by_name["license"].to_dict() == {"im0.jpg": "CC0-1.0", "im1.jpg": "CC-BY-4.0", "im2.jpg": "CC-BY-NC-4.0",
                                            "im3.jpg": "CC0-1.0", "im4.jpg": "CC0-1.0"}
    assert by_name.at["im2.jpg", "attribution"] == "Hospital B"
    assert by_name.at["im2.jpg", "license_note"] == "labels.csv, column license: CC-BY-NC"
    assert by_name.at["im3.jpg", "license_note"].startswith("LICENSE.txt: Creative Commons Legal Code")
    t = terms(df["license"])
    assert t.non_commercial and t.attribution and t.hf_licence == "cc-by-nc-4.0" and not t.open_questions
    assert any("NON-COMMERCIAL" in s for s in t.sentences())


def test_isic_archive_metadata_gives_each_image_its_licence(tmp_path):
    src = tmp_path / "isic"
    for i in range(3):
        put(src / f"ISIC_{i:07d}.jpg", jpeg(10 + i))
    write_csv(src / "metadata.csv", ["isic_id", "attribution", "copyright_license", "benign_malignant", "diagnosis"], [
        ["ISIC_0000000", "Anonymous", "CC-0", "benign", "nevus"],
        ["ISIC_0000001", "Memorial Sloan Kettering", "CC-BY", "malignant", "melanoma"],
        ["ISIC_0000002", "Hospital Clinic de Barcelona", "CC-BY-NC", "benign", "nevus"],
    ])
    ingest_source(src, tmp_path / "seeds.parquet", CFG)
    df = read_manifest(tmp_path / "seeds.parquet", SEEDS).sort_values("source_path")
    assert df["license"].tolist() == ["CC0-1.0", "CC-BY-4.0", "CC-BY-NC-4.0"]
    assert df["attribution"].tolist() == ["Anonymous", "Memorial Sloan Kettering", "Hospital Clinic de Barcelona"]
    assert "column copyright_license" in df["license_note"].iloc[1]


def test_class_folders_take_the_nearest_licence_file_else_unknown(tmp_path):
    src = class_folders(tmp_path / "folders", per_class=2)
    (src / "malignant" / "LICENCE.md").write_text(BY_NC_LEGAL_CODE)
    (src / "malignant" / "ATTRIBUTION.txt").write_text("Dermatology Department, Example Hospital")
    report = ingest_source(src, tmp_path / "seeds.parquet", CFG)
    df = read_manifest(tmp_path / "seeds.parquet", SEEDS)
    assert report.quarantined == 0
    assert dict(zip(df["label"], df["license"])) == {"benign": "unknown", "malignant": "CC-BY-NC-4.0"}
    assert set(df.loc[df["label"] == "malignant", "attribution"]) == {"Dermatology Department, Example Hospital"}
    assert df.loc[df["label"] == "benign", "license_note"].isna().all()
    t = terms(df["license"])
    assert t.open_questions == 2 and t.hf_licence == "unknown" and t.non_commercial


def test_terms_of_cc0_seeds_add_no_restriction():
    t = terms(["CC0-1.0"] * 3)
    assert t.hf_licence == "cc0-1.0" and not (t.non_commercial or t.attribution or t.open_questions)
    assert "Every seed image is CC0" in " ".join(t.sentences())
    assert terms(["CC-BY-4.0", "CC-BY-SA-4.0"]).hf_licence == "cc-by-sa-4.0"


@pytest.mark.realdata
def test_the_real_isic_fixture_is_cc0_from_its_license_note_column(real_dermoscopy, tmp_path):
    labels = pd.read_csv(real_dermoscopy / "labels.csv", keep_default_na=False)
    subset = tmp_path / "real"
    for f in labels["file"][:6]:
        put(subset / "images" / f, (real_dermoscopy / "images" / f).read_bytes())
    labels.iloc[:6].to_csv(subset / "labels.csv", index=False)  # the fixture's own CSV, its license_note column
    ingest_source(subset, tmp_path / "seeds.parquet", CFG)
    df = read_manifest(tmp_path / "seeds.parquet", SEEDS)
    assert (df["license"] == "CC0-1.0").all() and len(df) == 6
    assert df["license_note"].str.startswith("labels.csv, column license_note: CC0 1.0 (ISIC Archive UDA-1").all()


def test_an_imported_synthetic_set_carries_its_own_licence(tmp_path, workdir):
    from dermt2im.core.manifest import IMPORTED
    from dermt2im.generate.imports import import_synthetic

    src = class_folders(tmp_path / "sd-out", per_class=2)
    (src / "LICENSE").write_text("CC BY 4.0 - made by the Example Lab")
    report = import_synthetic(workdir, src, "ext", CFG)
    df = read_manifest(workdir.imported_manifest, IMPORTED)  # import-synthetic's own table
    assert report.quarantined == 0 and len(df) == 4
    assert (df["license"] == "CC-BY-4.0").all() and df["license_note"].str.startswith("LICENSE: CC BY 4.0").all()
