"""ViT / MobileNetV2 fine-tuning for benign vs malignant, and evaluation.

- Models come from transformers (``ViTForImageClassification``, ``MobileNetV2ForImageClassification``),
  loaded from ``validate.vit_model`` / ``validate.mobilenet_model`` (hub id or local folder,
  safetensors only, a fresh 2-class head), or, with ``validate.tiny``, built from a small config
  with a fixed seed, fully offline.
- Each model's own image processor resizes / crops (its ``size`` / ``crop_size``) and gives the
  normalisation mean and std. Images are decoded and resized once into a uint8 tensor; the training
  augmentation (flips, 90 degree rotations, a small brightness / contrast / saturation jitter) runs
  on those tensors, then the processor's rescale and normalisation are applied.
- AdamW, class-weighted cross-entropy (inverse class frequency of the training mixture), mixed
  precision on CUDA only, early stopping on the validation split (real images): the best epoch by
  validation balanced accuracy, ties broken by validation loss; training stops after ``patience``
  epochs without improvement and the best weights are restored.
- Deterministic for a seed: weights of new heads / tiny models, shuffling and augmentation all draw
  from generators seeded by it.
"""

from __future__ import annotations

import copy
import logging
import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from dermt2im.core import storage
from dermt2im.core.errors import DermT2imError
from dermt2im.core.specs import LABELS, ValidateConfig
from dermt2im.validate.metrics import binary_metrics

log = logging.getLogger(__name__)

LABEL2ID = {lab: i for i, lab in enumerate(LABELS)}  # benign 0, malignant 1
ID2LABEL = {i: lab for lab, i in LABEL2ID.items()}
MODEL_KINDS = ("vit", "mobilenet_v2")


class ModelUnavailable(DermT2imError, RuntimeError):
    """A pretrained model could not be loaded (offline, wrong id, no safetensors weights)."""


# --- models ----------------------------------------------------------------------------------


def _processor_class(name: str):
    """The Pillow-backed processor when torchvision is absent (transformers 5), else the default."""
    import transformers

    try:
        import torchvision  # noqa: F401

        return getattr(transformers, name)
    except ImportError:
        return getattr(transformers, f"{name}Pil", None) or getattr(transformers, name)


def tiny_model(kind: str, image_size: int, seed: int):
    """A small randomly initialised classifier and its processor, built offline with a fixed seed."""
    from transformers import (
        MobileNetV2Config,
        MobileNetV2ForImageClassification,
        ViTConfig,
        ViTForImageClassification,
    )

    torch.manual_seed(seed)
    if kind == "vit":
        patch = 8 if image_size % 8 == 0 else max(1, image_size // 4)
        config = ViTConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            image_size=image_size,
            patch_size=patch,
            num_labels=2,
            id2label=ID2LABEL,
            label2id=LABEL2ID,
        )
        model = ViTForImageClassification(config)
        processor = _processor_class("ViTImageProcessor")(size={"height": image_size, "width": image_size})
    elif kind == "mobilenet_v2":
        config = MobileNetV2Config(
            image_size=image_size,
            depth_multiplier=0.35,
            classifier_dropout_prob=0.1,
            num_labels=2,
            id2label=ID2LABEL,
            label2id=LABEL2ID,
        )
        model = MobileNetV2ForImageClassification(config)
        processor = _processor_class("MobileNetV2ImageProcessor")(
            size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
        )
    else:
        raise ValueError(f"unknown model kind {kind!r}; expected one of {MODEL_KINDS}")
    return model, processor


def pretrained_model(kind: str, name: str, seed: int):
    """A pretrained backbone with a new 2-class head (initialised under ``seed``) and its processor."""
    from transformers import (
        AutoImageProcessor,
        MobileNetV2ForImageClassification,
        ViTForImageClassification,
    )

    cls = {"vit": ViTForImageClassification, "mobilenet_v2": MobileNetV2ForImageClassification}.get(kind)
    if cls is None:
        raise ValueError(f"unknown model kind {kind!r}; expected one of {MODEL_KINDS}")
    torch.manual_seed(seed)
    try:
        model = cls.from_pretrained(
            name,
            num_labels=2,
            id2label=ID2LABEL,
            label2id=LABEL2ID,
            ignore_mismatched_sizes=True,
            use_safetensors=True,
        )
        processor = AutoImageProcessor.from_pretrained(name)
    except (OSError, ValueError, EnvironmentError) as err:
        raise ModelUnavailable(
            f"cannot load {kind} model {name!r}: {err}. Offline? Download it once with network access "
            "(huggingface-cli download), point validate.vit_model / validate.mobilenet_model at a local "
            "folder, or set validate.tiny=true for the offline test models."
        ) from err
    return model, processor


def model_name(kind: str, cfg: ValidateConfig) -> str:
    if cfg.tiny:
        return f"tiny-{kind}"
    return cfg.vit_model if kind == "vit" else cfg.mobilenet_model


def build_classifier(kind: str, cfg: ValidateConfig, seed: int):
    if cfg.tiny:
        return tiny_model(kind, cfg.image_size, seed)
    return pretrained_model(kind, model_name(kind, cfg), seed)


# --- images ----------------------------------------------------------------------------------


def _processor_key(processor) -> str:
    size = getattr(processor, "size", None)
    crop = getattr(processor, "crop_size", None) if getattr(processor, "do_center_crop", False) else None
    return f"{type(processor).__name__}|{dict(size) if size else None}|{dict(crop) if crop else None}"


class _ImageCache:
    """Resized uint8 images shared by the cells of a comparison (same val and test images each time)."""

    def __init__(self, max_bytes: int = 1 << 30):
        self.max_bytes = max_bytes
        self._data: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key):
        with self._lock:
            t = self._data.get(key)
            if t is not None:
                self._data.move_to_end(key)
            return t

    def put(self, key, t: torch.Tensor) -> None:
        with self._lock:
            if key in self._data:
                return
            self._data[key] = t
            self._bytes += t.numel()
            while self._bytes > self.max_bytes and self._data:
                _, old = self._data.popitem(last=False)
                self._bytes -= old.numel()


_CACHE = _ImageCache()


def _decode(path: str) -> np.ndarray:
    from dermt2im.core.imaging import decode_image

    return decode_image(storage.read_bytes(path)).rgb  # a local path or an fsspec URL


def load_images(paths: Sequence[str], processor) -> torch.Tensor:
    """Decode and resize / crop with the model's processor (no rescale, no normalisation):
    an N x 3 x H x W uint8 tensor."""
    pkey = _processor_key(processor)
    out: list[torch.Tensor | None] = []
    missing: list[int] = []
    for i, p in enumerate(paths):
        p = str(p)
        try:
            mtime = storage.version_token(p)
        except OSError as err:
            raise FileNotFoundError(f"image not found: {p}") from err
        t = _CACHE.get((p, mtime, pkey))
        out.append(t)
        if t is None:
            missing.append(i)
    for start in range(0, len(missing), 64):
        chunk = missing[start : start + 64]
        rgb = [_decode(str(paths[i])) for i in chunk]
        px = processor(images=rgb, do_rescale=False, do_normalize=False, return_tensors="np")["pixel_values"]
        px = np.clip(np.rint(np.asarray(px, dtype=np.float32)), 0, 255).astype(np.uint8)
        for i, arr in zip(chunk, px):
            t = torch.from_numpy(np.ascontiguousarray(arr))
            out[i] = t
            _CACHE.put((str(paths[i]), storage.version_token(str(paths[i])), pkey), t)
    if not out:
        return torch.zeros((0, 3, 1, 1), dtype=torch.uint8)
    return torch.stack([t for t in out if t is not None])


def normalise(x: torch.Tensor, processor) -> torch.Tensor:
    """uint8 (or float 0..255) N x 3 x H x W -> the model's pixel_values."""
    x = x.float() * float(getattr(processor, "rescale_factor", 1 / 255))
    if getattr(processor, "do_normalize", True):
        mean = torch.tensor(processor.image_mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(processor.image_std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        x = (x - mean) / std
    return x


def augment(x: torch.Tensor, generator: torch.Generator, jitter: float = 0.1) -> torch.Tensor:
    """Random flips, 90 degree rotations (square images) and a small colour jitter, per image.

    ``x``: N x 3 x H x W uint8; returns float in 0..255. Dermoscopy has no canonical orientation,
    so every flip / rotation is a valid image of the same lesion."""
    out = x.float()
    n = out.shape[0]
    r = torch.rand((n, 6), generator=generator)
    for i in range(n):
        img = out[i]
        if r[i, 0] < 0.5:
            img = img.flip(-1)
        if r[i, 1] < 0.5:
            img = img.flip(-2)
        if img.shape[-1] == img.shape[-2]:
            img = torch.rot90(img, int(r[i, 2] * 4) % 4, dims=(-2, -1))
        brightness = 1.0 + jitter * (2 * r[i, 3] - 1)
        contrast = 1.0 + jitter * (2 * r[i, 4] - 1)
        saturation = 1.0 + jitter * (2 * r[i, 5] - 1)
        mean = img.mean()
        img = (img - mean) * contrast + mean
        img = img * brightness
        grey = img.mean(dim=0, keepdim=True)
        img = (img - grey) * saturation + grey
        out[i] = img.clamp(0, 255)
    return out


# --- training --------------------------------------------------------------------------------


def resolve_device(device: str) -> torch.device:
    """``runtime.validate.device`` as a torch device: auto, cuda or cpu."""
    if device == "cpu":
        return torch.device("cpu")
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ModelUnavailable("runtime.validate.device is 'cuda' but CUDA is not available")
        return torch.device("cuda")
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass
class FitResult:
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0  # 1-based; 0 when no epoch ran
    stopped_early: bool = False
    batch_size: int = 0

    @property
    def epochs_run(self) -> int:
        return len(self.history)


def _logits(model, x: torch.Tensor, amp_dtype) -> torch.Tensor:
    if amp_dtype is not None:
        with torch.autocast("cuda", dtype=amp_dtype):
            return model(pixel_values=x).logits.float()
    return model(pixel_values=x).logits.float()


@torch.no_grad()
def predict_proba(model, images: torch.Tensor, processor, *, batch_size: int = 64, device=None,
                  amp_dtype=None) -> np.ndarray:
    """P(malignant) for every image (uint8 tensor from ``load_images``)."""
    device = device or next(model.parameters()).device
    model.eval()
    probs = []
    for start in range(0, len(images), batch_size):
        x = normalise(images[start : start + batch_size].to(device), processor)
        probs.append(torch.softmax(_logits(model, x, amp_dtype), dim=-1)[:, 1].cpu())
    return torch.cat(probs).numpy().astype(np.float64) if probs else np.zeros(0)


def _amp_dtype(cfg: ValidateConfig, device: torch.device):
    if device.type != "cuda" or cfg.mixed_precision == "no":
        return None
    return torch.float16 if cfg.mixed_precision == "fp16" else torch.bfloat16


def fit(
    model,
    processor,
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    val_x: torch.Tensor,
    val_y: torch.Tensor,
    cfg: ValidateConfig,
    seed: int,
    *,
    device: torch.device | None = None,
    batch_size: int | None = None,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
) -> FitResult:
    """Fine-tune ``model`` in place; on return it holds the best epoch's weights."""
    device = device or resolve_device("auto")
    amp = _amp_dtype(cfg, device)
    batch_size = batch_size or cfg.batch_size
    if device.type == "cuda":
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    torch.manual_seed(seed)  # dropout
    gen = torch.Generator().manual_seed(seed)
    model.to(device)
    counts = torch.bincount(train_y, minlength=2).float()
    weights = torch.where(counts > 0, counts.sum() / (2 * counts.clamp(min=1)), torch.zeros_like(counts))
    loss_fn = torch.nn.CrossEntropyLoss(weight=weights.to(device))
    optimiser = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=0.01)
    scaler = torch.amp.GradScaler("cuda") if amp == torch.float16 else None
    n = len(train_x)
    result = FitResult(batch_size=batch_size)
    best_key: tuple[float, float] | None = None
    best_state = None
    since_best = 0
    has_val = len(val_x) > 0
    if not has_val:
        log.warning("no validation images: training all %d epochs without early stopping", cfg.epochs)
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        order = torch.randperm(n, generator=gen)
        total, seen = 0.0, 0
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            if len(idx) < 2 and n >= 2:  # BatchNorm cannot train on a single image
                continue
            x = normalise(augment(train_x[idx], gen), processor).to(device)
            y = train_y[idx].to(device)
            optimiser.zero_grad(set_to_none=True)
            loss = loss_fn(_logits(model, x, amp), y)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite training loss at epoch {epoch}")
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(optimiser)
                scaler.update()
            else:
                loss.backward()
                optimiser.step()
            total += float(loss.detach()) * len(idx)
            seen += len(idx)
        row = {"train_loss": total / max(seen, 1)}
        if has_val:
            prob = predict_proba(model, val_x, processor, batch_size=max(batch_size, 32), device=device, amp_dtype=amp)
            p = np.clip(prob, 1e-7, 1 - 1e-7)
            yv = val_y.numpy()
            row["val_loss"] = float(-np.mean(yv * np.log(p) + (1 - yv) * np.log(1 - p)))
            m = binary_metrics(yv, prob)
            row["val_balanced_accuracy"] = m["balanced_accuracy"]
            row["val_accuracy"] = m["accuracy"]
            bacc = m["balanced_accuracy"] if not math.isnan(m["balanced_accuracy"]) else m["accuracy"]
            key = (bacc, -row["val_loss"])
        else:
            key = (float(epoch), 0.0)  # last epoch wins
        result.history.append(row)
        if on_epoch is not None:
            on_epoch(epoch, row)
        if best_key is None or key > best_key:
            best_key, since_best = key, 0
            result.best_epoch = epoch
            best_state = copy.deepcopy({k: v.detach().cpu() for k, v in model.state_dict().items()})
        else:
            since_best += 1
            if has_val and since_best >= cfg.early_stopping_patience:
                result.stopped_early = epoch < cfg.epochs
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return result


def labels_to_tensor(labels: Sequence[str]) -> torch.Tensor:
    try:
        return torch.tensor([LABEL2ID[str(lab)] for lab in labels], dtype=torch.long)
    except KeyError as err:
        raise ValueError(f"unknown label {err.args[0]!r}; expected one of {LABELS}") from None


def save_model(model, processor, out_dir: Path) -> Path:
    """``save_pretrained`` (safetensors) of the model and its processor: reloadable with transformers."""
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir, safe_serialization=True)
    processor.save_pretrained(out_dir)
    return out_dir
