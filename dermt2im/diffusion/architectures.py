"""The paper's model architectures with random weights, written to folders laid out like the hub's.

For rehearsing the paper preset without downloading anything (``dermt2im.rehearsal``, CI, the first
run on a lent GPU): every loader then takes the path it takes with the real models.

* ``write_sd15_folder``: Stable Diffusion v1.5 as ``stable-diffusion-v1-5/stable-diffusion-v1-5``
  lays it out: ``model_index.json`` naming a ``safety_checker`` and a ``feature_extractor`` (the
  loaders must pass ``safety_checker=None``; the folder has its config, not its 1.2 GB of weights),
  ``unet/``, ``vae/``, ``text_encoder/`` (safetensors), a CLIP BPE ``tokenizer/`` (vocab.json and
  merges.txt), ``scheduler/`` (PNDM, SD 1.5's schedule) and ``feature_extractor/``. ``width="full"``
  is SD 1.5 itself (UNet 320-640-1280-1280, CLIP ViT-L/14's text tower, 3.4 GB in fp32);
  ``width="narrow"`` keeps every block, layer and attention of that architecture, at 1/10 of the
  UNet's channels and 1/12 of the text tower's width, so that it trains on a 2-core CPU.
* ``write_vit_folder`` / ``write_mobilenet_folder``: ``google/vit-base-patch16-224-in21k`` and
  ``google/mobilenet_v2_1.0_224`` at their full sizes, with the hub's ``preprocessor_config.json``.

Weights are drawn from a fixed seed, so a folder is the same every time it is written; a folder is
written once (atomically: a temporary name, then a rename) and reused.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Literal

from dermt2im.diffusion.models import SD15_SCHEDULE, tiny_tokenizer_dir

Width = Literal["full", "narrow"]

SD15_UNET: dict[str, Any] = {  # stable-diffusion-v1-5's unet/config.json (the keys that are not defaults)
    "sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": [320, 640, 1280, 1280], "attention_head_dim": 8, "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "norm_num_groups": 32,
}
SD15_VAE: dict[str, Any] = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2, "sample_size": 512,
    "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4, "norm_num_groups": 32, "scaling_factor": 0.18215,
}
SD15_TEXT: dict[str, Any] = {  # CLIP ViT-L/14's text tower
    "hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12, "num_hidden_layers": 12,
    "max_position_embeddings": 77, "hidden_act": "quick_gelu", "projection_dim": 768,
}
NARROW = {"unet": [32, 64, 128, 128], "vae": [32, 32, 64, 64], "text": (64, 256, 4)}

CLIP_FEATURE_EXTRACTOR: dict[str, Any] = {  # stable-diffusion-v1-5's feature_extractor/preprocessor_config.json
    "crop_size": {"height": 224, "width": 224}, "do_center_crop": True, "do_convert_rgb": True,
    "do_normalize": True, "do_rescale": True, "do_resize": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_processor_type": "CLIPImageProcessor",
    "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3, "rescale_factor": 0.00392156862745098,
    "size": {"shortest_edge": 224},
}
VIT_PREPROCESSOR: dict[str, Any] = {  # google/vit-base-patch16-224-in21k's preprocessor_config.json
    "do_normalize": True, "do_resize": True, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
    "resample": 2, "size": 224, "feature_extractor_type": "ViTFeatureExtractor",
}
MOBILENET_PREPROCESSOR: dict[str, Any] = {  # google/mobilenet_v2_1.0_224's preprocessor_config.json
    "crop_pct": 0.875, "crop_size": 224, "do_center_crop": True, "do_normalize": True, "do_resize": True,
    "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "resample": 2, "size": 256,
    "feature_extractor_type": "MobileNetV2FeatureExtractor",
}


def _write_once(folder: Path, build) -> Path:
    """``build(tmp)`` fills a temporary folder that is then renamed to ``folder``; an existing one is kept."""
    folder = Path(folder)
    if (folder / ".complete").is_file():
        return folder
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    build(tmp)
    (tmp / ".complete").write_text("")
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


def _json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def sd15_configs(width: Width = "full") -> dict[str, dict[str, Any]]:
    unet, vae, text = dict(SD15_UNET), dict(SD15_VAE), dict(SD15_TEXT)
    if width == "narrow":
        unet["block_out_channels"] = NARROW["unet"]
        vae["block_out_channels"] = NARROW["vae"]
        hidden, inner, heads = NARROW["text"]
        text.update(hidden_size=hidden, intermediate_size=inner, num_attention_heads=heads, projection_dim=hidden)
        unet["cross_attention_dim"] = hidden
    return {"unet": unet, "vae": vae, "text": text}


def write_sd15_folder(folder: str | Path, width: Width = "full", seed: int = 0) -> Path:
    """SD v1.5's architecture with random weights (``seed``), laid out like the hub's repository."""

    def build(tmp: Path) -> None:
        import torch
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel

        cfg = sd15_configs(width)
        tok_dir = tiny_tokenizer_dir()
        vocab = json.loads((tok_dir / "vocab.json").read_text())
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            UNet2DConditionModel(**cfg["unet"]).save_pretrained(tmp / "unet", safe_serialization=True)
            torch.manual_seed(seed + 1)
            AutoencoderKL(**cfg["vae"]).save_pretrained(tmp / "vae", safe_serialization=True)
            torch.manual_seed(seed + 2)
            text = CLIPTextConfig(vocab_size=len(vocab), bos_token_id=vocab["<|startoftext|>"],
                                  eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"],
                                  **cfg["text"])
            CLIPTextModel(text).save_pretrained(tmp / "text_encoder", safe_serialization=True)
        (tmp / "tokenizer").mkdir()
        for name in ("vocab.json", "merges.txt"):
            shutil.copyfile(tok_dir / name, tmp / "tokenizer" / name)
        _json(tmp / "tokenizer" / "tokenizer_config.json", {
            "tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "bos_token": "<|startoftext|>",
            "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
            "do_lower_case": True})
        _json(tmp / "tokenizer" / "special_tokens_map.json", {
            "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
            "unk_token": "<|endoftext|>"})
        _json(tmp / "scheduler" / "scheduler_config.json", {
            "_class_name": "PNDMScheduler", **SD15_SCHEDULE, "skip_prk_steps": True, "prediction_type": "epsilon"})
        _json(tmp / "feature_extractor" / "preprocessor_config.json", CLIP_FEATURE_EXTRACTOR)
        _json(tmp / "safety_checker" / "config.json", {"architectures": ["StableDiffusionSafetyChecker"],
                                                        "model_type": "clip", "_note": "config only: no weights"})
        _json(tmp / "model_index.json", {
            "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.6.0",
            "feature_extractor": ["transformers", "CLIPImageProcessor"],
            "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"],
            "scheduler": ["diffusers", "PNDMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"], "requires_safety_checker": True})

    return _write_once(Path(folder), build)


def config_folder_of(model_folder: str | Path, folder: str | Path) -> Path:
    """``model_folder`` without its weights: what ``train.base_config`` names for a single-file
    checkpoint (the hub repository's config files, as ``huggingface-cli download --include '*.json'
    '*.txt'`` fetches them)."""
    src = Path(model_folder)

    def build(tmp: Path) -> None:
        for f in src.rglob("*"):
            if f.is_file() and f.suffix in (".json", ".txt") and not f.name.startswith("."):
                target = tmp / f.relative_to(src)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(f, target)

    return _write_once(Path(folder), build)


def write_vit_folder(folder: str | Path, seed: int = 0) -> Path:
    """ViT-B/16 as ``google/vit-base-patch16-224-in21k`` (its config and preprocessor), random weights."""

    def build(tmp: Path) -> None:
        import torch
        from transformers import ViTConfig, ViTModel

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            ViTModel(ViTConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                               intermediate_size=3072, image_size=224, patch_size=16)).save_pretrained(
                tmp, safe_serialization=True)
        _json(tmp / "preprocessor_config.json", VIT_PREPROCESSOR)

    return _write_once(Path(folder), build)


def write_mobilenet_folder(folder: str | Path, seed: int = 0) -> Path:
    """MobileNetV2 1.0 / 224 as ``google/mobilenet_v2_1.0_224`` (1001 ImageNet classes), random weights."""

    def build(tmp: Path) -> None:
        import torch
        from transformers import MobileNetV2Config, MobileNetV2ForImageClassification

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            MobileNetV2ForImageClassification(MobileNetV2Config(depth_multiplier=1.0, image_size=224,
                                                                num_labels=1001)).save_pretrained(
                tmp, safe_serialization=True)
        _json(tmp / "preprocessor_config.json", MOBILENET_PREPROCESSOR)

    return _write_once(Path(folder), build)
