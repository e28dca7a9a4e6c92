"""import-synthetic: an external set of AUTOMATIC1111 PNGs lands in W's synthetic manifest with its
parameters parsed, is gated and audited like the factory's renders, and validation restricted to
that source trains on exactly its images."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from dermt2im.core.manifest import SYNTHETIC, read_manifest
from dermt2im.core.specs import IngestConfig
from dermt2im.core.views import synthetic_view
from dermt2im.generate.imports import ImportStage, SyntheticImportError, import_synthetic
from dermt2im.quality.stage import QualityStage
from dermt2im.runners.sequential import run_stage
from dermt2im.validate.inputs import ValidationError, load_inputs
from dermt2im.validate.plan import plan_mixtures
from tests.quality.gate_config import tiny_with_full_gate
from tests.validate.validate_fixtures import make_validation_data, render, run_validation, tiny_config

PARAMETERS = ("a dermoscopic image of a {label} skin lesion\nNegative prompt: text, watermark, ruler\n"
              "Steps: {steps}, Sampler: DPM++ 2M Karras, CFG scale: 6.5, Seed: {seed}, Size: 32x32, "
              "Model hash: 2a7c51c4d9, Model: derm-sd15, Version: v1.9.4")


def a1111_png(rgb: np.ndarray, label: str, steps: int, seed: int) -> bytes:
    info = PngInfo()
    info.add_text("parameters", PARAMETERS.format(label=label, steps=steps, seed=seed))
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


@pytest.fixture
def external(tmp_path, workdir):
    """W with seeds and the factory's own synthetic set, and an external set: 5 A1111 PNGs per class,
    one of them a copy of a seed, one broken file and one in no class folder."""
    data = make_validation_data(workdir)
    src = tmp_path / "sd-outputs"
    for c, label in enumerate(("benign", "malignant")):
        (src / label).mkdir(parents=True)
        for i in range(5):
            rgb = render(label, np.random.default_rng([9, c, i]), 32, "isic", "drawn")
            (src / label / f"{i:05d}.png").write_bytes(a1111_png(rgb, label, 20 + i, 1000 * c + i))
    seed_row = data.seeds[(data.seeds["split"] == "train") & (data.seeds["label"] == "benign")].iloc[0]
    copied = np.asarray(Image.open(seed_row["processed_path"]).convert("RGB"))
    (src / "benign" / "copy.png").write_bytes(a1111_png(copied, "benign", 30, 7))
    (src / "benign" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    (src / "stray.png").write_bytes(a1111_png(copied, "benign", 31, 8))
    return data, src, seed_row


def test_an_external_set_is_imported_with_its_parameters_gated_and_audited(external, workdir):
    data, src, seed_row = external
    cfg = tiny_with_full_gate()
    stage = ImportStage(workdir, cfg.ingest, src, "ext")
    first = run_stage(stage).closing
    assert (first["total"], first["new"], first["quarantined"]) == (13, 13, 2)
    assert run_stage(stage).cached == 1  # the same files: nothing to do
    report = run_stage(QualityStage(workdir, cfg.quality)).closing

    df = synthetic_view(workdir)
    ext = df[df["source"] == "ext"]
    ext = ext.set_index(ext["path"].map(lambda p: os.path.relpath(p, src)))
    good = ext.loc[[f"{label}/{i:05d}.png" for label in ("benign", "malignant") for i in range(5)]]
    assert good["sample_key"].str.fullmatch(r"ext-\d{6}").all() and good["sample_key"].is_unique
    row = ext.loc["benign/00003.png"]
    assert (row["prompt"], row["negative_prompt"]) == ("a dermoscopic image of a benign skin lesion",
                                                       "text, watermark, ruler")
    assert (row["sampler"], row["steps"], row["guidance_scale"], row["seed"]) == ("DPM++ 2M Karras", 23, 6.5, 3)
    assert (row["model_hash"], row["base_model"], row["generator"]) == ("2a7c51c4d9", "derm-sd15", "AUTOMATIC1111")
    assert (row["width"], row["height"]) == (32, 32) and row["generation_parameters"].startswith("a dermoscopic")
    # gated and audited like the factory's own renders
    assert set(good["status"]) == {"accepted"}, good[["status", "reason"]].to_string()
    assert good["sharpness"].notna().all() and good["flags"].notna().all()
    assert good["nearest_seed"].notna().all() and not good["memorised"].any()
    copy = ext.loc["benign/copy.png"]
    assert copy["status"] == "rejected" and bool(copy["memorised"]) and copy["nearest_seed"] == seed_row["sample_id"]
    assert copy["reason"].startswith(f"near-copy of seed {seed_row['sample_id']}")
    broken = ext.loc["benign/broken.png"]
    assert broken["status"] == "quarantined" and broken["reason"].startswith(("truncated", "not an image")), broken["reason"]
    assert ext.loc["stray.png", "reason"].startswith("not in a class folder")
    # the factory's own rows are untouched sources
    assert set(df.loc[df["source"] != "ext", "source"].fillna("dermt2im")) == {"dermt2im"}
    assert report["seeds_compared"] == len(data.seeds)
    by_source = {r["source"]: r for r in json.loads((workdir.reports / "quality.json").read_text())["by_source"]}
    assert by_source["ext"]["accepted"] == 10 and by_source["ext"]["rejected"] == 1


def test_validation_restricted_to_a_source_uses_exactly_its_images(external, workdir, tmp_path):
    _, src, _ = external
    cfg = tiny_with_full_gate()
    import_synthetic(workdir, src, "ext", cfg.ingest)
    run_stage(QualityStage(workdir, cfg.quality))
    df = synthetic_view(workdir)
    usable_ext = set(df.loc[(df["source"] == "ext") & (df["status"] == "accepted"), "path"])
    assert len(usable_ext) == 10

    spec = tiny_config(regimes=["baseline", "hybrid"], synthetic_sources=["ext", "dermt2im"], epochs=1).validation
    mixtures, skipped = plan_mixtures(load_inputs(workdir), spec)
    by_regime = {m.regime.name: m for m in mixtures}
    assert set(by_regime) == {"baseline", "hybrid@ext", "hybrid@dermt2im"} and not skipped
    ext_items = {p for p, _, s in by_regime["hybrid@ext"].items if s == "synthetic"}
    assert ext_items == usable_ext  # 18 asked for, all 10 usable ones taken, nothing from elsewhere
    own = {p for p, _, s in by_regime["hybrid@dermt2im"].items if s == "synthetic"}
    assert own and not own & usable_ext

    report = run_validation(workdir, tiny_config("imports-side-by-side", regimes=["baseline", "hybrid@ext"], epochs=1))
    table = pd.read_csv(workdir.reports / "table_iv.csv")
    assert set(zip(table["regime"], table["synthetic_source"])) == {("baseline", "none"), ("hybrid@ext", "ext")}
    assert report.runs == 2 and "Synthetic source" in report.table_path.read_text()
    from dermt2im.core.tracking import open_tracker  # the shortcut audit sits on the comparison's parent run

    tracker = open_tracker(workdir, tiny_config().tracking)
    parent = tracker.run(report.parent_run_id)
    assert parent.metrics["flag_rate.ext.benign.ruler"] == 0.0 and "dermt2im.shortcuts" in parent.tags
    assert (tracker.download(report.parent_run_id, "quality", tmp_path / "dl") / "quality.json").is_file()

    with pytest.raises(ValidationError, match="'elsewhere'.*not in the synthetic manifest"):
        plan_mixtures(load_inputs(workdir), tiny_config(synthetic_sources=["elsewhere"]).validation)


def test_import_refuses_a_bad_name_or_a_real_dataset_layout(tmp_path, workdir):
    (tmp_path / "src" / "benign").mkdir(parents=True)
    for bad in ("", "dermt2im", "../x", "a b"):
        with pytest.raises(SyntheticImportError):
            import_synthetic(workdir, tmp_path / "src", bad, IngestConfig())
    (tmp_path / "isic").mkdir()
    (tmp_path / "isic" / "metadata.csv").write_text("isic_id,diagnosis\nISIC_1,nevus\n")
    with pytest.raises(SyntheticImportError, match="import-synthetic reads class folders or a file,label CSV"):
        import_synthetic(workdir, tmp_path / "isic", "x", IngestConfig())


def test_reimport_keeps_verdicts_and_a_changed_or_gone_file_is_seen(external, workdir):
    _, src, _ = external
    cfg = tiny_with_full_gate()
    import_synthetic(workdir, src, "ext", cfg.ingest)
    run_stage(QualityStage(workdir, cfg.quality))
    before = synthetic_view(workdir).set_index("path")
    assert import_synthetic(workdir, src, "ext", cfg.ingest).new == 0
    pd.testing.assert_frame_equal(synthetic_view(workdir).set_index("path"), before)
    changed, gone = src / "malignant" / "00001.png", src / "malignant" / "00002.png"
    changed.write_bytes(a1111_png(render("malignant", np.random.default_rng(77), 32, "isic", "drawn"),
                                  "malignant", 40, 1))
    gone.unlink()
    report = import_synthetic(workdir, src, "ext", cfg.ingest)
    after = synthetic_view(workdir).set_index("path")
    assert report.changed == 1 and after.loc[str(changed), "status"] == "rendered"
    assert after.loc[str(changed), "sample_key"] == before.loc[str(changed), "sample_key"]
    assert after.loc[str(gone), "status"] == "quarantined" and after.loc[str(gone), "reason"].startswith("file not found")
