"""Embeddings the fidelity metrics are computed in: one learned from the workdir's own seeds, and any
vision model the user has on disk.

**The seed embedding** (``seed-cnn``) is a small convolutional network fitted offline on the
*training split* of the workdir's accepted, processed seeds, to tell benign from malignant (geometric
augmentations only: flips, quarter turns, crops; colour is left alone, since a colour cast is what
fidelity must notice). An image's embedding is the global average of every block's activations
(``CHANNELS``: colour and texture from the first blocks, what separates the classes from the last),
standardised with the training seeds' mean and standard deviation. It is learned from the seeds alone,
never from anything the quality gate or validation decides, so the gate can use it (typicality) with
no circularity: the baseline classifier of validation would be another choice, but it is trained
after the gate, on sets the gate helps choose. The fit is deterministic (fixed seed) and cached as
safetensors under ``W/fidelity/embeddings/`` by the key of the seeds it saw (sample ids, preprocess
keys, labels) and this module's code; it takes seconds on a CPU at ``IMAGE_SIZE`` px.

**A user embedding** is a local folder with a transformers vision model (``config.json``,
``*.safetensors`` and, preferably, ``preprocessor_config.json``): DINOv2, a ViT, CLIP's image tower,
ConvNeXt, ResNet, or a dermatology model saved with ``save_pretrained``. It is loaded with
``local_files_only=True``, ``use_safetensors=True`` and no remote code; nothing is downloaded. The
embedding is the image features of a CLIP model, else the CLS token of a transformer, else the pooled
features of a convolutional network.

Reports name the embedding: ``seed-cnn`` with its key, or the folder's name with a digest of its files.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from dermt2im.core import identity
from dermt2im.core.errors import DermT2imError
from dermt2im.core.fileio import atomic_path, atomic_write_text

log = logging.getLogger(__name__)

IMAGE_SIZE = 64
CHANNELS = (16, 32, 64, 96)
STEPS = 200
BATCH = 32
LEARNING_RATE = 2e-3
SEED = 0
SEED_EMBEDDING = "seed-cnn"


class EmbeddingError(DermT2imError, ValueError):
    """An embedding cannot be used as asked (no seeds to learn from, a folder without a model)."""


@dataclass(frozen=True)
class Embedding:
    """A named function from RGB images to feature rows."""

    name: str  # what reports show: "seed-cnn" or the model folder's name
    identity: str  # what keys hash: the seeds' key, or a digest of the folder's files
    dimensions: int
    embed: Callable[[Sequence[np.ndarray]], np.ndarray]

    @property
    def label(self) -> str:
        return f"{self.name} ({self.identity.split(':')[-1][:12]})"


# --- the seed embedding --------------------------------------------------------------------------


def _network():
    import torch
    from torch import nn

    class SeedNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            blocks, c_in = [], 3
            for c in CHANNELS:
                blocks.append(nn.Sequential(nn.Conv2d(c_in, c, 3, stride=2, padding=1), nn.BatchNorm2d(c),
                                            nn.ReLU(inplace=True)))
                c_in = c
            self.blocks = nn.ModuleList(blocks)
            self.head = nn.Linear(CHANNELS[-1], 2)

        def forward(self, x):  # -> (features, logits)
            pooled = []
            for block in self.blocks:
                x = block(x)
                pooled.append(x.mean(dim=(2, 3)))
            return torch.cat(pooled, dim=1), self.head(pooled[-1])

    return SeedNet()


def seed_input(rgb: np.ndarray) -> np.ndarray:
    """What the seed embedding sees of an image: its RGB at ``IMAGE_SIZE`` x ``IMAGE_SIZE`` (uint8).
    The embedding of a seed input is that of its image (OpenCV copies an image already at the size),
    so the gate keeps this small array instead of reading the image again (``quality.measures``)."""
    return cv2.resize(np.ascontiguousarray(rgb[..., :3]), (IMAGE_SIZE, IMAGE_SIZE),
                      interpolation=cv2.INTER_AREA if min(rgb.shape[:2]) > IMAGE_SIZE else cv2.INTER_LINEAR)


def _tensor(images: Sequence[np.ndarray]):
    import torch

    batch = np.stack([seed_input(im) for im in images]).astype(np.float32) / 255.0 - 0.5
    return torch.from_numpy(batch).permute(0, 3, 1, 2).contiguous()


def _augment(x, g):
    """A random flip, quarter turn and crop of 80-100 % (resized back) of the batch: geometry only."""
    import torch
    import torch.nn.functional as F

    x = torch.rot90(x, int(torch.randint(0, 4, (1,), generator=g)), dims=(2, 3))
    if torch.rand(1, generator=g) < 0.5:
        x = x.flip(3)
    side = int(IMAGE_SIZE * (0.8 + 0.2 * float(torch.rand(1, generator=g))))
    top, left = (int(torch.randint(0, IMAGE_SIZE - side + 1, (1,), generator=g)) for _ in range(2))
    return F.interpolate(x[:, :, top:top + side, left:left + side], size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear",
                         align_corners=False)


def fit_seed_network(images: Sequence[np.ndarray], labels: Sequence[str]) -> tuple[dict, dict]:
    """Fit the seed network; returns its state (tensors, including the features' mean and standard
    deviation on the training seeds) and facts about the fit."""
    import torch
    from torch import nn

    if len(images) < 2:
        raise EmbeddingError(f"the seed embedding needs at least 2 training seeds, got {len(images)}")
    torch.manual_seed(SEED)
    g = torch.Generator().manual_seed(SEED)
    net = _network()
    x = _tensor(images)
    classes = sorted(set(labels))
    y = torch.tensor([classes.index(lab) for lab in labels])
    counts = torch.bincount(y, minlength=2).clamp(min=1).float()
    loss_fn = nn.CrossEntropyLoss(weight=counts.sum() / (2.0 * counts))
    opt = torch.optim.AdamW(net.parameters(), lr=LEARNING_RATE, weight_decay=1e-4)
    net.train()
    losses = []
    for _ in range(STEPS):
        idx = torch.randint(0, len(x), (min(BATCH, len(x)),), generator=g)
        _, logits = net(_augment(x[idx], g))
        loss = loss_fn(logits, y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    net.eval()
    with torch.no_grad():
        feats, logits = net(x)
    state = {k: v.detach().clone() for k, v in net.state_dict().items()}
    state["feature_mean"] = feats.mean(0)
    state["feature_std"] = feats.std(0).clamp(min=1e-6)
    accuracy = float((logits.argmax(1) == y).float().mean())
    facts = {"train_images": len(images), "classes": classes, "steps": STEPS, "final_loss": float(np.mean(losses[-20:])),
             "train_accuracy": accuracy}
    return state, facts


def _embed_with(state: dict) -> Callable[[Sequence[np.ndarray]], np.ndarray]:
    import torch

    net = _network()
    net.load_state_dict({k: v for k, v in state.items() if not k.startswith("feature_")})
    net.eval()
    mean, std = state["feature_mean"], state["feature_std"]

    def embed(images: Sequence[np.ndarray]) -> np.ndarray:
        if not len(images):
            return np.zeros((0, sum(CHANNELS)), np.float32)
        out = []
        with torch.no_grad():
            for i in range(0, len(images), 64):
                feats, _ = net(_tensor(images[i:i + 64]))
                out.append(((feats - mean) / std).numpy())
        return np.concatenate(out).astype(np.float32)

    return embed


def seed_embedding_key(train: Sequence[tuple[str, str, str]]) -> str:
    """Key of the seed embedding for training seeds given as (sample id, preprocess key, label)."""
    return identity.content_key("seed-embedding", sorted(train), IMAGE_SIZE, CHANNELS, STEPS, BATCH, LEARNING_RATE,
                                SEED, identity.code_digest(__name__))


def seed_embedding_folder(folder: Path, train: Sequence[tuple[str, str, str]]) -> Path:
    """Where the seed embedding of these training seeds is kept (``seed_embedding``)."""
    return Path(folder) / f"{SEED_EMBEDDING}-{seed_embedding_key(train)[:16]}"


def seed_embedding(folder: Path, train: Sequence[tuple[str, str, str]],
                   load: Callable[[str], np.ndarray]) -> Embedding:
    """The seed embedding for these training seeds ((sample id, preprocess key, label); ``load(sample
    id)`` gives its processed RGB image): read from ``folder`` when fitted before, else fitted now and
    saved there."""
    from safetensors.torch import load_file, save_file

    key = seed_embedding_key(train)
    where = seed_embedding_folder(folder, train)
    weights, meta = where / "model.safetensors", where / "meta.json"
    if weights.is_file() and meta.is_file():
        state = load_file(str(weights))
    else:
        ordered = sorted(train)
        log.info("fitting the seed embedding on %d training seeds", len(ordered))
        state, facts = fit_seed_network([load(sid) for sid, _, _ in ordered], [lab for _, _, lab in ordered])
        where.mkdir(parents=True, exist_ok=True)
        with atomic_path(weights) as tmp:
            save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))
        atomic_write_text(meta, json.dumps({"key": key, **facts}, indent=1))
    return Embedding(SEED_EMBEDDING, f"seed:{key}", sum(CHANNELS), _embed_with(state))


# --- a user's model, from a local folder ---------------------------------------------------------


def folder_digest(path: Path) -> str:
    """config.json's bytes and every file's name and size (hashing GBs of weights per key costs more
    than it protects)."""
    h = hashlib.sha256()
    config = path / "config.json"
    if config.is_file():
        h.update(config.read_bytes())
    for f in sorted(x for x in path.rglob("*") if x.is_file() and not x.name.startswith(".")):
        h.update(f"{f.relative_to(path).as_posix()}\0{f.stat().st_size}\n".encode())
    return h.hexdigest()


def check_model_folder(path: str | Path) -> Path:
    """The folder, or an ``EmbeddingError`` saying what is missing."""
    p = Path(path).expanduser()
    if not p.is_dir():
        raise EmbeddingError(f"embedding {path}: no such folder (fidelity.embeddings takes local folders of "
                             "transformers models, e.g. a DINOv2 saved with save_pretrained; nothing is downloaded)")
    if not (p / "config.json").is_file():
        raise EmbeddingError(f"embedding {p}: no config.json (a transformers model folder is expected)")
    if not any(p.glob("*.safetensors")):
        found = sorted(x.name for x in p.iterdir() if x.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        extra = f" (found {', '.join(found)}: pickled weights are never loaded)" if found else ""
        raise EmbeddingError(f"embedding {p}: no .safetensors weights{extra}")
    return p.resolve()


def model_embedding(path: str | Path, device: str = "cpu") -> Embedding:
    """A transformers vision model from a local folder (see the module docstring)."""
    import torch
    from transformers import AutoConfig, AutoImageProcessor, AutoModel

    p = check_model_folder(path)
    try:
        config = AutoConfig.from_pretrained(p, local_files_only=True, trust_remote_code=False)
        model = AutoModel.from_pretrained(p, local_files_only=True, use_safetensors=True, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as err:
        raise EmbeddingError(f"embedding {p}: cannot be loaded with transformers ({str(err).splitlines()[0]})") from None
    try:
        processor = AutoImageProcessor.from_pretrained(p, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError) as err:
        raise EmbeddingError(f"embedding {p}: no image processor (preprocessor_config.json) to prepare images: "
                             f"{str(err).splitlines()[0]}") from None
    model.eval().to(device)

    def features(pixel_values):
        if hasattr(model, "get_image_features"):
            out = model.get_image_features(pixel_values=pixel_values)
            return getattr(out, "pooler_output", out)
        out = model(pixel_values=pixel_values)
        hidden = out.last_hidden_state
        if hidden.dim() == 3:  # a transformer: the CLS token
            return hidden[:, 0]
        pooled = getattr(out, "pooler_output", None)
        return pooled.flatten(1) if pooled is not None else hidden.mean(dim=(2, 3))

    def embed(images: Sequence[np.ndarray]) -> np.ndarray:
        rows = []
        with torch.no_grad():
            for i in range(0, len(images), 32):
                batch = processor(images=[np.ascontiguousarray(im[..., :3]) for im in images[i:i + 32]],
                                  return_tensors="pt")
                rows.append(features(batch["pixel_values"].to(device)).float().cpu().numpy())
        return np.concatenate(rows) if rows else np.zeros((0, 0), np.float32)

    probe = embed([np.zeros((32, 32, 3), np.uint8)])
    log.info("embedding %s: %s, %d dimensions", p.name, type(config).__name__, probe.shape[1])
    return Embedding(p.name, f"model:{folder_digest(p)}", int(probe.shape[1]), embed)
