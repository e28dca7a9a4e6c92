"""Image grids for people to look at: class x sampler sheets (the paper's Fig. 5 / 7), side-by-side
pairs for the memorisation audit, and a distance histogram. Plain numpy + OpenCV, atomic PNG writes."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from dermt2im.core.fileio import atomic_write_bytes
from dermt2im.core.imaging import encode_png

BACKGROUND = (255, 255, 255)
INK = (20, 20, 20)
REJECTED = (220, 30, 30)


def fit(rgb: np.ndarray, cell: int) -> np.ndarray:
    """Resize to a ``cell`` x ``cell`` square (area filter down, nearest up to keep pixels honest)."""
    h, w = rgb.shape[:2]
    interp = cv2.INTER_AREA if max(h, w) > cell else cv2.INTER_NEAREST
    return cv2.resize(np.ascontiguousarray(rgb), (cell, cell), interpolation=interp)


def _text(canvas: np.ndarray, text: str, org: tuple[int, int], scale: float = 0.4, colour=INK) -> None:
    cv2.putText(canvas, text, org, cv2.FONT_HERSHEY_SIMPLEX, scale, colour, 1, cv2.LINE_AA)


def image_grid(
    cells: Sequence[Sequence[np.ndarray | None]],
    *,
    row_labels: Sequence[str] | None = None,
    col_labels: Sequence[str] | None = None,
    cell: int = 128,
    pad: int = 4,
    title: str | None = None,
    frames: Sequence[Sequence[tuple[int, int, int] | None]] | None = None,
) -> np.ndarray:
    """A grid of RGB images (``None`` leaves a blank cell), with optional row / column labels and a
    coloured frame per cell (e.g. red for rejected images)."""
    n_rows = len(cells)
    n_cols = max((len(r) for r in cells), default=0)
    left = 0 if not row_labels else 8 + 7 * max(len(s) for s in row_labels)
    top = (18 if title else 0) + (16 if col_labels else 0)
    height = top + n_rows * (cell + pad) + pad
    width = left + max(n_cols, 1) * (cell + pad) + pad
    canvas = np.full((height, width, 3), BACKGROUND, np.uint8)
    if title:
        _text(canvas, title, (pad, 13), 0.45)
    if col_labels:
        for j, s in enumerate(col_labels):
            _text(canvas, s, (left + pad + j * (cell + pad), top - 4), 0.35)
    for i, row in enumerate(cells):
        y = top + pad + i * (cell + pad)
        if row_labels:
            _text(canvas, row_labels[i], (4, y + cell // 2), 0.4)
        for j, img in enumerate(row):
            x = left + pad + j * (cell + pad)
            if img is None:
                continue
            canvas[y : y + cell, x : x + cell] = fit(img, cell)
            colour = frames[i][j] if frames and i < len(frames) and j < len(frames[i]) else None
            if colour is not None:
                cv2.rectangle(canvas, (x, y), (x + cell - 1, y + cell - 1), colour, 2)
    return canvas


def pairs_sheet(
    pairs: Sequence[tuple[np.ndarray, np.ndarray, str]], *, cell: int = 128, title: str | None = None
) -> np.ndarray:
    """Rows of (left, right) images side by side with a caption each (synthetic | nearest seed)."""
    if not pairs:
        return image_grid([[None]], cell=cell, title=title or "nothing to show")
    cells = [[a, b] for a, b, _ in pairs]
    sheet = image_grid(cells, cell=cell, title=title, col_labels=["synthetic", "nearest seed"])
    extra = 8 + 7 * max(len(c) for _, _, c in pairs)
    out = np.full((sheet.shape[0], sheet.shape[1] + extra, 3), BACKGROUND, np.uint8)
    out[:, : sheet.shape[1]] = sheet
    top = (18 if title else 0) + 16
    for i, (_, _, caption) in enumerate(pairs):
        _text(out, caption, (sheet.shape[1] + 4, top + 4 + i * (cell + 4) + cell // 2), 0.4)
    return out


def histogram_png(values: Sequence[float], *, threshold: float | None = None, title: str = "", xlabel: str = "") -> bytes:
    """A histogram as PNG bytes (matplotlib, Agg backend), with an optional threshold line."""
    import io

    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    vals = np.asarray([v for v in values if v is not None and np.isfinite(v)], float)
    if len(vals):
        ax.hist(vals, bins=min(50, max(5, len(vals) // 2)), color="#4472c4", edgecolor="white")
    if threshold is not None:
        ax.axvline(threshold, color="#c00000", linestyle="--", label=f"threshold {threshold:g}")
        ax.legend()
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("images")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def save_png(path: str | Path, rgb: np.ndarray) -> Path:
    return atomic_write_bytes(Path(path), encode_png(np.ascontiguousarray(rgb)))
