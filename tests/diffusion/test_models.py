"""Base models: the tiny offline SD, identities, loading rules."""

from __future__ import annotations

import json

import pytest
import torch

from dermt2im.diffusion import models


def _weights_equal(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_tiny_components_are_seeded_and_leave_global_rng_alone():
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = models.build_tiny_components(0)
    assert torch.equal(torch.get_rng_state(), before)
    b = models.build_tiny_components(0)
    c = models.build_tiny_components(1)
    assert _weights_equal(a["unet"], b["unet"]) and _weights_equal(a["vae"], b["vae"])
    assert _weights_equal(a["text_encoder"], b["text_encoder"])
    assert not _weights_equal(a["unet"], c["unet"])
    assert a["unet"].config.cross_attention_dim == a["text_encoder"].config.hidden_size == 32
    assert tuple(a["unet"].config.block_out_channels) == (32, 64)
    assert type(a["noise_scheduler"]).__name__ == "DDPMScheduler"


def test_tiny_tokenizer_covers_prompt_words():
    tok = models.build_tiny_tokenizer()
    text = "a dermoscopic image of sks malignant skin lesion, on dark brown skin, Fitzpatrick type VI"
    ids = tok(text).input_ids
    pieces = tok.convert_ids_to_tokens(ids)
    assert pieces[0] == "<|startoftext|>" and pieces[-1] == "<|endoftext|>"
    for word in ("dermoscopic</w>", "malignant</w>", "fitzpatrick</w>", "sks</w>"):
        assert word in pieces
    assert len(ids) < 77
    # unknown words still tokenize, by characters, without unk
    unk = tok.convert_tokens_to_ids(tok.unk_token)
    assert tok("zebra quokka").input_ids.count(unk) == 0 or unk == tok.eos_token_id
    assert tok(text, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids.shape == (1, 77)


def test_tiny_pipeline_generates_deterministically():
    pipe = models.build_tiny_pipeline(0)
    assert pipe.safety_checker is None

    def run():
        g = torch.Generator().manual_seed(0)
        return pipe("a dermoscopic image of sks benign skin lesion", num_inference_steps=2, height=32, width=32,
                    generator=g, output_type="np").images

    a, b = run(), run()
    assert a.shape == (1, 32, 32, 3)
    assert (a == b).all()


def test_identities(tmp_path):
    assert models.base_model_identity("tiny") == models.tiny_identity(0)
    assert models.base_model_identity("tiny").startswith("tiny@")
    assert models.base_model_identity("owner/model", "abc") == "hub:owner/model@abc"
    assert models.base_model_identity("owner/model") == "hub:owner/model@main"

    f = tmp_path / "m.safetensors"
    f.write_bytes(b"abc")
    ident = models.base_model_identity(str(f))
    assert ident.startswith("file:") and len(ident) == 5 + 64

    d = tmp_path / "pipe"
    (d / "unet").mkdir(parents=True)
    (d / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    (d / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"1234")
    i1 = models.base_model_identity(str(d))
    (d / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"12345")
    assert i1.startswith("dir:") and models.base_model_identity(str(d)) != i1


def test_loading_rules(tmp_path):
    pkl = tmp_path / "model.ckpt"
    pkl.write_bytes(b"x")
    with pytest.raises(models.ModelError, match="never pickles"):
        models.load_pipeline(str(pkl))
    with pytest.raises(models.ModelError, match="not found"):
        models.base_model_identity(str(tmp_path / "missing.safetensors"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(models.ModelError, match="model_index.json"):
        models.load_pipeline(str(empty))


def test_tiny_pipeline_round_trips_through_a_folder(tmp_path):
    pipe = models.build_tiny_pipeline(0)
    pipe.save_pretrained(tmp_path / "tiny-sd", safe_serialization=True)
    loaded = models.load_pipeline(str(tmp_path / "tiny-sd"))
    assert _weights_equal(pipe.unet, loaded.unet)
    assert loaded.tokenizer("sks benign").input_ids == pipe.tokenizer("sks benign").input_ids
    assert models.base_model_identity(str(tmp_path / "tiny-sd")).startswith("dir:")


def test_resolve_device():
    assert models.resolve_device("cpu") == "cpu"
    assert models.resolve_device("auto") in ("cpu", "cuda")
    if not torch.cuda.is_available():
        with pytest.raises(models.ModelError, match="CUDA"):
            models.resolve_device("cuda")


# ---------------------------------------------------------------------------------------------
# models from anywhere, offline


@pytest.fixture(scope="module")
def narrow_sd15(tmp_path_factory):
    """SD v1.5's architecture at narrow widths (random weights) as the hub lays it out, its config
    files alone (what train.base_config names), and the same weights as one LDM-format file."""
    from dermt2im.diffusion import architectures
    from tests.diffusion.ldm_checkpoint import write_single_file

    root = tmp_path_factory.mktemp("sd15")
    folder = architectures.write_sd15_folder(root / "sd15", width="narrow")
    config = architectures.config_folder_of(folder, root / "sd15-config")
    single = write_single_file(folder, root / "sd15-narrow.safetensors")
    return folder, config, single


def test_a_single_file_with_a_local_config_folder_loads_offline(narrow_sd15, monkeypatch):
    """Without train.base_config, diffusers fetched SD v1.5's configs from the hub (and offline the
    error named neither the repository nor the need)."""
    import torch
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    folder, config, single = narrow_sd15
    assert not list(config.rglob("*.safetensors")), "the config folder holds no weights"
    pipe = models.load_pipeline(str(single), base_config=str(config))
    ref = models.load_pipeline(str(folder))
    for name in ("unet", "vae", "text_encoder"):
        got, want = getattr(pipe, name).state_dict(), getattr(ref, name).state_dict()
        assert got.keys() == want.keys(), name
        assert all(torch.equal(got[k].float(), want[k].float().reshape(got[k].shape)) for k in got), name
    assert pipe.tokenizer("a benign lesion").input_ids == ref.tokenizer("a benign lesion").input_ids
    # the identity covers the config folder too: another config is another model
    with_config = models.base_model_identity(str(single), None, str(config))
    assert with_config.startswith(models.base_model_identity(str(single))) and "+config:dir:" in with_config


def test_a_single_file_without_its_config_offline_is_one_line_saying_what_to_download(narrow_sd15, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(narrow_sd15[0].parent / "empty-hub-cache"))
    with pytest.raises(models.ModelError) as err:
        models.load_pipeline(str(narrow_sd15[2]))
    message = str(err.value)
    assert "\n" not in message and str(narrow_sd15[2]) in message and "empty-hub-cache" in message
    assert "train.base_config" in message and "huggingface-cli download stable-diffusion-v1-5/stable-diffusion-v1-5" in message
    with pytest.raises(models.ModelError, match="not a folder with model_index.json"):
        models.load_pipeline(str(narrow_sd15[2]), base_config=str(narrow_sd15[0].parent))


def test_a_hub_id_that_is_not_cached_offline_is_one_line(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(models.ModelError) as err:
        models.load_pipeline("someone/not-downloaded", "v2")
    message = str(err.value)
    assert "\n" not in message and "someone/not-downloaded (revision v2)" in message
    assert str(tmp_path / "hub") in message and "huggingface-cli download someone/not-downloaded --revision v2" in message


def test_the_revision_is_resolved_to_the_commit_the_cache_holds(tmp_path, monkeypatch):
    from huggingface_hub import constants

    sha = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--owner--model"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(sha)
    (repo / "snapshots" / sha).mkdir(parents=True)
    (repo / "snapshots" / sha / "model_index.json").write_text("{}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert models.resolved_revision("owner/model", "main") == sha
    assert models.resolved_revision("owner/model", None) == sha
    assert models.resolved_revision("owner/other", "main") is None  # not cached: nothing claimed
    assert models.resolved_revision("tiny") is None


def test_a_validation_model_that_is_not_cached_offline_is_one_line(tmp_path, monkeypatch):
    from huggingface_hub import constants

    from dermt2im.validate.models import ModelUnavailable, pretrained_model

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ModelUnavailable) as err:
        pretrained_model("vit", "google/vit-base-patch16-224-in21k", 0)
    message = str(err.value)
    assert "\n" not in message and "huggingface-cli download google/vit-base-patch16-224-in21k" in message
    assert "validate.vit_model" in message and str(tmp_path / "hub") in message
