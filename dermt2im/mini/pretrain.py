"""Pre-training the miniature Stable Diffusion on phantoms (``dermt2im pretrain-mini``).

1. Render the training phantoms and their captions (``data``).
2. The autoencoder (AutoencoderKL): L1 reconstruction plus a small KL term, on random crops first
   (it is fully convolutional, and a crop costs a quarter of an image), then on whole images so that
   its group norms see what they will see. Its latent scaling factor is then set, as SD's is, to one
   over the standard deviation of the training latents.
3. The UNet and the CLIP text encoder together, on those latents (and on those of the mirrored
   images): epsilon prediction under SD 1.5's noise schedule, min-SNR weighting, a caption per step
   with phrases dropped at random and some captions dropped whole, and an exponential moving average
   of both models' weights, which is what is saved.

Deterministic: one seeded generator per phase, deterministic torch algorithms and a fixed number of
threads (``MiniRecipe.threads``; CPU results depend on it), all recorded in the header.
"""

from __future__ import annotations

import logging
import math
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from dermt2im.core import progress
from dermt2im.mini import weights
from dermt2im.mini.captions import CAPTION_WORDS, dropped
from dermt2im.mini.data import TrainingSet, build_training_set, fingerprint
from dermt2im.mini.recipe import TEXT_CONFIG, UNET_CONFIG, VAE_CONFIG, MiniRecipe
from dermt2im.phantoms import GENERATOR_VERSION

log = logging.getLogger(__name__)


def architecture() -> dict[str, Any]:
    return {"vae": VAE_CONFIG, "unet": UNET_CONFIG, "text": TEXT_CONFIG}


def _to_tensor(images: np.ndarray):
    import torch

    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def _lr(step: int, total: int, warmup: int, base: float) -> float:
    """Linear warm-up, then a cosine decay to a tenth of ``base``."""
    if step < warmup:
        return base * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def train_vae(vae, images: np.ndarray, recipe: MiniRecipe, on_step: Callable[[int, float], None] | None = None) -> None:
    """Crops for ``vae_steps``, then whole images for a fifth as many steps at half the batch."""
    import torch

    g = torch.Generator().manual_seed(recipe.train_seed)
    data = _to_tensor(images)
    crop_steps = recipe.vae_steps
    full_steps = recipe.vae_steps // 5
    total = crop_steps + full_steps
    opt = torch.optim.AdamW(vae.parameters(), lr=recipe.vae_learning_rate, weight_decay=0.0)
    vae.train()
    for step in range(total):
        for group in opt.param_groups:
            group["lr"] = _lr(step, total, recipe.warmup_steps, recipe.vae_learning_rate)
        crop = step < crop_steps
        batch = recipe.vae_batch if crop else max(1, recipe.vae_batch // 2)
        idx = torch.randint(0, len(data), (batch,), generator=g)
        x = data[idx]
        if crop:
            c = recipe.vae_crop
            oy, ox = (int(v) for v in torch.randint(0, recipe.size - c + 1, (2,), generator=g))
            x = x[:, :, oy:oy + c, ox:ox + c]
        if bool(torch.rand((), generator=g) < 0.5):
            x = x.flip(3)
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=g)
        recon = vae.decode(z).sample
        loss = (recon - x).abs().mean() + recipe.vae_kl_weight * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        if on_step is not None:
            on_step(step + 1, float(loss.detach()))
    vae.eval()


def encode(vae, images: np.ndarray, batch: int = 64):
    """Posterior mean and std of every image and of its mirror image (2N latents)."""
    import torch

    means, stds = [], []
    with torch.no_grad():
        for flip in (False, True):
            for i in range(0, len(images), batch):
                x = _to_tensor(images[i:i + batch])
                dist = vae.encode(x.flip(3) if flip else x).latent_dist
                means.append(dist.mean)
                stds.append(dist.std)
    return torch.cat(means), torch.cat(stds)


class _Ema:
    """Exponential moving average of parameters, with the usual warm-up of its decay."""

    def __init__(self, params: list, decay: float) -> None:
        self.params, self.decay = params, decay
        self.shadow = [p.detach().clone() for p in params]
        self.updates = 0

    def update(self) -> None:
        import torch

        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        with torch.no_grad():
            torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1.0 - decay)

    def copy_to(self) -> None:
        import torch

        with torch.no_grad():
            for p, s in zip(self.params, self.shadow):
                p.copy_(s)


def train_unet(unet, text_encoder, tokenizer, latents, traits, recipe: MiniRecipe,
               on_step: Callable[[int, float], None] | None = None) -> None:
    """Joint UNet + text encoder training on (latent mean, std) pairs; ``traits[i % len(traits)]``
    captions latent ``i`` (the second half are the mirrored images)."""
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr

    from dermt2im.diffusion.models import SD15_SCHEDULE

    sched = DDPMScheduler.from_config(dict(SD15_SCHEDULE))
    mean, std = latents
    g = torch.Generator().manual_seed(recipe.train_seed + 1)
    rng = np.random.default_rng(recipe.train_seed + 2)
    params = [*unet.parameters(), *text_encoder.parameters()]
    opt = torch.optim.AdamW([
        {"params": list(unet.parameters()), "lr": recipe.unet_learning_rate, "base": recipe.unet_learning_rate},
        {"params": list(text_encoder.parameters()), "lr": recipe.text_learning_rate, "base": recipe.text_learning_rate},
    ], weight_decay=1e-2)
    ema = _Ema(params, recipe.ema_decay)
    unet.train()
    text_encoder.train()
    n = len(traits)
    for step in range(recipe.unet_steps):
        for group in opt.param_groups:
            group["lr"] = _lr(step, recipe.unet_steps, recipe.warmup_steps, group["base"])
        idx = torch.randint(0, len(mean), (recipe.unet_batch,), generator=g)
        z = mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=g)
        noise = torch.randn(z.shape, generator=g)
        if recipe.noise_offset:
            noise = noise + recipe.noise_offset * torch.randn((z.shape[0], z.shape[1], 1, 1), generator=g)
        ts = torch.randint(0, sched.config.num_train_timesteps, (len(idx),), generator=g)
        texts = [dropped(traits[int(i) % n], rng, caption_dropout=recipe.caption_dropout,
                         phrase_dropout=recipe.phrase_dropout) for i in idx]
        ids = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids
        cond = text_encoder(ids)[0]
        pred = unet(sched.add_noise(z, noise, ts), ts, cond).sample
        per = F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))
        snr = compute_snr(sched, ts)
        weight = torch.clamp(snr, max=recipe.snr_gamma) / snr
        loss = (per * weight).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema.update()
        if on_step is not None:
            on_step(step + 1, float(per.detach().mean()))
    ema.copy_to()
    unet.eval()
    text_encoder.eval()


def _versions() -> dict[str, str]:
    import diffusers
    import torch
    import transformers

    return {"torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__,
            "numpy": np.__version__, "python": platform.python_version()}


def pretrain(recipe: MiniRecipe, out: str | Path, *, data: TrainingSet | None = None) -> dict[str, Any]:
    """Pre-train on ``recipe`` and write the model to ``out``; returns its header."""
    import torch

    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(recipe.threads)
    torch.use_deterministic_algorithms(True)
    costs: dict[str, float] = {}
    try:
        t0 = time.perf_counter()
        data = data or build_training_set(recipe)
        costs["render_seconds"] = time.perf_counter() - t0
        header: dict[str, Any] = {
            "architecture": architecture(), "recipe": recipe.model_dump(mode="json"),
            "phantom_generator_version": GENERATOR_VERSION, "training_images": len(data.images),
            "training_data_sha256": data.digest, "training_data_fingerprint": fingerprint(data.images),
            "vocabulary": list(CAPTION_WORDS), "threads": recipe.threads, "versions": _versions(),
            "machine": platform.processor() or platform.machine(),
        }
        modules = weights.build_modules(header, seed=recipe.train_seed)
        vae, unet, text_encoder = modules["vae"], modules["unet"], modules["text_encoder"]
        t0 = time.perf_counter()
        with progress.task("pre-train the autoencoder", total=recipe.vae_steps + recipe.vae_steps // 5,
                           unit="steps") as bar:
            train_vae(vae, data.images, recipe, lambda s, loss: bar.update(s, note=f"loss {loss:.4f}"))
        costs["vae_seconds"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        mean, std = encode(vae, data.images)
        scaling = float(1.0 / mean.std())
        vae.register_to_config(scaling_factor=scaling)
        header["architecture"] = {**header["architecture"], "vae": {**VAE_CONFIG, "scaling_factor": scaling}}
        costs["encode_seconds"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        with progress.task("pre-train the UNet and text encoder", total=recipe.unet_steps, unit="steps") as bar:
            train_unet(unet, text_encoder, modules["tokenizer"], (mean * scaling, std * scaling), data.traits,
                       recipe, lambda s, loss: bar.update(s, note=f"loss {loss:.4f}"))
        costs["unet_seconds"] = time.perf_counter() - t0
        header["costs"] = {k: round(v, 1) for k, v in costs.items()}
        weights.save(out, {"vae": vae, "unet": unet, "text_encoder": text_encoder}, header, recipe.storage_dtype)
        log.info("miniature model written to %s (%s)", out, ", ".join(f"{k} {v:.0f}" for k, v in costs.items()))
        return header
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
