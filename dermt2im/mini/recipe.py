"""The miniature Stable Diffusion's recipe: its architecture (the diffusers and transformers classes
of SD 1.5, scaled down) and how it is pre-trained on phantoms. Everything here is recorded in the
shipped file's header, and ``tests/mini`` checks that the header matches this module."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from dermt2im.core.specs import Strict

# 64 px images -> 16 x 16 x 4 latents (three encoder blocks: two down-samplings).
VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "block_out_channels": [32, 64, 64],
    "down_block_types": ["DownEncoderBlock2D"] * 3,
    "up_block_types": ["UpDecoderBlock2D"] * 3,
    "latent_channels": 4,
    "layers_per_block": 1,
    "norm_num_groups": 16,
    "sample_size": 64,
    "mid_block_add_attention": False,  # a 16 x 16 latent is seen whole by the convolutions already
}

UNET_CONFIG: dict[str, Any] = {
    "sample_size": 16,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 1,
    "block_out_channels": [32, 64, 128],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "cross_attention_dim": 64,
    "attention_head_dim": 8,
    "norm_num_groups": 16,
}

TEXT_CONFIG: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "max_position_embeddings": 77,
    "layer_norm_eps": 1e-5,
    "hidden_act": "quick_gelu",
    "projection_dim": 64,
}


class MiniRecipe(Strict):
    """How ``dermt2im pretrain-mini`` makes the model. The defaults are the shipped model's recipe."""

    # the training phantoms (dermt2im.phantoms.render_phantom_traits), rendered at render_size and
    # shrunk to size as preprocess shrinks seeds
    images: int = Field(3000, ge=16)
    data_seed: int = 20260
    size: int = 64
    render_size: int = 128
    ham_style_share: float = Field(0.25, ge=0, le=1, description="share of phantoms in the HAM10000 camera style")
    hair_probability: float = Field(0.3, ge=0, le=1)
    satellite_probability: float = Field(0.15, ge=0, le=1, description="share of phantoms with 1-3 satellite moles")
    skin_type_weights: tuple[float, ...] = (0.2, 0.3, 0.2, 0.12, 0.1, 0.08)  # Fitzpatrick I..VI
    caption_dropout: float = Field(0.1, ge=0, le=1)
    phrase_dropout: float = Field(0.3, ge=0, le=1)
    # the autoencoder: trained on random crops (it is fully convolutional), KL weight as in LDM's f=4 VAE
    vae_steps: int = Field(700, ge=0)
    vae_batch: int = 32
    vae_crop: int = 32
    vae_learning_rate: float = 1e-3
    vae_kl_weight: float = 1e-6
    # the UNet and the text encoder, jointly, on the VAE's latents (epsilon prediction, DDPM with SD
    # 1.5's schedule), min-SNR weighting, an EMA of the UNet's weights
    unet_steps: int = Field(2000, ge=0)
    unet_batch: int = 32
    unet_learning_rate: float = 5e-4
    text_learning_rate: float = 2e-4
    warmup_steps: int = 100
    snr_gamma: float = 5.0
    # Offset noise (Guttenberg 2023; diffusers' --noise_offset): SD 1.5's schedule leaves an image's
    # mean colour in its most-noised latent, so a model trained without it never learns to set that
    # mean itself and draws every skin at the training set's average tone, whatever the caption says.
    noise_offset: float = Field(0.25, ge=0)
    ema_decay: float = 0.995
    train_seed: int = 7
    threads: int = Field(1, ge=1, description="torch threads: fixed, because CPU results depend on it")
    storage_dtype: str = "float16"

    def header(self) -> dict[str, Any]:
        return {"recipe": self.model_dump(mode="json"), "vae": VAE_CONFIG, "unet": UNET_CONFIG, "text": TEXT_CONFIG}
