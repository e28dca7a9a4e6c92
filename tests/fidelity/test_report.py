"""The fidelity report on stand-ins (``fidelity_fixtures``): the metrics rank held-out real images, an
imperfect generator's images and the random-weight model's noise in that order; every figure has
its interval and sample size; a skin-tone prompt moves the ITA of what was made, and the report says
so; one MLflow run per generation run holds the figures beside the floor and the ceiling; Table IV
takes its fidelity lines from there; and ``dermt2im report`` includes an imported set."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from dermt2im.core.runtime import TrackingConfig
from dermt2im.core.specs import FidelityConfig, GenerateConfig, QualityConfig
from dermt2im.fidelity.report import ImageSet, skin_tone_response
from dermt2im.fidelity.stage import FidelityStage
from tests.fidelity.fidelity_fixtures import fidelity_workdir, phantom

pytestmark = pytest.mark.xdist_group("fidelity-report")  # one worker: the tests share one report
CFG = FidelityConfig(bootstrap=60, frd_filters=("Original",), noise_images=12)
EMB = "seed-cnn"


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    from dermt2im.core.workdir import Workdir
    from dermt2im.quality.stage import assess

    root = tmp_path_factory.mktemp("fidelity")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        w = fidelity_workdir(Workdir.at(root / "w"))
        assess(w, QualityConfig())
        stage = FidelityStage(w, CFG, QualityConfig(), GenerateConfig(), "sks", TrackingConfig())
        summary = stage.run(stage.UNIT, stage.key(stage.UNIT))
        tab = pd.read_csv(summary["csv"], keep_default_na=False, na_values=[""])
        yield w, stage, summary, tab


def row(tab: pd.DataFrame, kind: str, stratum: str = "all", value: str = "all") -> pd.Series:
    m = tab[(tab["kind"] == kind) & (tab["stratum"] == stratum) & (tab["value"] == value)]
    assert len(m) == 1, (kind, stratum, value)
    return m.iloc[0]


@pytest.mark.parametrize("metric", [f"kid.{EMB}", f"fid.{EMB}", "frd"])
def test_distances_rank_held_out_real_below_the_generator_below_noise(made, metric):
    _, _, _, tab = made
    for stratum, value in (("all", "all"), ("label", "benign"), ("label", "malignant")):
        floor, made_, noise = (row(tab, k, stratum, value)[metric] for k in ("floor", "synthetic", "ceiling"))
        assert floor < made_ < noise, (metric, stratum, value, floor, made_, noise)


@pytest.mark.parametrize("metric", [f"precision.{EMB}", f"coverage.{EMB}", f"density.{EMB}", "typicality.median"])
def test_closeness_ranks_held_out_real_above_the_generator_above_noise(made, metric):
    _, _, _, tab = made
    floor, made_, noise = (row(tab, k)[metric] for k in ("floor", "synthetic", "ceiling"))
    assert floor > made_ >= noise, (metric, floor, made_, noise)


def test_every_figure_has_its_interval_and_sample_size(made):
    _, _, _, tab = made
    floor = row(tab, "floor")
    assert (floor["n"], floor["n_reference"]) == (12, 24)
    for metric in (f"kid.{EMB}", f"fid.{EMB}", "frd", f"precision.{EMB}", "ita.median"):
        for kind in ("floor", "synthetic", "ceiling"):
            r = row(tab, kind)
            assert r[f"{metric}.low"] <= r[metric] <= r[f"{metric}.high"], (metric, kind)
            assert r[f"{metric}.n"] == r["n"]
    assert "only 12 images (fewer than 50: unreliable)" in floor["warnings"]
    small = tab[(tab["stratum"] == "label") & (tab["kind"] == "floor")].iloc[0]  # 6 images: no PRDC at all
    assert math.isnan(small[f"precision.{EMB}"]) and "fewer than 7 images: not computed" in small["warnings"]
    # one row per set and stratum: classes, samplers, transformations, skin tones
    synthetic = tab[tab["kind"] == "synthetic"]
    assert set(synthetic["stratum"]) == {"all", "label", "sampler", "transformation", "skin_tone"}
    assert {"euler", "euler_a"} <= set(synthetic["value"]) and "on fair skin, Fitzpatrick type I" in set(synthetic["value"])
    assert set(tab[tab["kind"] != "synthetic"]["stratum"]) <= {"all", "label", "skin_tone"}


def test_a_skin_tone_prompt_moves_the_ita_and_the_report_says_so(made):
    w, _, summary, tab = made
    fair = row(tab, "synthetic", "transformation", "on fair skin, Fitzpatrick type I")["ita.median"]
    medium = row(tab, "synthetic", "transformation", "on medium skin, Fitzpatrick type III")["ita.median"]
    assert fair > medium + 15
    assert len(summary["skin_tone"]) == 1 and "they move it" in summary["skin_tone"][0]
    md = (w.reports / "fidelity.md").read_text()
    assert "prompts for darker skin give darker skin (lower ITA): they move it" in md
    # the gate's decisions per skin tone are in the report (a gate calibrated on light seeds rejects dark skin)
    assert "| dermt2im | dark |" in md


def test_a_prompt_that_is_ignored_does_not_move_the_ita():
    rng = np.random.default_rng(0)
    prompts = [", on fair skin, Fitzpatrick type I", ", on dark brown skin, Fitzpatrick type VI"] * 20
    ignored = ImageSet("synthetic", "ext", pd.DataFrame({"transformation": prompts, "prompt": prompts,
                                                         "ita": rng.normal(45, 5, len(prompts))}))
    response = skin_tone_response(ignored, 200)
    assert response is not None and not response.moves and "do NOT measurably move" in response.sentence()
    followed = ImageSet("synthetic", "ext", ignored.rows.assign(ita=[60.0, -40.0] * 20 + rng.normal(0, 3, 40)))
    assert skin_tone_response(followed, 200).moves
    assert skin_tone_response(ImageSet("synthetic", "x", ignored.rows.assign(transformation="", prompt="")), 10) is None


def test_report_files(made):
    w, _, summary, tab = made
    md = (w.reports / "fidelity.md").read_text()
    for section in ("## All images", "## Per class", "## Per sampler", "## Per transformation", "## Per skin-tone",
                    "## Skin tone", "## Memorisation", "## Typicality", "## Figures", "## Warnings"):
        assert section in md, section
    assert "held-out real (floor)" in md and "noise (ceiling)" in md and "seed-cnn (" in md
    assert set(summary["figures"]) == {"per-class metrics", "per-sampler metrics", "skin tone (ITA)",
                                       "nearest-seed distances"}
    for path in summary["figures"].values():
        assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_one_mlflow_run_per_generation_run_holds_every_figure_beside_floor_and_ceiling(made):
    w, stage, summary, tab = made
    from dermt2im.core.tracking import open_tracker

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{w.root.parent / 'mlflow.db'}")
        tracker = open_tracker(w, TrackingConfig())
        runs = tracker.runs("tags.`dermt2im.kind` = 'fidelity'")
        assert len(runs) == 1 and runs[0].tags["dermt2im.generation_run"] == "dermt2im"
        m = runs[0].metrics
        synthetic = row(tab, "synthetic")
        assert m[f"all/all/kid.{EMB}"] == pytest.approx(synthetic[f"kid.{EMB}"])
        assert m[f"all/all/kid.{EMB}.low"] == pytest.approx(synthetic[f"kid.{EMB}.low"])
        assert m[f"floor/all/all/kid.{EMB}"] == pytest.approx(row(tab, "floor")[f"kid.{EMB}"])
        assert "ceiling/label/benign/frd" in m and "sampler/euler/frd" in m and "label/malignant/frd.n" in m
        assert runs[0].params["base_model"] == "stand-in: degraded phantoms" and runs[0].params["source"] == "dermt2im"
        folder = tracker.download(runs[0].run_id, "fidelity", w.root.parent / "downloaded")
        assert {"fidelity.md", "fidelity.csv", "ita.png", "per_class.png"} <= {p.name for p in folder.iterdir()}
        assert summary["runs"]["dermt2im"]["mlflow_run_id"] == runs[0].run_id

        # Table IV's verdict takes the fidelity of the set a hybrid regime used from there
        from dermt2im.fidelity.tracking import fidelity_lines

        table = pd.DataFrame([{"regime": "baseline", "synthetic_source": "none"},
                              {"regime": "hybrid@dermt2im", "synthetic_source": "dermt2im"}])
        lines = fidelity_lines(tracker, table)
        assert len(lines) == 1 and "hybrid@dermt2im drew on (source dermt2im" in lines[0]
        assert f"{synthetic[f'kid.{EMB}']:.3f}" in lines[0] and "held-out real" in lines[0] and "for noise" in lines[0]


def test_the_report_is_cached_and_dermt2im_report_adds_an_imported_set(made, tmp_path):
    """An imported set of held-out-like phantoms ranks near the floor, far from the factory's stand-in."""
    from typer.testing import CliRunner

    from dermt2im.cli import app

    w, stage, summary, _ = made
    assert stage.finished(stage.UNIT, stage.key(stage.UNIT)) is not None  # nothing changed: up to date
    src = tmp_path / "ext"
    for i in range(16):
        label = ("benign", "malignant")[i % 2]
        (src / label).mkdir(parents=True, exist_ok=True)
        from PIL import Image

        Image.fromarray(phantom(label, [9, i])).save(src / label / f"{i:03d}.png")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{w.root.parent / 'mlflow.db'}")
        runner = CliRunner()
        common = ["--workdir", str(w.root), "--config", "tiny", "--set", "fidelity.bootstrap=60",
                  "--set", "fidelity.noise_images=12"]
        r = runner.invoke(app, ["import-synthetic", str(src), "--name", "ext", *common])
        assert r.exit_code == 0, r.output
        r = runner.invoke(app, ["report", "--workdir", str(w.root)])
        assert r.exit_code == 0, r.output
        assert "Table IV: no comparison run" in r.output and "fidelity report:" in r.output
    tab = pd.read_csv(w.reports / "fidelity.csv", keep_default_na=False, na_values=[""])
    ext, own = row_of(tab, "ext"), row_of(tab, "dermt2im")
    assert ext["n"] == 16 and ext[f"kid.{EMB}"] < own[f"kid.{EMB}"] and ext["frd"] < own["frd"]
    assert ext[f"precision.{EMB}"] > own[f"precision.{EMB}"]
    assert "Run `ext`**: imported set" in (w.reports / "fidelity.md").read_text()


def row_of(tab: pd.DataFrame, name: str) -> pd.Series:
    m = tab[(tab["kind"] == "synthetic") & (tab["set"] == name) & (tab["stratum"] == "all")]
    assert len(m) == 1
    return m.iloc[0]


def test_without_seeds_there_is_no_report_and_it_says_why(workdir):
    stage = FidelityStage(workdir, CFG, QualityConfig(), GenerateConfig())
    out = stage.run(stage.UNIT, stage.key(stage.UNIT))
    assert "needs accepted, preprocessed training seeds" in out["skipped"]
    assert "no fidelity report" in (workdir.reports / "fidelity.md").read_text()
