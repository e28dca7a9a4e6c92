"""The dataset card ``dermt2im export`` writes: Hugging Face YAML metadata whose licence follows from
the seeds' licences and the base model's, counts per class / sampler / transformation / skin tone,
the gate and the audit, the fidelity table, and an imported set's own provenance and licence."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest
import yaml

from dermt2im.core.manifest import SEEDS, read_manifest, write_manifest
from dermt2im.core.specs import FidelityConfig, GenerateConfig, QualityConfig
from dermt2im.export import export_imagefolder
from dermt2im.fidelity.card import OPENRAIL, base_model_licence
from tests.fidelity.fidelity_fixtures import fidelity_workdir, phantom

pytestmark = pytest.mark.xdist_group("fidelity-card")
SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    from dermt2im.core.workdir import Workdir
    from dermt2im.fidelity.stage import FidelityStage
    from dermt2im.quality.stage import assess

    w = fidelity_workdir(Workdir.at(tmp_path_factory.mktemp("card") / "w"), n_synthetic=16)
    assess(w, QualityConfig())
    stage = FidelityStage(w, FidelityConfig(bootstrap=0, frd=False, noise_images=4), QualityConfig(), GenerateConfig())
    return w, stage.run(stage.UNIT, stage.key(stage.UNIT))["csv"]


def front_matter(readme: str) -> dict:
    m = re.match(r"---\n(.*?)\n---\n", readme, re.S)
    assert m, readme[:200]
    return yaml.safe_load(m.group(1))


def export(w, out, csv=None, base_model=SD15):
    path = export_imagefolder(w, out, base_model=base_model, fidelity_csv=csv)
    return (path / "README.md").read_text(), pd.read_csv(path / "metadata.csv")


def with_seed_licences(w, licences: dict[int, str]):
    """Rewrite the seeds' licences (row position -> licence id); returns the original manifest."""
    seeds = read_manifest(w.seeds_manifest, SEEDS)
    changed = seeds.copy()
    for i, lic in licences.items():
        changed.loc[changed.index[i], ["license", "license_note", "attribution"]] = [lic, f"test: {lic}", "Hospital X"]
    write_manifest(changed, w.seeds_manifest, SEEDS)
    return seeds


def test_cc0_seeds_and_stable_diffusion_give_cc0_and_openrail(made, tmp_path):
    w, csv = made
    readme, meta = export(w, tmp_path / "out", csv)
    head = front_matter(readme)
    assert head["license"] == ["cc0-1.0", OPENRAIL] and head["task_categories"] == ["image-classification"]
    assert head["annotations_creators"] == ["machine-generated"] and head["size_categories"] == ["n<1K"]
    assert "Every seed image is CC0" in readme and "CreativeML OpenRAIL-M" in readme
    assert "**to provide medical advice or to interpret medical results**" in readme
    assert "Resulting terms: the base model's use restrictions apply" in readme
    # what they are and are not; counts by class, sampler, transformation and skin tone
    assert "What they are **not**" in readme and "not a histopathological finding" in readme
    for by in ("| label | benign |", "| sampler | euler |", "| transformation | , on fair skin, Fitzpatrick type I |",
               "| skin_tone | very light |"):
        assert by in readme, by
    assert f"| dermt2im | 16 | {len(meta)} |" in readme  # the gate: assessed, accepted, ...
    assert "held-out real (floor)" in readme and "noise (ceiling)" in readme  # the fidelity table
    assert "LoRA sha256 " + "0" * 64 in readme
    # per image: skin tone and typicality from the gate's fidelity manifest
    assert meta["skin_tone"].notna().all() and meta["ita"].notna().all() and meta["typicality"].between(0, 1).all()


def test_one_non_commercial_seed_makes_the_set_non_commercial(made, tmp_path):
    w, _ = made
    original = with_seed_licences(w, {0: "CC-BY-NC-4.0", 1: "CC-BY-4.0"})
    try:
        readme, _ = export(w, tmp_path / "out")
    finally:
        write_manifest(original, w.seeds_manifest, SEEDS)
    head = front_matter(readme)
    assert head["license"] == ["cc-by-nc-4.0", OPENRAIL]
    assert "the set is for NON-COMMERCIAL use" in readme and "**non-commercial use only** (a CC BY-NC seed)" in readme
    assert "Attribution owed for the seed images (as recorded at ingest): Hospital X" in readme
    assert "No fidelity report was available" in readme  # none given: the card says so


def test_an_unknown_seed_licence_leaves_the_terms_open(made, tmp_path):
    w, _ = made
    original = with_seed_licences(w, {3: "unknown"})
    try:
        readme, _ = export(w, tmp_path / "out", base_model="tiny")
    finally:
        write_manifest(original, w.seeds_manifest, SEEDS)
    assert front_matter(readme)["license"] == ["unknown", "apache-2.0"]
    assert "**terms open**: some seed licences are unknown" in readme and "1 seed image(s) have no licence" in readme


def test_an_imported_set_carries_its_own_provenance_and_licence(made, tmp_path, mlflow_uri):
    """(``mlflow_uri``: the fidelity report the import makes logs its runs to a store of this test's own.)"""
    from PIL import Image
    from typer.testing import CliRunner

    from dermt2im.cli import app

    w, _ = made
    src = tmp_path / "ext"
    for i in range(8):
        label = ("benign", "malignant")[i % 2]
        (src / label).mkdir(parents=True, exist_ok=True)
        Image.fromarray(phantom(label, [5, i])).save(src / label / f"{i}.png")
    (src / "LICENSE").write_text("Creative Commons Attribution-NonCommercial 4.0 International")
    runner = CliRunner()
    common = ["--workdir", str(w.root), "--config", "tiny", "--set", "fidelity.frd=false",
              "--set", "fidelity.noise_images=4", "--set", "fidelity.bootstrap=0"]
    r = runner.invoke(app, ["import-synthetic", str(src), "--name", "ext", *common])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["export", str(tmp_path / "out"), "--workdir", str(w.root)])
    assert r.exit_code == 0, r.output
    readme = (tmp_path / "out" / "README.md").read_text()
    meta = pd.read_csv(tmp_path / "out" / "metadata.csv")
    assert "dataset card:" in r.output and set(meta["source"]) == {"dermt2im", "ext"}
    assert front_matter(readme)["license"] == ["cc0-1.0", "apache-2.0", "cc-by-nc-4.0"]  # tiny: the tiny model
    assert "### Imported set `ext`" in readme and "CC-BY-NC-4.0 8 image(s)" in readme
    assert "`ext` (imported)" in readme and "Its terms are its own" in readme
    assert (meta.loc[meta["source"] == "ext", "license"] == "CC-BY-NC-4.0").all()
    assert "| source | ext |" in readme and "Run `ext`" not in readme  # counts by source; fidelity rows by set
    assert "| ext |" in readme  # the fidelity table, made for the export, has the imported set


def test_base_model_licences(tmp_path):
    assert base_model_licence("tiny@0123").hf_id == "apache-2.0"
    sd = base_model_licence("hub:runwayml/stable-diffusion-v1-5@main")
    assert sd.hf_id == OPENRAIL and any("medical advice" in r for r in sd.restrictions)
    assert base_model_licence("file:abc", "/models/v1-5-pruned-emaonly.safetensors").hf_id == OPENRAIL
    folder = tmp_path / "my-sd"
    folder.mkdir()
    (folder / "README.md").write_text("---\nlicense: cc-by-nc-4.0\n---\n# a model\n")
    assert base_model_licence("dir:xyz", str(folder)).hf_id == "cc-by-nc-4.0"
    assert base_model_licence("dir:xyz", str(tmp_path / "nowhere")).hf_id == "unknown"


def test_the_miniature_model_is_the_projects_own(tmp_path):
    """``train.base_model: mini`` (the smoke preset's), or a file pretrain-mini made, is Apache-2.0: the
    project's own weights, pre-trained from random ones on phantoms; another safetensors file is not."""
    from safetensors.numpy import save_file

    from dermt2im.mini.weights import shipped_path

    for configured in ("mini", str(shipped_path())):
        lic = base_model_licence("file:abc", configured)
        assert lic.hf_id == "apache-2.0" and "miniature" in lic.name and not lic.restrictions, configured
    other = tmp_path / "model.safetensors"
    save_file({"w": np.zeros(2, "float32")}, str(other))
    assert base_model_licence("file:abc", str(other)).hf_id == "unknown"
