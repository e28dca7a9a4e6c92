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
