"""The method, tested on images worth judging: a DreamBooth + LoRA trained on the miniature model
(the smoke preset's settings, through ``train_lora``) must move generated images toward the class
their prompt names, as a phantom judge sees them (``dermt2im.mini.judge``, ~97 % on phantoms); and
a LoRA fused at scale 0, a LoRA trained for zero steps, or a prompt without the class word must
leave them at chance. Class agreement here is the judge's balanced accuracy against the intended
classes (chance 0.5), over the plan's prompts, samplers and seeds. The gate must accept most of the
learned images and reject the random-weight model's noise; the memorisation audit must flag a seed
copied into the synthetic set and nothing else.

One LoRA and one judge serve every test of the module (training and the generate stage take
about 1 to 3 minutes on two shared cores). Measured once at 48 images per class (2026-12-07, the
offset-noise mini): the LoRA 0.81 (benign 1.00, malignant 0.63), scale 0 0.53, no class word 0.53;
skin-type phrases I to VI: median ITA 62, 44, 29, 13, -13, -56 degrees. Each of these tests
failed when the method was broken on purpose: the training prompts without the class word, the
LoRA never fused, fused at scale 1 whatever the plan says, the plan's prompts without the class
word, the gate's image measures ignored.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from safetensors.torch import load_file, save_file

from dermt2im.core import storage
from dermt2im.core.fileio import sha256_file
from dermt2im.core.imaging import encode_png
from dermt2im.core.manifest import SYNTHETIC, read_manifest, upsert
from dermt2im.core.views import seeds_view, synthetic_view
from dermt2im.core.specs import LABELS
from dermt2im.core.workdir import Workdir
from dermt2im.diffusion import lora_files
from dermt2im.quality.images import load_rgb
from dermt2im.validate.agreement import wilson
from tests.mini.mini_fixtures import Rendered, agreement, phantom_seeds, render, smoke_config, train

# one xdist worker runs the module, so that its LoRA is trained once
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("mini_method")]

PER_CLASS = 24  # images of each class per condition
NO_CLASS_WORD = "a dermoscopic image of {token} skin lesion{transformation}"


@pytest.fixture(scope="module")
def method(tmp_path_factory):
    """Seeds, the LoRA, the generate stage's images with it (PER_CLASS per class), and the judge."""
    from dermt2im.generate.stage import GenerateStage
    from dermt2im.runners.sequential import run_stage

    cfg = smoke_config(["train.validation_images_per_class=0", f"generate.per_class={PER_CLASS}"])
    w = Workdir.at(tmp_path_factory.mktemp("method") / "w").using(cfg)
    w.processed.mkdir(parents=True, exist_ok=True)
    phantom_seeds(w, 22)  # the smoke preset's train split holds about 22 images per class
    result = train(w, cfg)
    run_stage(GenerateStage.of(w, cfg, lora=result.lora_dir))
    return cfg, w, result


def _generated(w) -> Rendered:
    rows = read_manifest(w.synthetic_manifest, SYNTHETIC)
    rows = rows[rows["sample_key"].str.match(r"^(benign|malignant)-\d+$")].sort_values("sample_key")
    return Rendered(list(rows["label"]), [load_rgb(storage.resolve(p, w.root)) for p in rows["path"]])


def _lower_bound(share: float, n: int) -> float:
    return wilson(share * n, n)[0]


def test_the_lora_moves_images_toward_the_class_their_prompt_names(method, judge):
    cfg, w, result = method
    rendered = _generated(w)
    assert len(rendered.images) == 2 * PER_CLASS
    share, per_class = agreement(judge, rendered)
    # well above chance, and for both classes: not one class drawn for every prompt
    assert share >= 0.75 and _lower_bound(share, 2 * PER_CLASS) > 0.6, (share, per_class)
    assert min(per_class.values()) >= 0.55, per_class


def test_lora_scale_zero_draws_no_class(method, judge):
    cfg, w, result = method
    share, per_class = agreement(judge, render(cfg, result.lora_dir, per_class=PER_CLASS, scale=0.0))
    assert abs(share - 0.5) <= 0.15, (share, per_class)


def test_a_lora_trained_for_zero_steps_draws_no_class(method, judge, tmp_path):
    cfg, w, result = method
    trained = result.weights["all"]
    state = load_file(str(trained))
    ups = [k for k in state if "lora_B" in k or "lora.up" in k]
    assert ups, sorted(state)[:4]
    untrained = {k: (v.zero_() if k in ups else v) for k, v in state.items()}  # B = 0: peft's initial LoRA
    out = tmp_path / lora_files.DIFFUSERS_WEIGHTS
    save_file(untrained, str(out), metadata=lora_files.read_header(trained))
    share, per_class = agreement(judge, render(cfg, out, per_class=PER_CLASS))
    assert abs(share - 0.5) <= 0.15, (share, per_class)


def test_a_prompt_without_the_class_word_draws_no_class(method, judge):
    cfg, w, result = method
    share, per_class = agreement(judge, render(cfg, result.lora_dir, per_class=PER_CLASS, prompt=NO_CLASS_WORD))
    assert abs(share - 0.5) <= 0.15, (share, per_class)


def test_a_skin_type_prompt_still_moves_the_skin_tone_after_dreambooth(method):
    """The seeds are all light-skinned phantoms; the plan's skin-type transformation must still
    move the skin the LoRA draws (the ITA of the skin around the lesion: higher is lighter)."""
    from dermt2im.fidelity.skin_tone import skin_tone
    from dermt2im.mini.captions import SKIN_PHRASES

    cfg, w, result = method
    medians = {}
    for k in (1, 6):
        rendered = render(cfg, result.lora_dir, per_class=6, prompt=f"a dermoscopic image of {{token}} {{label}} "
                                                                      f"skin lesion, {SKIN_PHRASES[k]}")
        medians[k] = float(np.nanmedian([skin_tone(im).ita for im in rendered.images]))
    assert medians[1] - medians[6] >= 30, medians


def _extra_row(w, key: str, label: str, rgb: np.ndarray) -> dict:
    path = w.root / "synthetic" / label / f"{key}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode_png(rgb))
    return {"sample_key": key, "label": label, "index": 0, "prompt": "", "sampler": "euler", "steps": 1, "seed": 0,
            "width": rgb.shape[1], "height": rgb.shape[0], "path": str(path), "sha256": sha256_file(path),
            "status": "rendered"}


def test_the_gate_accepts_learned_images_rejects_noise_and_the_audit_flags_only_a_copied_seed(method):
    from dermt2im.diffusion.models import build_tiny_pipeline
    from dermt2im.quality.stage import assess

    cfg, w, result = method
    noise = build_tiny_pipeline(0)("a dermoscopic image of sks benign skin lesion", num_inference_steps=4,
                                   height=64, width=64, num_images_per_prompt=8, output_type="np",
                                   generator=__import__("torch").Generator().manual_seed(0)).images
    seeds = seeds_view(w.seeds_manifest)
    seed = seeds[seeds["label"] == "malignant"].iloc[0]
    copy = load_rgb(seed["processed_path"])[:, ::-1]  # a mirrored copy of a seed
    extra = [_extra_row(w, f"noise-{i}", LABELS[i % 2], (im * 255).round().astype(np.uint8))
             for i, im in enumerate(noise)]
    extra.append(_extra_row(w, "copy-0", "malignant", np.ascontiguousarray(copy)))
    upsert(w.synthetic_manifest, pd.DataFrame(extra), SYNTHETIC)
    assess(w, cfg.quality)

    rows = synthetic_view(w).set_index("sample_key")
    learned = rows[rows.index.str.match(r"^(benign|malignant)-\d+$")]
    noisy = rows[rows.index.str.startswith("noise-")]
    assert (learned["status"] == "accepted").mean() >= 0.75, learned["reason"].value_counts().to_dict()
    assert (noisy["status"] == "rejected").all(), noisy[["status", "reason"]].to_dict("records")
    flagged = rows[rows["memorised"].fillna(False).astype(bool)]
    assert list(flagged.index) == ["copy-0"], flagged[["reason", "nearest_seed"]].to_dict("records")
    assert str(seed["sample_id"]) in str(flagged.loc["copy-0", "reason"]) + str(flagged.loc["copy-0", "nearest_seed"])
