"""The automatic quality gate and the memorisation audit over W/manifests/synthetic.parquet.

The paper discarded images "with noisy artifacts" by hand; here every image gets measured and a
reason when it is rejected. Nothing is deleted: a rejected image keeps its file, its manifest row
gets ``status = rejected`` and a ``reason`` whose first word is the check that failed.

Per-image checks (``check_image``), on the grey image (long side at most ``WORK_SIZE``):

* ``blank``: grey-level std below ``min_std`` (blank or washed-out, low contrast);
* ``saturated``: more than ``max_saturated_fraction`` of the pixels clipped to black or white;
* ``noise``: share of spectral energy above half the Nyquist frequency (Hann-windowed FFT) over
  ``max_high_frequency_ratio``: white noise has ~0.80, photographs of skin a few percent;
* ``blur``: variance of the Laplacian below ``min_sharpness``;
* ``no-lesion``: no darker region near the centre (Otsu on the central disc smoothed at 1/16 of
  the side, the component overlapping the central box the most, not a ring), or it covers less than
  ``min_lesion_fraction`` / more than ``max_lesion_fraction`` of the image, or it is darker than
  the skin around it by less than ``min_lesion_contrast`` grey levels.

Across images: ``duplicate`` (identical pixels) and ``near-duplicate`` (64-bit DCT perceptual
hash within ``near_duplicate_hamming`` bits); the earliest sample (lowest index) is kept.

Memorisation audit (Carlini et al. 2023, "Extracting training data from diffusion models"): every
synthetic image gets its nearest seed image under ``embed`` (a 32x32 colour thumbnail, normalised,
low-frequency 8x8 DCT per channel, unit length), minimised over the eight flips / rotations of the
seed, so a resized, flipped or re-compressed copy of a seed stays close. Below
``memorisation_threshold`` the image is ``memorised``; with ``exclude_memorised`` it is rejected
with reason ``near-copy of seed <sample_id>``. All accepted seeds (every split) count: a
near-copy of a validation or test image would leak it into training as well.
"""

from __future__ import annotations

import io
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from dermt2im.core import storage
from dermt2im.core.config import LABELS, FactoryConfig, QualityConfig
from dermt2im.core.fileio import atomic_write_bytes, atomic_write_text
from dermt2im.core.manifest import SEEDS, SYNTHETIC, read_manifest, rewrite, writer_lock
from dermt2im.core.workdir import Workdir

log = logging.getLogger(__name__)

WORK_SIZE = 256
HF_CUTOFF = 0.25  # cycles / pixel: half the Nyquist frequency
THUMB = 32
DCT_BLOCK = 8
QUALITY_COLUMNS = [
    "status",
    "reason",
    "grey_std",
    "saturated_fraction",
    "sharpness",
    "high_frequency_ratio",
    "lesion_fraction",
    "lesion_contrast",
    "phash",
    "duplicate_of",
    "nearest_seed",
    "nearest_seed_distance",
    "memorised",
]


@dataclass(frozen=True)
class QualityReport:
    accepted: int
    rejected: int
    reasons: dict[str, int]
    memorised: int
    report_dir: Path
    files: dict[str, Path] = field(default_factory=dict)  # name -> report file (markdown, json, PNGs)
    seeds_compared: int = 0

    def summary(self) -> str:
        total = self.accepted + self.rejected
        lines = [f"quality: {self.accepted} accepted, {self.rejected} rejected of {total}"]
        for reason, n in sorted(self.reasons.items(), key=lambda kv: (-kv[1], kv[0])):
            lines.append(f"  {reason}: {n}")
        audit = f"{self.memorised} near-copies of seed images" if self.seeds_compared else "no seed images to compare"
        lines.append(f"  memorisation audit: {audit} ({self.seeds_compared} seeds)")
        lines.append(f"  reports: {self.report_dir}")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# per-image measures


def to_grey(rgb: np.ndarray) -> np.ndarray:
    if rgb.ndim == 2:
        return rgb
    return cv2.cvtColor(np.ascontiguousarray(rgb[..., :3]), cv2.COLOR_RGB2GRAY)


def _work(grey: np.ndarray) -> np.ndarray:
    h, w = grey.shape
    if max(h, w) <= WORK_SIZE:
        return grey
    s = WORK_SIZE / max(h, w)
    return cv2.resize(grey, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)


def high_frequency_ratio(grey: np.ndarray) -> float:
    """Share of (non-DC) spectral energy above ``HF_CUTOFF`` cycles/pixel, Hann-windowed."""
    g = grey.astype(np.float64)
    g = g - g.mean()
    h, w = g.shape
    if h < 4 or w < 4:
        return 0.0
    g = g * np.outer(np.hanning(h), np.hanning(w))
    power = np.abs(np.fft.fft2(g)) ** 2
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.fftfreq(w)[None, :]
    r = np.sqrt(fx**2 + fy**2)
    power[0, 0] = 0.0
    total = power.sum()
    return float(power[r > HF_CUTOFF].sum() / total) if total > 0 else 0.0


def sharpness(grey: np.ndarray) -> float:
    return float(cv2.Laplacian(grey.astype(np.float64), cv2.CV_64F).var())


def lesion_region(grey: np.ndarray) -> tuple[np.ndarray, float, float]:
    """(mask, fraction of the image, contrast) of the darker region nearest the centre.

    The grey image is smoothed at 1/16 of its side, so skin texture (pores, fine mottling, noise)
    fades to a few grey levels while a lesion keeps its darkness. Otsu splits the smoothed values
    inside the dermatoscope ring (a disc of 0.92 x the half side, which leaves out dark corners);
    the dark component overlapping the central box (middle half) the most is the lesion, unless it
    is a ring around a brighter centre (illumination fall-off), which is no lesion. Contrast is
    median(skin) - median(lesion) in grey levels on the smoothed image.
    """
    h, w = grey.shape
    smooth = cv2.GaussianBlur(grey.astype(np.float32), (0, 0), max(1.0, min(h, w) / 16))
    yy, xx = np.mgrid[0:h, 0:w]
    ny, nx = (yy - (h - 1) / 2) / (h / 2), (xx - (w - 1) / 2) / (w / 2)
    disc = ny**2 + nx**2 <= 0.92**2
    empty = np.zeros((h, w), bool)
    values = smooth[disc]
    if values.size == 0 or values.max() - values.min() < 1:
        return empty, 0.0, 0.0
    thr, _ = cv2.threshold(
        np.clip(values, 0, 255).astype(np.uint8).reshape(-1, 1), 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU
    )
    dark = ((smooth <= thr) & disc).astype(np.uint8)
    n, labels = cv2.connectedComponents(dark, connectivity=8)
    central = (np.abs(ny) <= 0.5) & (np.abs(nx) <= 0.5)
    overlap = np.bincount(labels[central].ravel(), minlength=n)
    overlap[0] = 0
    best = int(overlap.argmax()) if n > 1 else 0
    if best == 0 or overlap[best] == 0:
        return empty, 0.0, 0.0
    mask = labels == best
    if _is_ring(mask):
        return empty, 0.0, 0.0
    skin = disc & (smooth > thr)
    if not skin.any():
        return mask, float(mask.mean()), 0.0
    return mask, float(mask.mean()), float(np.median(smooth[skin]) - np.median(smooth[mask]))


def _is_ring(mask: np.ndarray) -> bool:
    """True when the region encloses the image centre in a hole larger than itself."""
    h, w = mask.shape
    cy, cx = h // 2, w // 2
    if mask[cy, cx]:
        return False
    outside = np.zeros((h + 2, w + 2), np.uint8)
    filled = mask.astype(np.uint8).copy()
    cv2.floodFill(filled, outside, (0, 0), 2)  # the corner is outside the ring, never in the region
    holes = filled == 0  # neither the region nor reachable from the corner
    if not holes[cy, cx]:
        return False
    n, lab = cv2.connectedComponents(holes.astype(np.uint8), connectivity=4)
    return int((lab == lab[cy, cx]).sum()) > int(mask.sum())


def image_metrics(rgb: np.ndarray) -> dict[str, float]:
    grey_full = to_grey(rgb)
    grey = _work(grey_full)
    _, fraction, contrast = lesion_region(grey)
    return {
        "grey_std": float(grey_full.std()),
        "saturated_fraction": float(((grey_full <= 2) | (grey_full >= 253)).mean()),
        "high_frequency_ratio": high_frequency_ratio(grey),
        "sharpness": sharpness(grey),
        "lesion_fraction": fraction,
        "lesion_contrast": contrast,
    }


def check_image(rgb: np.ndarray, cfg: QualityConfig) -> tuple[str | None, dict]:
    """(reject reason or None, metrics). The reason's first word names the check."""
    m = image_metrics(rgb)
    if m["grey_std"] < cfg.min_std:
        return f"blank: grey-level std {m['grey_std']:.1f} < {cfg.min_std:g} (blank or low contrast)", m
    if m["saturated_fraction"] > cfg.max_saturated_fraction:
        return (
            f"saturated: {m['saturated_fraction']:.0%} of pixels clipped to black or white "
            f"> {cfg.max_saturated_fraction:.0%}"
        ), m
    if m["high_frequency_ratio"] > cfg.max_high_frequency_ratio:
        return (
            f"noise: high-frequency energy ratio {m['high_frequency_ratio']:.2f} > {cfg.max_high_frequency_ratio:g}"
        ), m
    if m["sharpness"] < cfg.min_sharpness:
        return f"blur: variance of Laplacian {m['sharpness']:.1f} < {cfg.min_sharpness:g}", m
    if m["lesion_fraction"] < cfg.min_lesion_fraction or m["lesion_contrast"] < cfg.min_lesion_contrast:
        return (
            f"no-lesion: no distinct darker region near the centre (area {m['lesion_fraction']:.1%} "
            f"[min {cfg.min_lesion_fraction:.1%}], contrast {m['lesion_contrast']:.1f} grey levels [min {cfg.min_lesion_contrast:g}])"
        ), m
    if m["lesion_fraction"] > cfg.max_lesion_fraction:
        return f"no-lesion: dark region covers {m['lesion_fraction']:.0%} of the image > {cfg.max_lesion_fraction:.0%}", m
    return None, m


def reason_code(reason: str | None) -> str | None:
    """'noise: ...' -> 'noise'; 'near-copy of seed X' -> 'memorised'."""
    if not isinstance(reason, str) or not reason:
        return None
    if reason.startswith("near-copy of seed"):
        return "memorised"
    return reason.split(":", 1)[0].strip()


# ---------------------------------------------------------------------------------------------
# perceptual hash and the audit embedding


def phash(rgb: np.ndarray) -> int:
    """64-bit DCT perceptual hash (pHash): low 8x8 DCT of a 32x32 grey thumbnail vs its median."""
    small = cv2.resize(to_grey(rgb).astype(np.float32), (32, 32), interpolation=cv2.INTER_AREA)
    block = cv2.dct(small)[:8, :8].ravel()
    bits = block > np.median(block[1:])
    return int("".join("1" if b else "0" for b in bits), 2)


def phash_hex(value: int) -> str:
    return f"{value:016x}"


def hamming_matrix(hashes: list[int]) -> np.ndarray:
    """Pairwise Hamming distances between 64-bit hashes (a matrix product over bit vectors)."""
    raw = np.array(hashes, dtype=np.uint64).reshape(-1, 1).view(np.uint8)
    bits = np.unpackbits(raw, axis=1).astype(np.float32)  # bit order does not matter for distances
    ones = bits.sum(1)
    return (ones[:, None] + ones[None, :] - 2 * bits @ bits.T).round().astype(np.int32)


def embed(rgb: np.ndarray) -> np.ndarray:
    """Unit-length descriptor: low-frequency DCT of a normalised 32x32 colour thumbnail."""
    thumb = cv2.resize(np.ascontiguousarray(rgb[..., :3]), (THUMB, THUMB), interpolation=cv2.INTER_AREA)
    x = thumb.astype(np.float32) / 255.0
    x -= x.mean(axis=(0, 1), keepdims=True)
    x /= x.std() + 1e-3
    feats = [cv2.dct(np.ascontiguousarray(x[..., c]))[:DCT_BLOCK, :DCT_BLOCK].ravel() for c in range(3)]
    v = np.concatenate(feats)
    return v / (np.linalg.norm(v) + 1e-8)


def dihedral(rgb: np.ndarray) -> list[np.ndarray]:
    """The image under the eight flips / quarter-turn rotations."""
    out = []
    for k in range(4):
        r = np.rot90(rgb, k)
        out += [r, r[:, ::-1]]
    return [np.ascontiguousarray(v) for v in out]


def nearest(queries: np.ndarray, refs: np.ndarray, owners: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each query embedding, (index into owners of the closest reference, euclidean distance)."""
    d2 = np.clip(2.0 - 2.0 * queries @ refs.T, 0.0, None)
    j = d2.argmin(axis=1)
    return owners[j], np.sqrt(d2[np.arange(len(queries)), j])


# ---------------------------------------------------------------------------------------------
# reading images


def load_rgb(path: str | Path) -> np.ndarray:
    """RGB pixels of a local image or one on an fsspec URL (``generate.image_store``)."""
    from PIL import Image

    src = io.BytesIO(storage.read_bytes(path)) if storage.is_remote(path) else path
    with Image.open(src) as im:
        return np.asarray(im.convert("RGB"))


def _resolve(workdir: Workdir, p: str) -> Path | str:
    return storage.resolve(p, workdir.root)


def _measure(path: Path | str, q: QualityConfig) -> dict:
    """Everything assess needs from one image; the full-size pixels are not kept (thousands of images)."""
    import hashlib

    try:
        rgb = load_rgb(path)
    except FileNotFoundError:
        return {"reason": "missing: the PNG is not on disk (render again)", "metrics": {}}
    except Exception as err:  # noqa: BLE001 - recorded as the rejection reason
        return {"reason": f"unreadable: {err}", "metrics": {}}
    reason, metrics = check_image(rgb, q)
    return {
        "reason": reason,
        "metrics": metrics,
        "rgb_small": cv2.resize(rgb, (96, 96), interpolation=cv2.INTER_AREA),
        "pixels": hashlib.sha256(rgb.tobytes() + str(rgb.shape).encode()).hexdigest(),
        "phash": phash(rgb),
        "embedding": embed(rgb),
    }


def _workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


@dataclass
class SeedSet:
    ids: list[str]
    thumbs: list[np.ndarray]
    refs: np.ndarray  # (n * 8, D)
    owners: np.ndarray  # (n * 8,) index into ids


def load_seeds(workdir: Workdir) -> SeedSet:
    seeds = read_manifest(workdir.seeds_manifest, SEEDS)
    seeds = seeds[(seeds["status"] == "accepted") & seeds["processed_path"].notna()]
    ids, thumbs, refs, owners = [], [], [], []
    for sid, p in zip(seeds["sample_id"], seeds["processed_path"]):
        path = _resolve(workdir, p)
        if not storage.is_file(path):
            log.warning("seed %s: processed image %s is missing; left out of the audit", sid, path)
            continue
        rgb = load_rgb(path)
        i = len(ids)
        ids.append(str(sid))
        thumbs.append(cv2.resize(rgb, (96, 96), interpolation=cv2.INTER_AREA))
        for v in dihedral(rgb):
            refs.append(embed(v))
            owners.append(i)
    dim = 3 * DCT_BLOCK * DCT_BLOCK
    return SeedSet(ids, thumbs, np.array(refs, np.float32).reshape(-1, dim), np.array(owners, np.int64))


# ---------------------------------------------------------------------------------------------
# the stage


def assess(workdir: Workdir, cfg: FactoryConfig) -> QualityReport:
    """Gate and audit every rendered image; write status / reason / metrics and the reports."""
    q = cfg.quality
    df = read_manifest(workdir.synthetic_manifest, SYNTHETIC)
    report_dir = workdir.reports
    if df.empty:
        log.warning("no synthetic images recorded in %s: nothing to assess", workdir.synthetic_manifest)
        files = _write_quality_reports(workdir, df, q)
        return QualityReport(0, 0, {}, 0, report_dir, files)

    paths = [_resolve(workdir, p) if isinstance(p, str) else Path("/nonexistent") for p in df["path"]]
    with ThreadPoolExecutor(_workers()) as pool:
        measured = list(pool.map(lambda p: _measure(p, q), paths))
    out = df.copy()
    for c in QUALITY_COLUMNS:
        out[c] = None
    reasons: list[str | None] = []
    for i, m in enumerate(measured):
        for k, v in m["metrics"].items():
            out.at[i, k] = v
        if "phash" in m:
            out.at[i, "phash"] = phash_hex(m["phash"])
        reasons.append(m["reason"])

    # memorisation audit: every readable image, whatever its other checks say
    seeds = load_seeds(workdir)
    readable = [i for i, m in enumerate(measured) if "embedding" in m]
    audit_rows: list[dict] = []
    if seeds.ids and readable:
        emb = np.stack([measured[i]["embedding"] for i in readable]).astype(np.float32)
        owner, dist = nearest(emb, seeds.refs, seeds.owners)
        for i, o, d in zip(readable, owner, dist):
            memorised = bool(d < q.memorisation_threshold)
            out.at[i, "nearest_seed"] = seeds.ids[o]
            out.at[i, "nearest_seed_distance"] = float(d)
            out.at[i, "memorised"] = memorised
            audit_rows.append({"i": i, "seed": int(o), "distance": float(d), "memorised": memorised})
            if memorised and q.exclude_memorised and reasons[i] is None:
                reasons[i] = f"near-copy of seed {seeds.ids[o]}"
    elif not seeds.ids:
        log.warning("memorisation audit: no accepted seed images with processed_path in %s", workdir.seeds_manifest)

    # duplicates among the images still accepted, the earliest sample (lowest index) kept
    order = sorted((i for i in range(len(out)) if reasons[i] is None),
                   key=lambda i: (int(out.at[i, "index"]), str(out.at[i, "label"])))
    first_by_pixels: dict[str, int] = {}
    for i in order:
        px = measured[i]["pixels"]
        if px in first_by_pixels:
            j = first_by_pixels[px]
            reasons[i] = f"duplicate: identical pixels to {out.at[j, 'sample_key']}"
            out.at[i, "duplicate_of"] = out.at[j, "sample_key"]
        else:
            first_by_pixels[px] = i
    order = [i for i in order if reasons[i] is None]
    if len(order) > 1:
        ham = hamming_matrix([measured[i]["phash"] for i in order])
        kept = np.zeros(len(order), bool)
        for a, i in enumerate(order):
            close = np.flatnonzero(kept & (ham[a] <= q.near_duplicate_hamming))
            if close.size:
                b = int(close[0])
                j = order[b]
                reasons[i] = (f"near-duplicate: perceptual hash within {int(ham[a, b])} bits "
                              f"of {out.at[j, 'sample_key']}")
                out.at[i, "duplicate_of"] = out.at[j, "sample_key"]
            else:
                kept[a] = True

    out["reason"] = reasons
    out["status"] = ["rejected" if r else "accepted" for r in reasons]
    out["memorised"] = out["memorised"].astype("boolean")
    _save(workdir, out)

    files = _write_quality_reports(workdir, out, q)
    files.update(_write_grids(workdir, out, measured))
    files.update(_write_audit(workdir, out, measured, seeds, audit_rows, q))
    codes = pd.Series([reason_code(r) for r in reasons if r]).value_counts()
    report = QualityReport(
        accepted=int((out["status"] == "accepted").sum()),
        rejected=int((out["status"] == "rejected").sum()),
        reasons={str(k): int(v) for k, v in codes.items()},
        memorised=int(out["memorised"].fillna(False).sum()),
        report_dir=report_dir,
        files=files,
        seeds_compared=len(seeds.ids),
    )
    log.info("quality gate: %d accepted, %d rejected %s; %d near-copies of seeds", report.accepted,
             report.rejected, report.reasons, report.memorised)
    return report


def _save(workdir: Workdir, assessed: pd.DataFrame) -> None:
    """Write the quality columns back, under the manifest's writer lock, for rows whose image is
    unchanged (a shard re-rendered meanwhile keeps its fresh 'rendered' row; on an object store a
    part appended after this read is kept and still wins)."""
    by_key = assessed.set_index("sample_key")

    def with_quality(current: pd.DataFrame) -> pd.DataFrame:
        current = current.copy()
        for i, key in enumerate(current["sample_key"]):
            if key in by_key.index and by_key.at[key, "sha256"] == current.at[i, "sha256"]:
                for c in QUALITY_COLUMNS:
                    current.at[i, c] = by_key.at[key, c]
        return current

    with writer_lock(workdir.synthetic_manifest, workdir.locks):
        rewrite(workdir.synthetic_manifest, SYNTHETIC, with_quality)


# ---------------------------------------------------------------------------------------------
# reports


def _counts(df: pd.DataFrame, by: str | None = None) -> list[dict]:
    if df.empty:
        return []
    d = df.assign(code=[reason_code(r) or "accepted" for r in df["reason"]])
    keys = [by] if by else []
    rows = []
    for k, g in (d.groupby(keys, sort=True) if keys else [((None,), d)]):
        row = {} if not by else {by: k[0] if isinstance(k, tuple) else k}
        row.update(total=len(g), accepted=int((g["status"] == "accepted").sum()),
                   rejected=int((g["status"] == "rejected").sum()))
        for code, n in g.loc[g["status"] == "rejected", "code"].value_counts().sort_index().items():
            row[code] = int(n)
        rows.append(row)
    return rows


def quality_tables(df: pd.DataFrame) -> dict[str, list[dict]]:
    return {"overall": _counts(df), "by_label": _counts(df, "label"), "by_sampler": _counts(df, "sampler")}


def _md_table(rows: list[dict]) -> str:
    if not rows:
        return "_no images_\n"
    cols = list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r.get(c, 0)) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _write_quality_reports(workdir: Workdir, df: pd.DataFrame, q: QualityConfig) -> dict[str, Path]:
    tables = quality_tables(df)
    payload = {"thresholds": q.model_dump(mode="json"), **tables}
    if not df.empty:
        payload["rejected"] = [
            {"sample_key": k, "reason": r}
            for k, r in zip(df["sample_key"], df["reason"]) if isinstance(r, str)
        ]
    jpath = atomic_write_text(workdir.reports / "quality.json", json.dumps(payload, indent=2, default=str))
    md = ["# Quality gate", "", "Automatic replacement for the paper's manual discarding of noisy images.", ""]
    md += ["## Overall", "", _md_table(tables["overall"]), "## By class", "", _md_table(tables["by_label"])]
    md += ["## By sampler", "", _md_table(tables["by_sampler"])]
    md += ["## Thresholds", ""] + [f"- `{k}`: {v}" for k, v in q.model_dump(mode="json").items()]
    mpath = atomic_write_text(workdir.reports / "quality.md", "\n".join(md) + "\n")
    return {"quality_json": jpath, "quality_md": mpath}


def _write_grids(workdir: Workdir, df: pd.DataFrame, measured: list[dict], per_cell: int = 8) -> dict[str, Path]:
    from dermt2im.quality.grids import REJECTED, image_grid, save_png

    files: dict[str, Path] = {}
    grid_dir = workdir.reports / "grids"
    samplers = list(dict.fromkeys(df["sampler"]))
    overview_cells, overview_labels, overview_frames = [], [], []
    for label in [lb for lb in LABELS if lb in set(df["label"])]:
        cells, frames = [], []
        for sampler in samplers:
            sel = df[(df["label"] == label) & (df["sampler"] == sampler)]
            # accepted images first; fill up with rejected ones (red frame) so a sheet is never empty
            sel = sel.assign(_r=(sel["status"] != "accepted").astype(int)).sort_values(["_r", "index"])
            row, frame = [], []
            for i in sel.index[:per_cell]:
                if "rgb_small" in measured[i]:
                    row.append(measured[i]["rgb_small"])
                    frame.append(None if df.at[i, "status"] == "accepted" else REJECTED)
            cells.append(row)
            frames.append(frame)
        n_acc = int(((df["label"] == label) & (df["status"] == "accepted")).sum())
        title = f"{label}: {n_acc} accepted of {int((df['label'] == label).sum())} (red frame: rejected)"
        grid = image_grid(cells, row_labels=samplers, cell=96, title=title, frames=frames)
        files[f"grid_{label}"] = save_png(grid_dir / f"{label}.png", grid)
        overview_cells += cells
        overview_labels += [f"{label[:3]} {s}" for s in samplers]
        overview_frames += frames
    if overview_cells:
        grid = image_grid(overview_cells, row_labels=overview_labels, cell=96, title="class x sampler",
                          frames=overview_frames)
        files["grid_overview"] = save_png(grid_dir / "overview.png", grid)
    return files


def _write_audit(
    workdir: Workdir, df: pd.DataFrame, measured: list[dict], seeds: SeedSet, rows: list[dict], q: QualityConfig,
    closest: int = 8,
) -> dict[str, Path]:
    from dermt2im.quality.grids import histogram_png, pairs_sheet, save_png

    audit_dir = workdir.reports / "audit"
    audit_dir.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    dists = [r["distance"] for r in rows]
    flagged = [r for r in rows if r["memorised"]]
    ranked = sorted(rows, key=lambda r: r["distance"])[:closest]
    summary = {
        "method": "nearest seed under a normalised 32x32 colour-thumbnail DCT descriptor, min over 8 flips/rotations",
        "threshold": q.memorisation_threshold,
        "exclude_memorised": q.exclude_memorised,
        "seeds": len(seeds.ids),
        "synthetic": len(df),
        "compared": len(rows),
        "flagged": len(flagged),
        "distance": (
            {"min": float(np.min(dists)), "median": float(np.median(dists)), "max": float(np.max(dists))} if dists else None
        ),
        "closest": [
            {"sample_key": df.at[r["i"], "sample_key"], "seed": seeds.ids[r["seed"]], "distance": r["distance"],
             "memorised": r["memorised"]}
            for r in ranked
        ],
    }
    files["audit_json"] = atomic_write_text(audit_dir / "audit.json", json.dumps(summary, indent=2))
    files["audit_histogram"] = atomic_write_bytes(
        audit_dir / "distance_histogram.png",
        histogram_png(dists, threshold=q.memorisation_threshold, title="distance to the nearest seed image",
                      xlabel="descriptor distance (0 = identical)"),
    )
    pairs = [
        (measured[r["i"]]["rgb_small"], seeds.thumbs[r["seed"]],
         f"{df.at[r['i'], 'sample_key']}  d={r['distance']:.3f}{'  FLAGGED' if r['memorised'] else ''}")
        for r in ranked
    ]
    files["audit_pairs"] = save_png(audit_dir / "closest_pairs.png",
                                    pairs_sheet(pairs, cell=96, title="closest synthetic / seed pairs"))
    md = [
        "# Memorisation audit",
        "",
        f"{len(rows)} synthetic images compared with {len(seeds.ids)} seed images; "
        f"**{len(flagged)} flagged** as near-copies (distance < {q.memorisation_threshold:g})"
        + (", excluded from training sets." if q.exclude_memorised else ", kept (exclude_memorised is off)."),
        "",
        summary["method"] + ".",
        "",
        "| synthetic | nearest seed | distance | flagged |",
        "|---|---|---|---|",
    ]
    md += [f"| {c['sample_key']} | {c['seed'][:16]} | {c['distance']:.4f} | {'yes' if c['memorised'] else ''} |"
           for c in summary["closest"]]
    md += ["", "![histogram](distance_histogram.png)", "", "![closest pairs](closest_pairs.png)"]
    files["audit_md"] = atomic_write_text(audit_dir / "audit.md", "\n".join(md) + "\n")
    return files
