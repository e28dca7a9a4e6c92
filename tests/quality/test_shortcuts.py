"""The shortcut audit (per-class flag rates, call-outs, quality.balance_flags) and cuts calibrated on
the workdir's seeds, through ``assess``."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from dermt2im.core.fileio import atomic_write_bytes, sha256_bytes
from dermt2im.core.imaging import encode_png
from dermt2im.core.manifest import FLAG_RATES, SYNTHETIC, read_manifest, write_manifest
from dermt2im.core.views import synthetic_view
from dermt2im.core.specs import QualityConfig
from dermt2im.phantoms import render_phantom
from dermt2im.quality.shortcuts import REAL, audit_shortcuts, balance, find_shortcuts, rate_table
from dermt2im.quality.stage import assess
from tests.quality import artefacts
from tests.quality.test_quality import synthetic_workdir
from tests.manifests import write_seeds


def frame(label: str, n: int, flagged: int, start: int = 0) -> pd.DataFrame:
    return pd.DataFrame({"label": label, "flags": ["ruler,hair" if i < flagged else "" for i in range(n)],
                         "index": range(start, start + n), "source": "s"})


def test_a_flag_much_more_frequent_in_one_class_is_called_out_and_balanced():
    accepted = pd.concat([frame("benign", 20, 2), frame("malignant", 20, 12, 100)], ignore_index=True)
    found = find_shortcuts(rate_table({"s": accepted}), 0.1)
    assert {s.flag for s in found} == {"ruler", "hair"}
    ruler = next(s for s in found if s.flag == "ruler")
    assert ruler.higher == "malignant" and ruler.rates == {"benign": 0.1, "malignant": 0.6}
    assert "ruler flag is on 60% of accepted malignant images but 10% of benign" in ruler.sentence()
    dropped = balance(accepted, ruler)
    left = accepted.drop(index=dropped)
    rate = left.loc[left["label"] == "malignant", "flags"].str.contains("ruler").mean()
    assert rate <= 0.1 and len(dropped) == 12 - int(rate * (20 - len(dropped)))
    assert set(accepted.loc[dropped, "label"]) == {"malignant"}


def test_similar_rates_and_tiny_samples_are_not_called_out():
    assert find_shortcuts(rate_table({"s": pd.concat([frame("benign", 40, 10), frame("malignant", 40, 13)])}), 0.1) == []
    assert find_shortcuts(rate_table({"s": pd.concat([frame("benign", 3, 0), frame("malignant", 3, 2)])}), 0.1) == []


def test_balancing_is_off_by_default_and_real_seeds_are_reported_apart():
    accepted = pd.concat([frame("benign", 20, 0), frame("malignant", 20, 15, 100)], ignore_index=True)
    seeds = pd.concat([frame("benign", 10, 1), frame("malignant", 10, 1)], ignore_index=True)
    rows, shortcuts, rejected = audit_shortcuts(accepted, seeds, QualityConfig())
    assert shortcuts and rejected == {}
    assert {(r["images"], r["label"]) for r in rows} == {("s", "benign"), ("s", "malignant"), (REAL, "benign"),
                                                         (REAL, "malignant")}
    _, _, rejected = audit_shortcuts(accepted, seeds, QualityConfig(balance_flags=True))
    assert rejected and all(r.startswith("shortcut: ") for r in rejected.values())


@pytest.fixture
def seeded(workdir):
    """24 processed phantom seeds (enough to calibrate on), as preprocess leaves them."""
    rows = []
    for i in range(24):
        label = ("benign", "malignant")[i % 2]
        data = encode_png(render_phantom(label, np.random.default_rng(300 + i), size=128))
        sid = sha256_bytes(data)
        path = atomic_write_bytes(workdir.processed / f"{sid}.png", data)
        rows.append({"sample_id": sid, "source_path": f"/seeds/{i}.png", "label": label, "status": "accepted",
                     "split": "train", "processed_path": str(path), "preprocess_key": "k", "hair_fraction": 0.0})
    write_seeds(workdir.seeds_manifest, rows)
    return workdir


def test_assess_calibrates_on_the_seeds_and_audits_a_ruler_shortcut(seeded):
    images = {}
    for i in range(8):
        images[f"benign-{i:06d}"] = render_phantom("benign", np.random.default_rng(600 + i), size=256)
        lesion = render_phantom("malignant", np.random.default_rng(700 + i), size=256)
        images[f"malignant-{i:06d}"] = artefacts.draw_ruler(lesion, period=8, length=0.6, at=(0.8, 0.5))
    synthetic_workdir(seeded, images)
    report = assess(seeded, QualityConfig())
    assert report.accepted == 16 and report.seeds_compared == 24
    assert any("ruler flag is on 100% of accepted malignant" in s for s in report.shortcuts), report.shortcuts
    # the rates beside the verdicts, in the quality stage's own table (what validation and the UI read)
    rates = read_manifest(seeded.flag_rates_manifest, FLAG_RATES).set_index(["images", "label"])
    assert rates.loc[("dermt2im", "malignant"), "ruler"] == 1.0 and rates.loc[("dermt2im", "benign"), "ruler"] == 0.0
    assert "ruler flag is on 100%" in rates.loc[("dermt2im", "malignant"), "shortcut"]
    assert pd.isna(rates.loc[("dermt2im", "benign"), "shortcut"]) and ("real seeds", "benign") in rates.index
    quality = json.loads((seeded.reports / "quality.json").read_text())
    origins = {c["field"]: c["origin"] for c in quality["cuts"]}
    assert origins["min_sharpness"].startswith("calibrated on 24 seeds"), origins
    assert set(quality["seed_checks"]) >= {"blur", "blank", "noise", "no-lesion", "face", "text", "ruler"}
    assert "ruler" in (seeded.reports / "quality.md").read_text().split("## Shortcut audit")[1]

    balanced = assess(seeded, QualityConfig(balance_flags=True))
    df = synthetic_view(seeded).set_index("sample_key")
    rejected = df[df["status"] == "rejected"]
    assert balanced.reasons == {"shortcut": 8} and set(rejected["label"]) == {"malignant"}
    assert rejected["reason"].str.startswith("shortcut: ruler flag on 100% of accepted malignant").all()
