"""LoRA files: diffusers and kohya formats, loading into a fresh tiny pipeline, run-folder lookup."""

from __future__ import annotations

import json

import pytest
import torch

from dermt2im.core.fileio import sha256_file
from dermt2im.diffusion import lora_files as lora_io
from dermt2im.diffusion.models import build_tiny_components, build_tiny_pipeline

UNET_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def _random_lora(text_encoder: bool = False, rank: int = 4, alpha: float = 8.0):
    """PEFT state dicts with non-zero lora_B, made on a tiny UNet (and text encoder)."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    c = build_tiny_components(0)
    out = {}
    g = torch.Generator().manual_seed(1)
    parts = [("unet", c["unet"], UNET_TARGETS)] + ([("text_encoder", c["text_encoder"], TE_TARGETS)] if text_encoder else [])
    for name, model, targets in parts:
        model.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights="gaussian"))
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        out[name] = get_peft_model_state_dict(model)
    return out, c


def _unet_out(pipe, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 4, 8, 8, generator=g)
    ctx = torch.randn(1, 6, 32, generator=g)
    with torch.no_grad():
        return pipe.unet(x, 10, encoder_hidden_states=ctx).sample


def _text_out(pipe):
    ids = pipe.tokenizer(["a dermoscopic image of sks benign skin lesion"], return_tensors="pt").input_ids
    with torch.no_grad():
        return pipe.text_encoder(ids)[0]


def test_diffusers_file_loads_without_missing_keys_and_applies_alpha(tmp_path, caplog):
    sds, comps = _random_lora(rank=4, alpha=8.0)
    paths = lora_io.save_lora_files(tmp_path, sds, rank=4, alpha=8.0, metadata={"run": "x"})
    assert paths["diffusers"].name == lora_io.DIFFUSERS_WEIGHTS

    # reference: the adapter as trained, in memory (scaling alpha / r = 2)
    ref_pipe = build_tiny_pipeline(0)
    ref_pipe.unet = comps["unet"]
    expected = _unet_out(ref_pipe)

    pipe = build_tiny_pipeline(0)
    base = _unet_out(pipe)
    with caplog.at_level("WARNING"):
        pipe.load_lora_weights(str(tmp_path), weight_name=lora_io.DIFFUSERS_WEIGHTS)
    bad = [r.getMessage() for r in caplog.records if "unexpected keys" in r.getMessage() or "missing keys" in r.getMessage()]
    assert not bad
    got = _unet_out(pipe)
    assert not torch.allclose(got, base, atol=1e-4)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)

    header = lora_io.read_header(paths["diffusers"])
    assert json.loads(header[lora_io.HEADER_KEY]) == {"run": "x"}
    assert json.loads(header[lora_io.ADAPTER_METADATA_KEY])["unet.lora_alpha"] == 8.0


def test_load_lora_scale_zero_is_identity_and_fuse_matches_adapter(tmp_path):
    sds, _ = _random_lora()
    paths = lora_io.save_lora_files(tmp_path, sds, rank=4, alpha=8.0)
    base = _unet_out(build_tiny_pipeline(0))

    p0 = build_tiny_pipeline(0)
    lora_io.load_lora(p0, paths["diffusers"], 0.0, fuse=True)
    torch.testing.assert_close(_unet_out(p0), base, atol=1e-6, rtol=0)

    fused = build_tiny_pipeline(0)
    lora_io.load_lora(fused, paths["diffusers"], 0.8, fuse=True)
    unfused = build_tiny_pipeline(0)
    lora_io.load_lora(unfused, paths["diffusers"], 0.8, fuse=False)
    a, b = _unet_out(fused), _unet_out(unfused)
    assert not torch.allclose(a, base, atol=1e-4)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)

    # loading again under the same adapter name replaces, not stacks; unload restores the base
    lora_io.load_lora(fused, paths["diffusers"], 0.8, fuse=True)
    torch.testing.assert_close(_unet_out(fused), b, atol=1e-5, rtol=1e-4)
    lora_io.unload_lora(fused)
    torch.testing.assert_close(_unet_out(fused), base, atol=1e-5, rtol=1e-4)


def test_kohya_copy_loads_through_diffusers_and_matches(tmp_path):
    sds, _ = _random_lora(text_encoder=True, rank=4, alpha=2.0)
    paths = lora_io.save_lora_files(tmp_path, sds, rank=4, alpha=2.0)
    keys = list(lora_io.read_header(paths["kohya"]))
    assert "ss_network_dim" in keys
    from safetensors.torch import load_file

    k = load_file(paths["kohya"])
    assert all(key.startswith(("lora_unet_", "lora_te_")) for key in k)
    alphas = [key for key in k if key.endswith(".alpha")]
    assert alphas and all(float(k[a]) == 2.0 for a in alphas)
    assert len(alphas) * 3 == len(k)

    a = build_tiny_pipeline(0)
    a.load_lora_weights(str(tmp_path), weight_name=lora_io.DIFFUSERS_WEIGHTS)
    b = build_tiny_pipeline(0)
    b.load_lora_weights(str(tmp_path), weight_name=lora_io.KOHYA_WEIGHTS)
    torch.testing.assert_close(_unet_out(a), _unet_out(b), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(_text_out(a), _text_out(b), atol=1e-5, rtol=1e-4)
    assert not torch.allclose(_text_out(a), _text_out(build_tiny_pipeline(0)), atol=1e-4)


def test_to_kohya_key_names():
    t = torch.zeros(4, 32)
    sd = {
        "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0.lora_A.weight": t,
        "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0.lora_B.weight": t.T,
    }
    k = lora_io.to_kohya(sd, 4.0)
    name = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_out_0"
    assert set(k) == {f"{name}.lora_down.weight", f"{name}.lora_up.weight", f"{name}.alpha"}
    with pytest.raises(lora_io.LoraError):
        lora_io.to_kohya({"vae.x.lora_A.weight": t}, 4.0)


def test_refuses_non_finite_weights(tmp_path):
    sds, _ = _random_lora()
    key = next(iter(sds["unet"]))
    sds["unet"][key] = sds["unet"][key].clone()
    sds["unet"][key][0, 0] = float("nan")
    with pytest.raises(lora_io.LoraError, match="non-finite"):
        lora_io.save_lora_files(tmp_path, sds, rank=4, alpha=4.0)
    assert not list(tmp_path.glob("*.safetensors"))


def test_lora_weights_for_run_layouts(tmp_path):
    shared = tmp_path / "shared"
    (shared).mkdir()
    (shared / lora_io.DIFFUSERS_WEIGHTS).write_bytes(b"x")
    lora_io.write_run_meta(shared, {"layout": "shared", "weights": {"all": lora_io.DIFFUSERS_WEIGHTS}})
    assert lora_io.lora_weights_for(shared, "benign") == shared / lora_io.DIFFUSERS_WEIGHTS
    assert lora_io.lora_weights_for(shared, "malignant") == shared / lora_io.DIFFUSERS_WEIGHTS

    per = tmp_path / "per"
    for label in ("benign", "malignant"):
        (per / label).mkdir(parents=True)
        (per / label / lora_io.DIFFUSERS_WEIGHTS).write_bytes(label.encode())
    lora_io.write_run_meta(
        per, {"layout": "per_class", "weights": {l: f"{l}/{lora_io.DIFFUSERS_WEIGHTS}" for l in ("benign", "malignant")}}
    )
    assert lora_io.lora_weights_for(per, "malignant") == per / "malignant" / lora_io.DIFFUSERS_WEIGHTS
    with pytest.raises(lora_io.LoraError, match="no weights for class"):
        lora_io.lora_weights_for(per, "other")
    f = per / "benign" / lora_io.DIFFUSERS_WEIGHTS
    assert lora_io.lora_weights_for(f, "whatever") == f
    with pytest.raises(lora_io.LoraError):
        lora_io.lora_weights_for(tmp_path / "nope", "benign")


def test_files_are_byte_reproducible(tmp_path):
    sds, _ = _random_lora(text_encoder=True)
    meta = {"b": 1, "a": {"z": 2, "y": [1, 2]}, "c": "x"}
    shas = set()
    for i in range(4):
        paths = lora_io.save_lora_files(tmp_path / str(i), sds, rank=4, alpha=4.0, metadata=meta)
        shas.add((sha256_file(paths["diffusers"]), sha256_file(paths["kohya"])))
    assert len(shas) == 1
    from safetensors.torch import load_file

    loaded = load_file(paths["diffusers"])
    assert all(torch.equal(loaded[f"unet.{k}"], v) for k, v in sds["unet"].items())
    assert lora_io.read_dermt2im_metadata(paths["diffusers"]) == meta
