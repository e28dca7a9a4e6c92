"""Reading and measuring one synthetic image for the gate: local files or objects on an image store.

``measure_image`` keeps only what assessing needs from an image (thousands of them): the gate's
verdict with every measure and score, the hashes for duplicates, small thumbnails for the grids and
the duplicate confirmation, and the memorisation audit's answer; never the full pixels.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from dermt2im.core import storage
from dermt2im.core.specs import QualityConfig
from dermt2im.quality.audit import SeedIndex, audit_image
from dermt2im.quality.checks import gate_image
from dermt2im.quality.dedupe import phash, thumbnail


def load_rgb(path: str | Path) -> np.ndarray:
    """RGB pixels of a local image or one on an fsspec URL (``storage.images``)."""
    from PIL import Image

    src = io.BytesIO(storage.read_bytes(path)) if storage.is_remote(path) else path
    with Image.open(src) as im:
        return np.asarray(im.convert("RGB"))


def workers() -> int:
    """Threads for measuring images (OpenCV and onnxruntime release the GIL)."""
    return max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


def measure_image(path: str | Path, q: QualityConfig, index: SeedIndex) -> dict[str, Any]:
    """Gate, hashes, thumbnails and audit of one image; a missing or unreadable file gets its reason."""
    try:
        rgb = load_rgb(path)
    except FileNotFoundError:
        return {"reason": "missing: the image file is not there (render or import again)", "metrics": {}, "flags": []}
    except Exception as err:  # noqa: BLE001 - recorded as the rejection reason
        return {"reason": f"unreadable: {err}", "metrics": {}, "flags": []}
    verdict = gate_image(rgb, q)
    return {
        "reason": verdict.reason,
        "metrics": verdict.metrics,
        "flags": verdict.flags,
        "rgb_small": cv2.resize(rgb, (96, 96), interpolation=cv2.INTER_AREA),
        "thumb": thumbnail(rgb),
        "pixels": hashlib.sha256(rgb.tobytes() + str(rgb.shape).encode()).hexdigest(),
        "phash": phash(rgb),
        "audit": audit_image(rgb, index, min_inliers=q.memorisation_min_inliers,
                             global_threshold=q.memorisation_threshold),
    }
