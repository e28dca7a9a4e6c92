"""The miniature Stable Diffusion shipped in the package: its header says how it was made, the
recipe is deterministic, and ``train.base_model: mini`` (or a path to such a file) loads it."""

from __future__ import annotations

import numpy as np
import pytest
from safetensors.torch import load_file
from typer.testing import CliRunner

from dermt2im.cli import app
from dermt2im.diffusion import models
from dermt2im.mini import weights
from dermt2im.mini.captions import CAPTION_WORDS, SKIN_PHRASES
from dermt2im.mini.data import FINGERPRINT_IMAGES, build_training_set, fingerprint
from dermt2im.mini.recipe import TEXT_CONFIG, UNET_CONFIG, VAE_CONFIG, MiniRecipe
from dermt2im.phantoms import GENERATOR_VERSION

QUICK = ["images=16", "vae_steps=2", "unet_steps=2", "warmup_steps=1", "vae_batch=4", "unet_batch=4"]


def test_shipped_header_matches_the_recipe_and_the_phantom_generator():
    path = weights.shipped_path()
    header = weights.read_header(path)
    assert path.stat().st_size <= 20e6
    assert header["recipe"] == MiniRecipe().model_dump(mode="json")
    assert header["phantom_generator_version"] == GENERATOR_VERSION
    assert header["vocabulary"] == list(CAPTION_WORDS)
    arch = header["architecture"]
    assert arch["unet"] == UNET_CONFIG and arch["text"] == TEXT_CONFIG
    assert {k: v for k, v in arch["vae"].items() if k != "scaling_factor"} == VAE_CONFIG
    assert header["training_images"] == MiniRecipe().images and len(header["training_data_sha256"]) == 64
    # the generator still draws the phantoms the model learnt from (mean colours, robust to last bits)
    first = build_training_set(MiniRecipe(), FINGERPRINT_IMAGES)
    assert np.allclose(fingerprint(first.images), header["training_data_fingerprint"], atol=0.5)


def test_mini_is_a_base_model_with_sd15_classes():
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    pipe = models.load_pipeline("mini")
    assert isinstance(pipe.unet, UNet2DConditionModel) and isinstance(pipe.vae, AutoencoderKL)
    assert isinstance(pipe.text_encoder, CLIPTextModel) and isinstance(pipe.tokenizer, CLIPTokenizer)
    assert models.base_model_identity("mini") == models.base_model_identity(str(weights.shipped_path()))
    assert models.base_model_identity("mini").startswith("file:")
    # the words of the plan's prompts are single tokens (the class word DreamBooth binds included)
    for word in ("malignant", "benign", "sks", "fitzpatrick", "mole"):
        assert len(pipe.tokenizer(word, add_special_tokens=False).input_ids) == 1


def test_pretrain_command_is_deterministic_and_its_file_loads_as_a_base_model(tmp_path):
    runner = CliRunner()
    outs = [tmp_path / "a.safetensors", tmp_path / "b.safetensors"]
    for out in outs:
        r = runner.invoke(app, ["pretrain-mini", "--out", str(out), *[f"--recipe={x}" for x in QUICK]])
        assert r.exit_code == 0, r.output
        assert "16 phantoms" in r.output
    a, b = (load_file(str(p)) for p in outs)
    assert a.keys() == b.keys() and all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)
    ha, hb = (weights.read_header(p) for p in outs)
    assert {k: v for k, v in ha.items() if k != "costs"} == {k: v for k, v in hb.items() if k != "costs"}
    assert ha["recipe"]["images"] == 16 and ha["threads"] == 1
    pipe = models.load_pipeline(str(outs[0]))
    assert list(pipe.unet.config.block_out_channels) == UNET_CONFIG["block_out_channels"]


def test_bad_recipe_and_foreign_files_are_one_line_errors(tmp_path):
    from safetensors.torch import save_file
    import torch

    r = CliRunner().invoke(app, ["pretrain-mini", "--out", str(tmp_path / "m.safetensors"), "--recipe", "images=two"])
    assert r.exit_code == 2 and "images" in r.output and "Traceback" not in r.output
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    assert not weights.is_mini_file(foreign)
    with pytest.raises(weights.MiniModelError, match="not a dermt2im miniature model"):
        weights.read_header(foreign)
    with pytest.raises(models.ModelError, match="not found"):
        models.base_model_identity(str(tmp_path / "missing.safetensors"))


def median_ita(pipe, prompt: str, n: int, seed: int) -> float:
    """Median ITA (degrees; higher is lighter) of the skin around ``n`` lesions drawn for ``prompt``
    with the smoke preset's guidance (3) and the empty negative prompt."""
    import torch

    from dermt2im.fidelity.skin_tone import skin_tone

    images = pipe([prompt] * n, negative_prompt=[""] * n, num_inference_steps=15, guidance_scale=3.0, height=64,
                  width=64, generator=torch.Generator().manual_seed(seed), output_type="np").images
    return float(np.nanmedian([skin_tone((im * 255).round().astype(np.uint8)).ita for im in images]))


def test_the_skin_type_a_prompt_names_moves_the_skin_tone_the_model_draws():
    """The plan's skin-type transformations work only if the base model listens to them. Trained
    without offset noise (``MiniRecipe.noise_offset``) it did not: every prompt drew skin at the
    training set's average tone (median ITA between 15 and 33 degrees for all six types, where the
    training phantoms span 64 to -57)."""
    pipe = models.load_pipeline("mini")
    pipe.set_progress_bar_config(disable=True)
    lighter, middle, darker = (median_ita(pipe, f"a dermoscopic image of a skin lesion, {SKIN_PHRASES[k]}", 8, k)
                               for k in (1, 3, 6))
    assert lighter > middle > darker, (lighter, middle, darker)
    assert lighter - darker >= 40, (lighter, darker)
