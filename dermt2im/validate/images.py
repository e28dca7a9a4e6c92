"""Images for the classifiers: decoded and resized once by the model's own processor into uint8
tensors (cached across the cells of a comparison), then augmented (flips, 90 degree rotations, a small
brightness / contrast / saturation jitter) and normalised per batch."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np
import torch

from dermt2im.core import storage
from dermt2im.core.specs import LABELS
from dermt2im.validate.models import LABEL2ID


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


def augment(x: torch.Tensor, generator: torch.Generator, jitter: float = 0.1, *, flips: bool = True,
            quarter_turns: bool = True, crop_scale: float = 1.0) -> torch.Tensor:
    """Random flips, 90 degree rotations (square images), a random crop of at least ``crop_scale`` of
    the area resized back, and a small colour jitter, per image (``dermt2im.core.specs.Augmentation``).

    ``x``: N x 3 x H x W uint8; returns float in 0..255. Dermoscopy has no canonical orientation,
    so every flip / rotation is a valid image of the same lesion."""
    import torch.nn.functional as F

    out = x.float()
    n = out.shape[0]
    r = torch.rand((n, 9), generator=generator)
    for i in range(n):
        img = out[i]
        if crop_scale < 1.0:
            h, w = img.shape[-2:]
            side = (crop_scale + (1 - crop_scale) * float(r[i, 6])) ** 0.5
            ch, cw = max(1, round(h * side)), max(1, round(w * side))
            top, left = int(r[i, 7] * (h - ch + 1)), int(r[i, 8] * (w - cw + 1))
            img = F.interpolate(img[None, :, top:top + ch, left:left + cw], size=(h, w), mode="bilinear",
                                align_corners=False)[0]
        if flips and r[i, 0] < 0.5:
            img = img.flip(-1)
        if flips and r[i, 1] < 0.5:
            img = img.flip(-2)
        if quarter_turns and img.shape[-1] == img.shape[-2]:
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


def labels_to_tensor(labels: Sequence[str]) -> torch.Tensor:
    try:
        return torch.tensor([LABEL2ID[str(lab)] for lab in labels], dtype=torch.long)
    except KeyError as err:
        raise ValueError(f"unknown label {err.args[0]!r}; expected one of {LABELS}") from None
