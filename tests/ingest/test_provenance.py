"""Provenance at the door: generated images are quarantined as synthetic, naming the generator, and
a factory workdir is never scanned as a source."""

from __future__ import annotations

import io
import os

import pandas as pd
import pytest
from PIL import Image

from dermt2im.core.manifest import SEEDS, read_manifest
from dermt2im.core.specs import IngestConfig
from dermt2im.core.workdir import WORKDIR_MARKER, Workdir
from dermt2im.ingest.layouts import IngestError
from dermt2im.ingest.provenance import read_generation
from dermt2im.ingest.stage import Dataset, IngestStage, ingest_source
from tests.ingest.ingest_fixtures import jpeg, put
from tests.ingest.provenance_fixtures import (
    XMP_GENERATED,
    a1111_jpeg,
    a1111_png,
    comfyui_png,
    own_png,
    pixels,
    png_with,
    software_jpeg,
    xmp_png,
)

GENERATED = {
    "a1111.png": (a1111_png, "synthetic: AUTOMATIC1111, Steps 20, Euler a, CFG 7, model hash 6ce0161689"),
    "comfyui.png": (comfyui_png, "synthetic: ComfyUI, Steps 25, euler, CFG 6.5, model v1-5-pruned-emaonly.safetensors"),
    "own.png": (own_png, "synthetic: dermt2im (this factory's own render), sample benign-000003, Steps 5, euler"),
    "xmp.png": (xmp_png, "synthetic: IPTC DigitalSourceType trainedAlgorithmicMedia"),
    "a1111.jpg": (a1111_jpeg, "synthetic: AUTOMATIC1111, Steps 20, Euler a"),
    "novelai.jpg": (lambda s: software_jpeg(s, "NovelAI"), "synthetic: Software 'NovelAI'"),
}


def _source(root):
    """Real JPEGs and one generated file of every kind, in class folders."""
    for i in range(3):
        put(root / "benign" / f"real-{i}.jpg", jpeg(i))
        put(root / "malignant" / f"real-{i}.jpg", jpeg(10 + i))
    for k, (name, (make, _)) in enumerate(sorted(GENERATED.items())):
        put(root / ("benign", "malignant")[k % 2] / name, make(3))
    return root


def test_generated_images_are_quarantined_as_synthetic_naming_the_generator(tmp_path):
    src = _source(tmp_path / "src")
    report = ingest_source(src, tmp_path / "seeds.parquet", IngestConfig(min_side=8))
    df = read_manifest(tmp_path / "seeds.parquet", SEEDS)
    df["name"] = df["source_path"].map(os.path.basename)
    rows = df.set_index("name")
    for name, (_, reason) in GENERATED.items():
        assert rows.at[name, "status"] == "quarantined", name
        assert rows.at[name, "reason"].startswith(reason), (name, rows.at[name, "reason"])
        assert rows.at[name, "provenance"] == rows.at[name, "reason"].removeprefix("synthetic: ")
        assert pd.isna(rows.at[name, "split"])
    real = rows[rows.index.str.startswith("real-")]
    assert set(real["status"]) == {"accepted"} and set(real["provenance"]) == {""}
    assert report.reasons == {"synthetic": len(GENERATED)} and report.accepted == 6


def test_generated_images_never_reach_a_test_set(tmp_path):
    src = _source(tmp_path / "src")
    ingest_source(src, tmp_path / "test.parquet", IngestConfig(min_side=8), split="test")
    df = read_manifest(tmp_path / "test.parquet", SEEDS)
    generated = df[df["source_path"].map(lambda p: not os.path.basename(p).startswith("real-"))]
    assert len(generated) == len(GENERATED) and set(generated["status"]) == {"quarantined"}
    assert set(df.loc[df["split"] == "test", "source_path"].map(os.path.basename)) == {"real-0.jpg", "real-1.jpg",
                                                                                          "real-2.jpg"}


def test_a_synthetic_reason_wins_over_other_problems(tmp_path):
    """A generated file in no class folder is still called what it is."""
    src = tmp_path / "src"
    put(src / "benign" / "a.jpg", jpeg(1))
    put(src / "loose.png", a1111_png(2))
    ingest_source(src, tmp_path / "seeds.parquet", IngestConfig(min_side=8))
    df = read_manifest(tmp_path / "seeds.parquet", SEEDS)
    loose = df[df["source_path"].str.endswith("loose.png")].iloc[0]
    assert loose["reason"].startswith("synthetic: AUTOMATIC1111")


def test_metadata_that_names_no_generator_is_not_provenance():
    assert read_generation(jpeg(1)) is None
    assert read_generation(software_jpeg(1, "Adobe Photoshop 25.0 (Macintosh)")) is None
    assert read_generation(png_with(pixels(1), {"Comment": "dermatoscope DL4, 10x", "Software": "GIMP 2.10"})) is None
    camera = png_with(pixels(1), itxt={"XML:com.adobe.xmp": XMP_GENERATED.replace("trainedAlgorithmicMedia",
                                                                                  "digitalCapture")})
    assert read_generation(camera) is None


def test_xmp_in_a_jpeg_and_truncated_metadata():
    buf = io.BytesIO()
    Image.fromarray(pixels(4)).save(buf, format="JPEG", xmp=XMP_GENERATED.encode())
    assert read_generation(buf.getvalue()).generator == "IPTC DigitalSourceType trainedAlgorithmicMedia"
    assert read_generation(a1111_png(5)[:60]) is None  # cut inside the first chunk: says nothing, never raises
    broken = png_with(pixels(6), {"parameters": "Steps: x, Sampler:, CFG scale: ?"})
    assert read_generation(broken).generator == "AUTOMATIC1111"


def test_a_workdir_inside_the_source_is_skipped(tmp_path):
    src = tmp_path / "data"
    for i in range(2):
        put(src / "benign" / f"b{i}.jpg", jpeg(i))
        put(src / "malignant" / f"m{i}.jpg", jpeg(10 + i))
    w = Workdir.at(src / "dermt2im-work")  # the default ./dermt2im-work, run from the data folder
    assert (w.root / WORKDIR_MARKER).is_file()
    # the factory's own outputs, in folders that look like class folders, without any metadata chunk
    put(w.synthetic / "benign" / "benign-000000.png", png_with(pixels(7)))
    put(w.root / "data" / "seeds" / "malignant" / "ph.png", png_with(pixels(8)))
    stage = IngestStage(IngestConfig(min_side=8), [Dataset("seeds", str(src), str(w.seeds_manifest))], w)
    key = stage.key(stage.units()[0])
    stage.run(stage.units()[0], key)
    df = read_manifest(w.seeds_manifest, SEEDS)
    assert len(df) == 4 and not df["source_path"].str.contains("dermt2im-work").any()
    put(w.synthetic / "malignant" / "malignant-000001.png", png_with(pixels(9)))  # the workdir grows
    assert stage.key(stage.units()[0]) == key  # ... and the source has not changed


def test_a_workdir_is_refused_as_the_source(tmp_path):
    w = Workdir.at(tmp_path / "work")
    put(w.synthetic / "benign" / "benign-000000.png", own_png(1))
    with pytest.raises(IngestError, match="is a derm-t2im workdir"):
        ingest_source(w.root, tmp_path / "seeds.parquet", IngestConfig(min_side=8))
    with pytest.raises(IngestError, match="is a derm-t2im workdir"):
        ingest_source(w.synthetic.parent, tmp_path / "seeds.parquet", IngestConfig(min_side=8))


def test_reingest_reads_provenance_of_rows_made_before_it_existed(tmp_path):
    """A manifest written before the provenance column: its rows are looked at again, not trusted."""
    from dermt2im.core.manifest import write_manifest

    src = tmp_path / "src"
    put(src / "benign" / "gen.png", a1111_png(1))
    put(src / "benign" / "real.jpg", jpeg(2))
    manifest = tmp_path / "seeds.parquet"
    ingest_source(src, manifest, IngestConfig(min_side=8))
    old = read_manifest(manifest, SEEDS)
    old["provenance"], old["status"], old["reason"] = None, "accepted", None  # as an older version left it
    write_manifest(old, manifest, SEEDS)
    ingest_source(src, manifest, IngestConfig(min_side=8))
    df = read_manifest(manifest, SEEDS)
    gen = df[df["source_path"].str.endswith("gen.png")].iloc[0]
    assert gen["status"] == "quarantined" and gen["reason"].startswith("synthetic: AUTOMATIC1111")


def test_validation_refuses_a_real_image_byte_identical_to_a_synthetic_one(workdir):
    """The last line of defence: a generated file that reached a real split by any route stops validation."""
    from dermt2im.validate.inputs import ValidationError, load_inputs
    from tests.manifests import write_seeds, write_synthetic
    from tests.validate.validate_fixtures import make_validation_data

    data = make_validation_data(workdir, n_train=4, n_val=2, n_test=2, n_synthetic=2, n_external=2)
    seeds = data.seeds.copy()
    seeds.loc[seeds["split"] == "test", "sample_id"] = data.synthetic["sha256"].iloc[0]
    write_seeds(workdir.seeds_manifest, seeds.drop_duplicates("source_path"))
    with pytest.raises(ValidationError, match="byte-identical to synthetic image benign-000000"):
        load_inputs(workdir)
    write_synthetic(workdir, data.synthetic.iloc[1:])
    load_inputs(workdir)  # once the synthetic row is gone, nothing is refused


def test_invokeai_and_fooocus_metadata_are_read():
    import json

    invoke = {"positive_prompt": "a nevus", "negative_prompt": "text", "width": 512, "height": 512, "seed": 7,
              "cfg_scale": 7.5, "steps": 30, "scheduler": "euler", "model": {"name": "sd-1.5", "hash": "blake3:ab12"}}
    found = read_generation(png_with(pixels(1), {"invokeai_metadata": json.dumps(invoke)}))
    assert (found.generator, found.steps, found.sampler, found.cfg, found.model_hash) == \
        ("InvokeAI", 30, "euler", 7.5, "blake3:ab12")
    fooocus = {"prompt": "a mole", "steps": 30, "sampler": "dpmpp_2m_sde_gpu", "guidance_scale": 4, "seed": 3,
               "resolution": "(1024, 1024)", "base_model": "juggernautXL"}
    found = read_generation(png_with(pixels(2), {"parameters": json.dumps(fooocus), "fooocus_scheme": "fooocus"}))
    assert (found.generator, found.width, found.model) == ("Fooocus", 1024, "juggernautXL")
