"""The gate records each image's typicality and skin tone in the fidelity manifest, flags images far
from the seeds in the learned embedding as ``atypical`` (a photograph of a face, noise) and rejects
them when ``quality.reject_flags`` names the flag; the quality report says how many held-out real
images the cut would reject."""

from __future__ import annotations

import cv2
import numpy as np
import pandas as pd
import pytest

from dermt2im.core.manifest import FIDELITY, SYNTHETIC, read_manifest, upsert
from dermt2im.core.specs import QualityConfig
from dermt2im.core.views import synthetic_view
from dermt2im.quality.stage import QualityStage, assess
from tests.fidelity.fidelity_fixtures import SIZE, _write, fidelity_workdir


def odd_rows(workdir) -> pd.DataFrame:
    """A photographed face and plain noise, as if rendered: nothing a dermatologist would keep."""
    from skimage.data import astronaut

    face = cv2.resize(astronaut()[0:300, 100:400], (SIZE, SIZE), interpolation=cv2.INTER_AREA)
    noise = np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3)).astype(np.uint8)
    rows = []
    for i, (name, rgb) in enumerate((("face", face), ("noise", noise))):
        path, sha = _write(workdir.data / "odd" / f"{name}.png", rgb)
        rows.append({"sample_key": f"benign-9000{i}", "label": "benign", "index": 9000 + i, "prompt": "x",
                     "sampler": "euler", "steps": 20, "width": SIZE, "height": SIZE, "shard": 0, "path": path,
                     "sha256": sha, "source": "dermt2im", "status": "rendered"})
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def gated(tmp_path_factory):
    from dermt2im.core.workdir import Workdir

    w = fidelity_workdir(Workdir.at(tmp_path_factory.mktemp("gate") / "w"), n_synthetic=16)
    upsert(w.synthetic_manifest, odd_rows(w), SYNTHETIC)
    report = assess(w, QualityConfig(max_high_frequency_ratio=1.0))  # noise must reach the typicality check
    return w, report


def test_the_gate_records_typicality_and_skin_tone_per_image(gated):
    w, _ = gated
    measured = read_manifest(w.fidelity_manifest, FIDELITY).set_index("sample_key")
    syn = synthetic_view(w).set_index("sample_key")
    assert set(measured.index) == set(syn.index)  # every assessed image, keyed like the synthetic manifest
    assert set(syn.index) == set(read_manifest(w.synthetic_manifest, SYNTHETIC)["sample_key"])  # the renders
    assert (measured["sha256"] == syn.loc[measured.index, "sha256"]).all()
    assert measured["embedding"].str.startswith("seed-cnn (").all()
    assert measured["typicality"].between(0, 1).all() and measured["ita"].notna().sum() >= 16
    assert set(measured["skin_tone"]) <= {"very light", "light", "intermediate", "tan", "brown", "dark", "undefined"}


def test_a_face_and_noise_are_atypical_and_flagged(gated):
    w, _ = gated
    measured = read_manifest(w.fidelity_manifest, FIDELITY).set_index("sample_key")
    syn = synthetic_view(w).set_index("sample_key")
    odd = ["benign-90000", "benign-90001"]
    assert measured.loc[odd, "atypical"].all() and (measured.loc[odd, "typicality"] == 0).all()
    assert all("atypical" in str(syn.at[k, "flags"]) for k in odd)
    assert syn.at["benign-90000", "status"] == "accepted"  # the small face passes every other check: a flag only
    # the degraded stand-ins of the seeds' own skin tones lie nearer than the face and the noise (darker-skinned
    # ones lie far too: the seeds have none, which is why the flag does not reject by default)
    like_seeds = syn.loc[measured.index.drop(odd), "transformation"].isin(["", ", on fair skin, Fitzpatrick type I"])
    nearest_odd = measured.loc[odd, "typicality_distance"].min()
    assert nearest_odd > measured.loc[like_seeds[like_seeds].index, "typicality_distance"].max()
    md = (w.reports / "quality.md").read_text()
    assert "## Typicality (`atypical`)" in md and "held-out real images (each judged by the cut of the others)" in md


def test_atypical_rejects_when_reject_flags_names_it(gated):
    w, _ = gated
    assess(w, QualityConfig(max_high_frequency_ratio=1.0, reject_flags=("face", "text", "atypical")))
    syn = synthetic_view(w).set_index("sample_key")
    assert syn.at["benign-90000", "status"] == "rejected"
    assert syn.at["benign-90000", "reason"].startswith("atypical: farther from the training seeds")


def test_a_gate_key_follows_the_seeds_splits(gated):
    w, _ = gated
    stage = QualityStage(w, QualityConfig())
    before = stage.key("synthetic")
    from dermt2im.core.manifest import SEEDS, write_manifest

    seeds = read_manifest(w.seeds_manifest, SEEDS)
    moved = seeds.copy()
    moved.loc[moved["split"] == "val", "split"] = "train"  # another training split: another embedding
    write_manifest(moved, w.seeds_manifest, SEEDS)
    try:
        assert stage.key("synthetic") != before
    finally:
        write_manifest(seeds, w.seeds_manifest, SEEDS)
