"""The miniature Stable Diffusion as one safetensors file: the VAE, UNet and text encoder weights
(``vae.*``, ``unet.*``, ``text_encoder.*``) and a header (``dermt2im_mini``: JSON) with the
architecture, the recipe, the phantom generator's version, the training data's digest and
fingerprint, the tokenizer's words, what pre-training cost and the library versions.

``train.base_model: mini`` is the file shipped in this package (``SHIPPED``); a path to another such
file (made with ``dermt2im pretrain-mini --out FILE``) is loaded the same way when its header says so.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

from dermt2im.core.errors import DermT2imError

MINI = "mini"
HEADER_KEY = "dermt2im_mini"
FORMAT = "dermt2im-mini/1"
SHIPPED_NAME = "mini-sd.safetensors"


class MiniModelError(DermT2imError, ValueError):
    """The miniature model's file is missing, damaged or not one."""


def shipped_path() -> Path:
    return Path(str(resources.files("dermt2im.mini") / SHIPPED_NAME))


def read_header(path: str | Path) -> dict[str, Any]:
    """The ``dermt2im_mini`` header of a weights file; MiniModelError if it has none."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise MiniModelError(f"miniature model {path} not found (build it with `dermt2im pretrain-mini`)")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
        raise MiniModelError(f"miniature model {path} cannot be read: {err}") from None
    if HEADER_KEY not in meta:
        raise MiniModelError(f"{path} is not a dermt2im miniature model (no {HEADER_KEY} header)")
    header = json.loads(meta[HEADER_KEY])
    if header.get("format") != FORMAT:
        raise MiniModelError(f"{path}: format {header.get('format')!r}, this version reads {FORMAT!r}")
    return header


def is_mini_file(path: str | Path) -> bool:
    try:
        read_header(path)
    except (MiniModelError, ValueError):
        return False
    return True


def save(path: str | Path, modules: dict[str, Any], header: dict[str, Any], dtype: str = "float16") -> Path:
    """Write the modules' weights (cast to ``dtype``) and the header, atomically."""
    import torch
    from safetensors.torch import save_file

    from dermt2im.core.fileio import atomic_path

    cast = getattr(torch, dtype)
    tensors = {f"{name}.{k}": v.detach().to(cast).contiguous().clone()
               for name, module in modules.items() for k, v in module.state_dict().items()}
    meta = {HEADER_KEY: json.dumps({"format": FORMAT, **header}, sort_keys=True)}
    with atomic_path(Path(path)) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return Path(path)


def build_modules(header: dict[str, Any], seed: int = 0) -> dict[str, Any]:
    """Unet, VAE, text encoder (initialised from ``seed``) and tokenizer as the header describes them."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from dermt2im.diffusion.models import build_tiny_tokenizer

    arch = header["architecture"]
    tokenizer = build_tiny_tokenizer(tuple(header["vocabulary"]))
    text_cfg = CLIPTextConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                              eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **arch["text"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**arch["unet"])
        vae = AutoencoderKL(**arch["vae"])
        text_encoder = CLIPTextModel(text_cfg)
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer}


def load_modules(path: str | Path) -> dict[str, Any]:
    """The trained modules (float32, eval mode) and tokenizer of a miniature model file."""
    import torch
    from safetensors.torch import load_file

    header = read_header(path)
    modules = build_modules(header)
    state = load_file(str(path))
    for name in ("unet", "vae", "text_encoder"):
        prefix = f"{name}."
        own = {k[len(prefix):]: v.to(torch.float32) for k, v in state.items() if k.startswith(prefix)}
        missing, unexpected = modules[name].load_state_dict(own, strict=False)
        if missing or unexpected:
            raise MiniModelError(f"{path}: {name} weights do not match its architecture "
                                 f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
        modules[name].eval()
    return modules


def build_pipeline(path: str | Path):
    """A StableDiffusionPipeline (PNDM / PLMS scheduler, SD 1.5's noise schedule) on the model in ``path``."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    from dermt2im.diffusion.models import SD15_SCHEDULE

    m = load_modules(path)
    pipe = StableDiffusionPipeline(
        vae=m["vae"], text_encoder=m["text_encoder"], tokenizer=m["tokenizer"], unet=m["unet"],
        scheduler=PNDMScheduler.from_config(dict(SD15_SCHEDULE, skip_prk_steps=True)),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe
