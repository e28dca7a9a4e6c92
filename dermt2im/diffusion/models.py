"""Base Stable Diffusion models: loading by hub id, local folder or single checkpoint file, the
miniature SD pre-trained on phantoms that ships with the package (``mini``, the smoke preset's;
``dermt2im.mini``), and a tiny random-weight SD built fully offline from config with a fixed seed
(tests of the machinery).

Weights are only ever read from safetensors: hub and folder loads pass ``use_safetensors=True``,
single files must end in ``.safetensors``. Nothing here unpickles.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from dermt2im.core import identity
from dermt2im.core.errors import DermT2imError

TINY = "tiny"

# Bumped when the tiny model's construction changes in a way the configs below do not show.
_TINY_VERSION = 1

# Words the factory's prompts use (training and generation presets); each becomes one BPE token so
# prompts stay well under the 77-token limit. Any other text still tokenizes, character by character.
TINY_WORDS: tuple[str, ...] = tuple(
    sorted(
        set(
            """a an of on the and with in image images photo dermoscopic dermoscopy sks benign malignant
            skin lesion lesions mole moles tiny small large several fair light medium olive brown dark
            fitzpatrick type i ii iii iv v vi blurry low quality text watermark ruler deformed melanoma
            nevus""".split()
        )
    )
)

TINY_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 16,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 1,
    "block_out_channels": [32, 64],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
    "cross_attention_dim": 32,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
}

TINY_VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "block_out_channels": [32, 64],
    "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
    "latent_channels": 4,
    "layers_per_block": 1,
    "norm_num_groups": 32,
    "sample_size": 32,
    "scaling_factor": 0.18215,
}

TINY_TEXT_CONFIG: dict[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 37,
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "max_position_embeddings": 77,
    "layer_norm_eps": 1e-5,
    "hidden_act": "quick_gelu",
    "projection_dim": 32,
}

# Stable Diffusion v1.5's noise schedule.
SD15_SCHEDULE: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
}


class ModelError(DermT2imError, ValueError):
    """A base model that cannot be used, worded for the person who configured it."""


# ---------------------------------------------------------------------------------------------
# the tiny tokenizer


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte-level alphabet."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def tiny_vocab_and_merges(vocabulary: tuple[str, ...] = TINY_WORDS) -> tuple[dict[str, int], list[str]]:
    """A CLIP-style byte-level BPE vocabulary: every byte (bare and word-final ``</w>``), the merges
    learnt by plain BPE training on ``vocabulary`` until each word is one token (ties broken
    alphabetically, so the result is deterministic), then the two special tokens."""
    alphabet = list(_bytes_to_unicode().values())
    tokens: list[str] = alphabet + [c + "</w>" for c in alphabet]
    words = [list(w[:-1]) + [w[-1] + "</w>"] for w in vocabulary]
    merges: list[str] = []
    while True:
        counts: dict[tuple[str, str], int] = {}
        for w in words:
            for pair in zip(w, w[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            break
        best = min(counts, key=lambda p: (-counts[p], p))
        merges.append(f"{best[0]} {best[1]}")
        tokens.append(best[0] + best[1])
        for i, w in enumerate(words):
            out, j = [], 0
            while j < len(w):
                if j + 1 < len(w) and (w[j], w[j + 1]) == best:
                    out.append(w[j] + w[j + 1])
                    j += 2
                else:
                    out.append(w[j])
                    j += 1
            words[i] = out
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(dict.fromkeys(tokens))}, merges


def _cache_root() -> Path:
    root = os.environ.get("DERMT2IM_CACHE_DIR")
    return Path(root) if root else Path(tempfile.gettempdir()) / "dermt2im-cache"


def tiny_tokenizer_dir(vocabulary: tuple[str, ...] = TINY_WORDS) -> Path:
    """Write vocab.json / merges.txt for a word-level BPE tokenizer of ``vocabulary`` once
    (atomically, in a folder named by its content) and return the folder."""
    from dermt2im.core.fileio import atomic_write_text

    vocab, merges = tiny_vocab_and_merges(vocabulary)
    vocab_text = json.dumps(vocab, ensure_ascii=False, sort_keys=True)
    merges_text = "#version: 0.2\n" + "\n".join(merges) + "\n"
    key = hashlib.sha256((vocab_text + merges_text).encode()).hexdigest()[:16]
    folder = _cache_root() / f"tiny-tokenizer-{key}"
    if not (folder / "vocab.json").is_file() or not (folder / "merges.txt").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(folder / "merges.txt", merges_text)
        atomic_write_text(folder / "vocab.json", vocab_text)
    return folder


def build_tiny_tokenizer(vocabulary: tuple[str, ...] = TINY_WORDS):
    """A CLIP tokenizer whose BPE knows each word of ``vocabulary`` as one token."""
    from transformers import CLIPTokenizer

    folder = tiny_tokenizer_dir(vocabulary)
    try:  # transformers >= 5: tokenizers-backed class, takes the files by name
        return CLIPTokenizer(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"), model_max_length=77)
    except TypeError:  # transformers 4: slow tokenizer
        return CLIPTokenizer(
            vocab_file=str(folder / "vocab.json"), merges_file=str(folder / "merges.txt"), model_max_length=77
        )


# ---------------------------------------------------------------------------------------------
# the tiny model


def tiny_identity(seed: int = 0) -> str:
    vocab, merges = tiny_vocab_and_merges()
    blob = json.dumps(
        {
            "version": _TINY_VERSION,
            "seed": seed,
            "unet": TINY_UNET_CONFIG,
            "vae": TINY_VAE_CONFIG,
            "text": TINY_TEXT_CONFIG,
            "schedule": SD15_SCHEDULE,
            "vocab": hashlib.sha256(json.dumps(vocab, sort_keys=True).encode()).hexdigest(),
            "merges": hashlib.sha256("\n".join(merges).encode()).hexdigest(),
        },
        sort_keys=True,
    )
    return f"{TINY}@{hashlib.sha256(blob.encode()).hexdigest()[:16]}"


def build_tiny_components(seed: int = 0) -> dict:
    """unet, vae, text_encoder, tokenizer, noise_scheduler (DDPM): all from the small configs above,
    initialised from ``seed`` without touching the caller's global RNG state."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = build_tiny_tokenizer()
    text_cfg = CLIPTextConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **TINY_TEXT_CONFIG,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**TINY_UNET_CONFIG)
        torch.manual_seed(seed + 1)
        vae = AutoencoderKL(**TINY_VAE_CONFIG)
        torch.manual_seed(seed + 2)
        text_encoder = CLIPTextModel(text_cfg)
    for m in (unet, vae, text_encoder):
        m.eval()
    noise_scheduler = DDPMScheduler.from_config(dict(SD15_SCHEDULE))
    return {
        "unet": unet,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "noise_scheduler": noise_scheduler,
    }


def build_sd15_random_pipeline():
    """Stable Diffusion v1.5's architecture (UNet, VAE, CLIP ViT-L text encoder) with random weights, for
    speed and memory benchmarks on a GPU without downloading the model (speed does not depend on weights)."""
    from diffusers import (
        AutoencoderKL,
        PNDMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    tok = build_tiny_tokenizer()
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=2, sample_size=512,
    )
    te = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=768, intermediate_size=3072,
                                      num_attention_heads=12, num_hidden_layers=12, max_position_embeddings=77,
                                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                      pad_token_id=tok.pad_token_id))
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet,
                                   scheduler=PNDMScheduler.from_config(dict(SD15_SCHEDULE, skip_prk_steps=True)),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_tiny_pipeline(seed: int = 0):
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    c = build_tiny_components(seed)
    pipe = StableDiffusionPipeline(
        vae=c["vae"],
        text_encoder=c["text_encoder"],
        tokenizer=c["tokenizer"],
        unet=c["unet"],
        scheduler=PNDMScheduler.from_config(dict(SD15_SCHEDULE, skip_prk_steps=True)),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---------------------------------------------------------------------------------------------
# loading real base models

_PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth", ".pkl")


def _kind(base_model: str) -> str:
    """tiny | mini | file | dir | hub; raises ModelError for local paths that cannot be used. A
    ``.safetensors`` file with a miniature model's header is ``mini``."""
    from dermt2im.mini.weights import MINI, is_mini_file

    if base_model == TINY:
        return "tiny"
    if base_model == MINI:
        return "mini"
    p = Path(base_model).expanduser()
    if p.suffix.lower() in _PICKLE_SUFFIXES:
        raise ModelError(f"base model {base_model!r}: only .safetensors checkpoints are loaded (never pickles)")
    if p.is_file():
        if p.suffix.lower() != ".safetensors":
            raise ModelError(f"base model file {p} is not a .safetensors checkpoint")
        return "mini" if is_mini_file(p) else "file"
    if p.is_dir():
        if not (p / "model_index.json").is_file():
            raise ModelError(f"base model folder {p} has no model_index.json (not a diffusers pipeline folder)")
        return "dir"
    if p.suffix.lower() == ".safetensors" or base_model.startswith(("/", "./", "../", "~")):
        raise ModelError(f"base model {base_model!r} not found")
    if base_model.count("/") > 1 or not base_model.strip():
        raise ModelError(f"base model {base_model!r} is neither a local path nor a hub id (owner/name)")
    return "hub"


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _hub_cache() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


SD15_HUB_ID = "stable-diffusion-v1-5/stable-diffusion-v1-5"


def check_base_config(base_config: str | None) -> Path | None:
    """``train.base_config``: a local folder with a diffusers pipeline's config files (model_index.json,
    unet/config.json, ...), used with a single-file checkpoint so that nothing is fetched."""
    if not base_config:
        return None
    folder = Path(base_config).expanduser()
    if not (folder / "model_index.json").is_file():
        raise ModelError(f"train.base_config {base_config!r} is not a folder with model_index.json: download the base "
                         f"model's config files into it (huggingface-cli download {SD15_HUB_ID} --include '*.json' "
                         f"'*.txt' --local-dir {base_config})")
    return folder.resolve()


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:200]


def unet_width(base_model: str, base_config: str | None = None) -> int | None:
    """Channels of the widest UNet block of ``base_model``, read without loading it: the tiny and
    miniature models' from their configs, a diffusers folder's from ``unet/config.json`` (or a
    single file's ``base_config`` folder); None when not known (a hub id, a file without one)."""
    import json

    try:
        kind = _kind(base_model)
    except ModelError:
        return None
    if kind == "tiny":
        return max(TINY_UNET_CONFIG["block_out_channels"])
    if kind == "mini":
        from dermt2im.mini.recipe import UNET_CONFIG

        return max(UNET_CONFIG["block_out_channels"])
    folder = Path(base_model).expanduser() if kind == "dir" else Path(base_config).expanduser() if base_config else None
    try:
        return max(json.loads((folder / "unet" / "config.json").read_text())["block_out_channels"]) if folder else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def load_pipeline(base_model: str, revision: str | None = None, *, base_config: str | None = None, torch_dtype=None,
                  device: str = "cpu"):
    """A StableDiffusionPipeline without safety checker, on ``device``, progress bars off.

    A single ``.safetensors`` file takes its configuration from ``base_config`` (a local folder) when
    given, else from the hub (SD v1.5's, fetched or cached). Every failure to find a model is one line
    (``ModelError``) naming the model, where it was looked for and what to download."""
    from dermt2im.core.loading import loading

    with loading():  # the collector paused while diffusers is imported and the pipeline loaded
        return _load_pipeline(base_model, revision, base_config=base_config, torch_dtype=torch_dtype, device=device)


def _load_pipeline(base_model: str, revision: str | None, *, base_config: str | None, torch_dtype, device: str):
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()  # "Loading pipeline components": the stages report progress
    kind = _kind(base_model)
    config = check_base_config(base_config)
    common: dict[str, Any] = {"safety_checker": None, "requires_safety_checker": False}
    if torch_dtype is not None:
        common["torch_dtype"] = torch_dtype
    try:
        if kind == "tiny":
            pipe = build_tiny_pipeline(0)
            if torch_dtype is not None:
                pipe.to(dtype=torch_dtype)
        elif kind == "mini":
            pipe = _mini_pipeline(base_model)
            if torch_dtype is not None:
                pipe.to(dtype=torch_dtype)
        elif kind == "file":
            where = {"config": str(config), "local_files_only": True} if config else {"local_files_only": _offline()}
            pipe = StableDiffusionPipeline.from_single_file(str(Path(base_model).expanduser()), feature_extractor=None,
                                                            **where, **common)
        elif kind == "dir":
            pipe = StableDiffusionPipeline.from_pretrained(str(Path(base_model).expanduser()), use_safetensors=True,
                                                           **common)
        else:
            pipe = StableDiffusionPipeline.from_pretrained(base_model, revision=revision, use_safetensors=True, **common)
    except ModelError:
        raise
    except (OSError, ValueError, KeyError) as err:  # huggingface_hub's not-found errors are OSErrors
        raise ModelError(_not_loadable(base_model, kind, revision, config, err)) from None
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def _mini_path(base_model: str) -> Path:
    from dermt2im.mini.weights import MINI, shipped_path

    return shipped_path() if base_model == MINI else Path(base_model).expanduser()


def _mini_pipeline(base_model: str):
    from dermt2im.mini.weights import MiniModelError, build_pipeline

    try:
        return build_pipeline(_mini_path(base_model))
    except MiniModelError as err:
        raise ModelError(str(err)) from None


def _not_loadable(base_model: str, kind: str, revision: str | None, config: Path | None, err: BaseException) -> str:
    """One line: which model, where it was looked for, what to download."""
    offline = " with HF_HUB_OFFLINE=1" if _offline() else ""
    if kind == "file" and config is None:
        return (f"base model file {base_model}: its configuration (the {SD15_HUB_ID} config files) is not in the "
                f"Hugging Face cache ({_hub_cache()}){offline}; download it once (huggingface-cli download {SD15_HUB_ID} "
                f"--include '*.json' '*.txt' --local-dir DIR) and set train.base_config: DIR ({_first_line(err)})")
    if kind == "file":
        return (f"base model file {base_model} with the config folder {config} cannot be loaded: {_first_line(err)} "
                "(the folder must hold the same model's config files: model_index.json, unet/, vae/, text_encoder/, "
                "tokenizer/, scheduler/)")
    if kind == "dir":
        return (f"base model folder {base_model} cannot be loaded: {_first_line(err)} (it needs a diffusers pipeline "
                f"with safetensors weights: huggingface-cli download {SD15_HUB_ID} --local-dir {base_model})")
    return (f"base model {base_model} (revision {revision or 'main'}) is not in the Hugging Face cache "
            f"({_hub_cache()}){offline}: download it once with `huggingface-cli download {base_model}"
            f"{' --revision ' + revision if revision else ''}`, or set train.base_model to a local folder "
            f"({_first_line(err)})")


def resolved_revision(base_model: str, revision: str | None = None) -> str | None:
    """The commit a hub model's ``revision`` (a branch, a tag or a sha) stands for, as the local cache
    knows it (None when the cache does not have it, or for local models)."""
    if _kind(base_model) != "hub":
        return None
    if revision and len(revision) == 40 and all(c in "0123456789abcdef" for c in revision):
        return revision
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(base_model, "model_index.json", revision=revision or "main")
    except Exception:  # noqa: BLE001 - an unreadable cache: nothing known
        return None
    if isinstance(found, str):
        snapshot = Path(found).parent
        if snapshot.parent.name == "snapshots":
            return snapshot.name
    return None


def base_model_identity(base_model: str, revision: str | None = None, base_config: str | None = None) -> str:
    """A stable, content-based identity for keys and manifests (recipes in ``dermt2im.core.identity``):
    the tiny model's construction, a checkpoint file's sha256 (the miniature model's included; with its config folder's listing when one
    is given), a folder's file listing, a hub id at its revision."""
    kind = _kind(base_model)
    if kind == "tiny":
        return tiny_identity(0)
    if kind == "mini":
        path = _mini_path(base_model)
        if not path.is_file():
            raise ModelError(f"miniature model {path} not found (build it with `dermt2im pretrain-mini`)")
        return identity.file_identity(path)
    if kind == "file":
        config = check_base_config(base_config)
        own = identity.file_identity(base_model)
        return own if config is None else f"{own}+config:{identity.folder_identity(config)}"
    if kind == "dir":
        return identity.folder_identity(base_model)
    return identity.hub_identity(base_model, revision)


def resolve_device(pref: str) -> str:
    """'auto' -> 'cuda' when available, else 'cpu'. Asking for 'cuda' without CUDA is an error."""
    import torch

    if pref == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if pref.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError(f"device {pref!r} requested but CUDA is not available here (use device: auto or cpu)")
    return pref
