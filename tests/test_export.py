"""Export of the accepted synthetic set as a Hugging Face imagefolder dataset."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from dermt2im.export import ExportError, export_imagefolder
from dermt2im.quality.stage import assess
from tests.quality.gate_config import tiny_with_full_gate
from tests.quality.test_quality import (
    altered_copy,
    bad_images,
    phantom,
    seed_workdir,
    synthetic_workdir,
)


def _imagefolder_load(out):
    """What ``datasets.load_dataset("imagefolder", data_dir=out)`` does with a metadata.csv: every
    row's ``file_name`` is resolved relative to the metadata file; other columns become features."""
    meta = pd.read_csv(out / "metadata.csv")
    assert meta["file_name"].is_unique
    images = [np.asarray(Image.open(out / f).convert("RGB")) for f in meta["file_name"]]
    return meta, images


@pytest.fixture
def assessed(workdir):
    seeds = seed_workdir(workdir, n_seeds=2)
    images = {f"benign-{i:06d}": phantom("benign", 40 + i) for i in range(3)}
    images.update({f"malignant-{i:06d}": phantom("malignant", 50 + i) for i in range(2)})
    images["benign-000007"] = bad_images()["noise"]
    images["malignant-000008"] = altered_copy(seeds[1][1])  # memorised
    synthetic_workdir(workdir, images)
    return assess(workdir, tiny_with_full_gate(["quality.exclude_memorised=false"]).quality)


def test_export_writes_class_folders_and_metadata_that_load_back(workdir, tmp_path, assessed):
    out = export_imagefolder(workdir, tmp_path / "export")
    meta, images = _imagefolder_load(out)
    assert sorted(meta["sample_key"]) == ["benign-000000", "benign-000001", "benign-000002", "malignant-000000",
                                          "malignant-000001"]  # accepted, memorised copy left out
    for row, img in zip(meta.itertuples(), images):
        assert row.file_name.split("/")[0] == row.label  # folder == label column
        assert img.shape == (128, 128, 3)
    assert set(meta["label"]) == {"benign", "malignant"} and (meta["status"] == "accepted").all()
    assert {"prompt", "sampler", "seed", "steps", "guidance_scale", "sha256"} <= set(meta.columns)
    assert sorted(p.name for p in out.iterdir()) == [".dermt2im-export", "README.md", "benign", "malignant", "metadata.csv"]
    # pixels are the synthetic files, untouched
    src = np.asarray(Image.open(workdir.synthetic / "benign" / "benign-000001.png").convert("RGB"))
    assert np.array_equal(images[list(meta["sample_key"]).index("benign-000001")], src)


def test_export_options_and_atomic_replacement(workdir, tmp_path, assessed):
    out = tmp_path / "export"
    export_imagefolder(workdir, out)
    (out / "stray.txt").write_text("from an older export")
    export_imagefolder(workdir, out, include_rejected=True)
    meta, _ = _imagefolder_load(out)
    assert "benign-000007" in set(meta["sample_key"]) and "malignant-000008" not in set(meta["sample_key"])
    assert not (out / "stray.txt").exists()  # the folder was replaced as a whole
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries left
    export_imagefolder(workdir, out, include_rejected=True, include_memorised=True)
    assert "malignant-000008" in set(pd.read_csv(out / "metadata.csv")["sample_key"])


def test_export_needs_assessed_images(workdir, tmp_path):
    with pytest.raises(ExportError, match="generate"):
        export_imagefolder(workdir, tmp_path / "x")
    synthetic_workdir(workdir, {"benign-000000": phantom()})
    with pytest.raises(ExportError, match="quality"):
        export_imagefolder(workdir, tmp_path / "x")
    synthetic_workdir(workdir, {"benign-000000": bad_images()["blank"]})
    assess(workdir, tiny_with_full_gate().quality)
    with pytest.raises(ExportError, match="0 of 1 .*blank"):
        export_imagefolder(workdir, tmp_path / "x")
    assert not (tmp_path / "x").exists()
