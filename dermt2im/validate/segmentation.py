"""Zero-shot Segment Anything check (the paper's SAM test): do synthetic lesions segment like real ones?

For ``validate.segmentation_samples`` synthetic and real images per class, SAM
(``validate.sam_model``; a tiny random SamConfig with ``validate.tiny``) is prompted with a box
around and a point at the lesion, found as the darkest blob: the grey image is blurred, thresholded
with Otsu's method, and the dark connected component that does not touch the image border (the
dermatoscope's dark vignette does) is taken, the largest one if several. From the mask with the
best predicted IoU the report takes the area fraction and the border irregularity
``perimeter^2 / (4 pi area)`` (1 for a disc, larger for ragged borders), side by side for real and
synthetic images of each class, with the same statistics of the Otsu blob as a model-free
reference. Output: W/reports/segmentation.csv (one row per image) and segmentation.md.

The same masks answer a simpler question for *every* usable synthetic image and every real seed
(``lesion_census``): does the image contain one plausible lesion? The Otsu dark regions that do not
touch the image border are counted (those of at least ``MIN_LESION_AREA`` of the image), and an
image holds one plausible lesion when exactly one is found and it covers between ``MIN_LESION_AREA``
and ``MAX_LESION_AREA`` of the image; where SAM ran, its mask must agree (one component in that
range). Shares per source and class, with 95 % Wilson intervals, open segmentation.md; one row per
image in W/reports/lesions.csv.

A SAM model that cannot be loaded (offline, no cached weights) gives a report with a clear message
instead of an exception.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd

from dermt2im.core import identity, storage
from dermt2im.core.errors import DermT2imError
from dermt2im.core.fileio import atomic_path, atomic_write_text
from dermt2im.core.manifest import manifest_exists
from dermt2im.core.views import seeds_view, synthetic_view
from dermt2im.core.specs import LABELS, ValidateConfig
from dermt2im.core.workdir import Workdir
from dermt2im.stage import Stamps
from dermt2im.validate.regimes import real_rows, usable_synthetic

log = logging.getLogger(__name__)
TINY_SAM_SIZE = 64
MIN_LESION_AREA = 0.01  # of the image: smaller dark specks are pores, noise or hair ends
MAX_LESION_AREA = 0.8


class SegmentationUnavailable(DermT2imError, RuntimeError):
    pass


@dataclass(frozen=True, eq=False)
class SegmentationReport:
    status: str  # ok | unavailable | no_images
    message: str
    paths: dict[str, Path] = field(default_factory=dict)
    table: pd.DataFrame | None = None

    def summary(self) -> str:
        where = f" ({self.paths['md']})" if "md" in self.paths else ""
        return f"segmentation check: {self.message}{where}"


# --- geometry ---------------------------------------------------------------------------------


def _largest_component(mask: np.ndarray) -> np.ndarray:
    n, lab, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    if n <= 1:
        return np.zeros(mask.shape, bool)
    k = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    return lab == k


def mask_stats(mask: np.ndarray) -> dict[str, float]:
    """Area fraction of the whole mask, and perimeter^2 / (4 pi area) of its largest component."""
    mask = np.asarray(mask, bool)
    total = mask.size
    comp = _largest_component(mask)
    area = float(comp.sum())
    if area == 0:
        return {"area_fraction": 0.0, "irregularity": float("nan")}
    contours, _ = cv2.findContours(comp.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    perimeter = float(max(cv2.arcLength(c, True) for c in contours))
    return {"area_fraction": float(mask.sum()) / total, "irregularity": perimeter**2 / (4 * math.pi * area)}


def lesion_prompt(rgb: np.ndarray) -> tuple[tuple[float, float], tuple[float, float, float, float], np.ndarray]:
    """(point x, y), (box x0, y0, x1, y1) and the Otsu blob of the darkest lesion-like region."""
    h, w = rgb.shape[:2]
    grey = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2GRAY)
    sigma = max(1.0, min(h, w) / 64)
    blur = cv2.GaussianBlur(grey, (0, 0), sigma)
    _, dark = cv2.threshold(blur, 0, 1, cv2.THRESH_BINARY_INV + cv2.THRESH_OTSU)
    n, lab, stats, cents = cv2.connectedComponentsWithStats(dark.astype(np.uint8), connectivity=8)
    best, best_area = None, -1
    for k in range(1, n):
        x, y, bw, bh, area = stats[k]
        touches = x == 0 or y == 0 or x + bw >= w or y + bh >= h
        if not touches and area > best_area:
            best, best_area = k, area
    if best is None and n > 1:  # everything touches the border: take the component nearest the centre
        d = [np.hypot(cents[k][0] - w / 2, cents[k][1] - h / 2) for k in range(1, n)]
        best = 1 + int(np.argmin(d))
    if best is None:
        blob = np.zeros((h, w), bool)
        return (w / 2, h / 2), (w * 0.25, h * 0.25, w * 0.75, h * 0.75), blob
    blob = lab == best
    ys, xs = np.nonzero(blob)
    # the point: the darkest pixel of the blob (robust for crescent shapes, where the centroid misses)
    i = int(np.argmin(blur[ys, xs]))
    point = (float(xs[i]), float(ys[i]))
    m = 0.05 * max(h, w)
    box = (max(0.0, xs.min() - m), max(0.0, ys.min() - m), min(w - 1.0, xs.max() + m), min(h - 1.0, ys.max() + m))
    return point, box, blob


def dark_regions(rgb: np.ndarray) -> list[np.ndarray]:
    """The dark regions of ``lesion_prompt``'s Otsu split that do not touch the image border and cover
    at least ``MIN_LESION_AREA`` of it, largest first."""
    h, w = rgb.shape[:2]
    grey = cv2.cvtColor(np.ascontiguousarray(rgb[..., :3]), cv2.COLOR_RGB2GRAY)
    blur = cv2.GaussianBlur(grey, (0, 0), max(1.0, min(h, w) / 64))
    _, dark = cv2.threshold(blur, 0, 1, cv2.THRESH_BINARY_INV + cv2.THRESH_OTSU)
    n, lab, stats, _ = cv2.connectedComponentsWithStats(dark.astype(np.uint8), connectivity=8)
    regions = []
    for k in range(1, n):
        x, y, bw, bh, area = stats[k]
        if x == 0 or y == 0 or x + bw >= w or y + bh >= h or area < MIN_LESION_AREA * h * w:
            continue
        regions.append((int(area), lab == k))
    return [m for _, m in sorted(regions, key=lambda r: -r[0])]


def one_plausible_lesion(regions: list[np.ndarray]) -> bool:
    return len(regions) == 1 and MIN_LESION_AREA <= float(regions[0].mean()) <= MAX_LESION_AREA


def sam_agrees(mask: np.ndarray) -> bool:
    """A SAM mask that is one lesion-sized component."""
    n, _, stats, _ = cv2.connectedComponentsWithStats(np.asarray(mask, np.uint8), connectivity=8)
    big = [a for a in stats[1:, cv2.CC_STAT_AREA] if a >= MIN_LESION_AREA * mask.size]
    return len(big) == 1 and MIN_LESION_AREA <= float(np.asarray(mask, bool).mean()) <= MAX_LESION_AREA


def census_row(rgb: np.ndarray) -> dict[str, float | int | bool]:
    regions = dark_regions(rgb)
    main = mask_stats(regions[0]) if regions else {"area_fraction": 0.0, "irregularity": float("nan")}
    return {"lesions": len(regions), "lesion_area_fraction": main["area_fraction"],
            "lesion_irregularity": main["irregularity"], "one_plausible_lesion": one_plausible_lesion(regions)}


def census_images(workdir: Workdir) -> pd.DataFrame:
    """Every usable synthetic image and every accepted real seed (path, label, source)."""
    return sample_images(workdir, None)


def lesion_census(images: pd.DataFrame, sam: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per image: its dark regions (``census_row``) and, where SAM segmented it, whether SAM's
    mask agrees; ``one_plausible_lesion`` needs both where both exist."""
    from dermt2im.core.imaging import decode_image

    rows = []
    for r in images.itertuples(index=False):
        rgb = decode_image(storage.read_bytes(r.path)).rgb
        rows.append({"path": r.path, "label": r.label, "source": r.source, **census_row(rgb)})
    table = pd.DataFrame(rows, columns=["path", "label", "source", "lesions", "lesion_area_fraction",
                                        "lesion_irregularity", "one_plausible_lesion"])
    if sam is not None and len(sam) and "sam_one_lesion" in sam:
        table = table.merge(sam[["path", "sam_one_lesion"]], on="path", how="left")
        agreed = table["sam_one_lesion"].map(lambda v: True if pd.isna(v) else bool(v))
        table["one_plausible_lesion"] = table["one_plausible_lesion"].astype(bool) & agreed
    return table


def census_summary(census: pd.DataFrame) -> pd.DataFrame:
    """Per source and class: images, how many hold one plausible lesion, the share and its Wilson interval."""
    from dermt2im.validate.agreement import wilson

    rows = []
    for (source, label), g in census.groupby(["source", "label"], sort=True):
        k, n = int(g["one_plausible_lesion"].sum()), len(g)
        low, high = wilson(k, n)
        rows.append({"source": source, "label": label, "images": n, "one_lesion": k, "share": k / n,
                     "ci_low": low, "ci_high": high, "median_lesions": float(g["lesions"].median())})
    return pd.DataFrame(rows)


def _census_md(summary: pd.DataFrame) -> list[str]:
    lines = ["## One plausible lesion?", "",
             f"Every usable synthetic image and every accepted real seed: the dark regions of the Otsu split that do "
             f"not touch the border and cover at least {MIN_LESION_AREA:.0%} of the image; one plausible lesion = "
             f"exactly one, covering {MIN_LESION_AREA:.0%}-{MAX_LESION_AREA:.0%} (and, for the images SAM segmented "
             "below, a SAM mask of one such component). 95% Wilson intervals.", "",
             "| Source | Class | Images | One plausible lesion | Share (95% CI) | Median regions |", "|---|---|---|---|---|---|"]
    for _, r in summary.iterrows():
        lines.append(f"| {r['source']} | {r['label']} | {r['images']} | {r['one_lesion']} | {r['share']:.0%} "
                     f"[{r['ci_low']:.0%}, {r['ci_high']:.0%}] | {r['median_lesions']:g} |")
    return lines + [""]


# --- SAM --------------------------------------------------------------------------------------


def _sam_image_processor_class():
    import transformers

    try:
        import torchvision  # noqa: F401

        return transformers.SamImageProcessor
    except ImportError:
        return getattr(transformers, "SamImageProcessorPil", None) or transformers.SamImageProcessor


def tiny_sam(seed: int = 0, size: int = TINY_SAM_SIZE):
    """A small randomly initialised SAM and its processor, offline. Its masks are meaningless; it
    exercises the pipeline in tests and the smoke preset."""
    import torch
    from transformers import (
        SamConfig,
        SamMaskDecoderConfig,
        SamModel,
        SamProcessor,
        SamPromptEncoderConfig,
        SamVisionConfig,
    )

    torch.manual_seed(seed)
    vision = SamVisionConfig(image_size=size, patch_size=8, hidden_size=32, output_channels=32, num_hidden_layers=2,
                             num_attention_heads=2, window_size=4, global_attn_indexes=[1], num_pos_feats=16, mlp_dim=64)
    prompt = SamPromptEncoderConfig(image_size=size, patch_size=8, hidden_size=32, mask_input_channels=4)
    decoder = SamMaskDecoderConfig(hidden_size=32, mlp_dim=64, num_hidden_layers=2, num_attention_heads=4,
                                   iou_head_hidden_dim=32)
    model = SamModel(SamConfig(vision_config=vision, prompt_encoder_config=prompt, mask_decoder_config=decoder)).eval()
    image_processor = _sam_image_processor_class()(size={"longest_edge": size}, pad_size={"height": size, "width": size})
    return model, SamProcessor(image_processor=image_processor)


def load_sam(spec: ValidateConfig):
    if spec.tiny:
        return tiny_sam()
    from transformers import SamModel, SamProcessor

    name = spec.sam_model
    try:
        model = SamModel.from_pretrained(name, use_safetensors=True).eval()
        processor = SamProcessor.from_pretrained(name)
    except (OSError, ValueError) as err:
        raise SegmentationUnavailable(
            f"SAM model {name!r} is not available ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}). "
            "Offline? Download it once with network access (huggingface-cli download facebook/sam-vit-base), set "
            "validate.sam_model to a local folder, or validate.segmentation_samples=0 to skip this check."
        ) from err
    return model, processor


def segment(model, processor, rgb: np.ndarray, point, box) -> tuple[np.ndarray, float]:
    """The best-scoring of SAM's three masks for one prompt, at the image's own size."""
    import torch

    device = next(model.parameters()).device
    inputs = processor(images=rgb, input_points=[[[list(point)]]], input_boxes=[[list(box)]], return_tensors="pt")
    with torch.no_grad():
        out = model(
            pixel_values=inputs["pixel_values"].to(device),
            input_points=inputs["input_points"].to(device),
            input_boxes=inputs["input_boxes"].to(device),
            multimask_output=True,
        )
    masks = processor.image_processor.post_process_masks(
        out.pred_masks.cpu(), inputs["original_sizes"], inputs["reshaped_input_sizes"]
    )[0]  # 1 x 3 x H x W
    scores = out.iou_scores.cpu()[0, 0]
    k = int(torch.argmax(scores))
    return masks[0, k].numpy().astype(bool), float(scores[k])


# --- the check --------------------------------------------------------------------------------


def sample_images(workdir: Workdir, spec: ValidateConfig | None, seed: int = 0) -> pd.DataFrame:
    """Up to ``segmentation_samples`` real (accepted seeds) and synthetic (usable) images per class;
    every one with ``spec`` None."""
    k = None if spec is None else spec.segmentation_samples
    frames = []
    if manifest_exists(workdir.seeds_manifest):
        seeds = seeds_view(workdir.seeds_manifest)
        real = pd.concat([real_rows(seeds, s) for s in ("train", "val", "test")], ignore_index=True)
        frames.append(real[["path", "label", "source"]])
    syn = usable_synthetic(synthetic_view(workdir))
    if len(syn):
        syn["path"] = [p if storage.is_remote(p) or Path(p).is_absolute() else str(workdir.root / p)
                     for p in syn["path"]]  # image-store URLs as they are
        frames.append(syn)
    if not frames:
        return pd.DataFrame(columns=["path", "label", "source"])
    df = pd.concat(frames, ignore_index=True)
    if k is None:
        return df.sort_values(["source", "label", "path"]).reset_index(drop=True)[["path", "label", "source"]]
    rng = np.random.default_rng(seed)
    picked = []
    for (_source, _label), g in df.sort_values("path").groupby(["source", "label"], sort=True):
        idx = rng.permutation(len(g))[:k]
        picked.append(g.iloc[sorted(idx)])
    return pd.concat(picked, ignore_index=True) if picked else df.iloc[:0]


def _summary_md(table: pd.DataFrame, model_name: str, tiny: bool) -> str:
    lines = [
        "# Segmentation check: SAM masks of real vs synthetic lesions",
        "",
        f"Model `{model_name}`, prompted with a box and a point at the darkest blob (Otsu). "
        "Area: mask pixels / image pixels. Irregularity: perimeter² / (4π·area) of the largest component "
        "(1 = disc; larger = more ragged). Mean ± standard deviation over the images; the Otsu columns are a "
        "model-free reference.",
    ]
    if tiny:
        lines += ["", "**Tiny random SAM (validate.tiny): the SAM columns only show that the pipeline runs.**"]
    lines += ["", "| Label | Source | Images | SAM area | SAM irregularity | SAM score | Otsu area | Otsu irregularity |",
              "|---|---|---|---|---|---|---|---|"]

    def ms(s: pd.Series) -> str:
        s = s.dropna()
        if s.empty:
            return "n/a"
        return f"{s.mean():.3f} ± {s.std(ddof=1):.3f}" if len(s) > 1 else f"{s.mean():.3f}"

    for label in LABELS:
        for source in ("real", "synthetic"):
            g = table[(table["label"] == label) & (table["source"] == source)]
            if g.empty:
                lines.append(f"| {label} | {source} | 0 | – | – | – | – | – |")
                continue
            lines.append(f"| {label} | {source} | {len(g)} | {ms(g['sam_area_fraction'])} | {ms(g['sam_irregularity'])} | "
                         f"{ms(g['sam_score'])} | {ms(g['otsu_area_fraction'])} | {ms(g['otsu_irregularity'])} |")
    lines.append("")
    return "\n".join(lines)


def segmentation_check(workdir: Workdir, spec: ValidateConfig, *, model=None, processor=None) -> SegmentationReport:
    """Segment the sampled images and write W/reports/segmentation.{csv,md}."""
    from dermt2im.core.imaging import decode_image

    reports = workdir.reports
    md_path, csv_path = reports / "segmentation.md", reports / "segmentation.csv"
    images = sample_images(workdir, spec)
    if images.empty:
        msg = "no real or synthetic images to segment"
        atomic_write_text(md_path, f"# Segmentation check\n\n{msg}\n")
        return SegmentationReport("no_images", msg, {"md": md_path})
    if model is None or processor is None:
        try:
            model, processor = load_sam(spec)
        except SegmentationUnavailable as err:
            log.warning("%s", err)
            atomic_write_text(md_path, f"# Segmentation check\n\nNot run: {err}\n")
            return SegmentationReport("unavailable", f"not run: {err}", {"md": md_path})
    rows = []
    for r in images.itertuples(index=False):
        rgb = decode_image(storage.read_bytes(r.path)).rgb
        point, box, blob = lesion_prompt(rgb)
        mask, score = segment(model, processor, rgb, point, box)
        sam, otsu = mask_stats(mask), mask_stats(blob)
        rows.append({"path": r.path, "label": r.label, "source": r.source, "point_x": point[0], "point_y": point[1],
                     "sam_area_fraction": sam["area_fraction"], "sam_irregularity": sam["irregularity"],
                     "sam_score": score, "otsu_area_fraction": otsu["area_fraction"],
                     "otsu_irregularity": otsu["irregularity"], "sam_one_lesion": sam_agrees(mask)})
    table = pd.DataFrame(rows)
    with atomic_path(csv_path) as tmp:
        table.to_csv(tmp, index=False)
    # a tiny random SAM's masks mean nothing: the census then rests on the Otsu regions alone
    census = lesion_census(census_images(workdir), None if spec.tiny else table)
    census_csv = reports / "lesions.csv"
    with atomic_path(census_csv) as tmp:
        census.to_csv(tmp, index=False)
    name = "tiny SAM" if spec.tiny else spec.sam_model
    summary_md = _summary_md(table, name, spec.tiny)
    head, _, rest = summary_md.partition("\n\n")
    atomic_write_text(md_path, "\n".join([head, "", *_census_md(census_summary(census)), rest]))
    n_syn = int((table["source"] == "synthetic").sum())
    msg = f"{len(table)} images segmented ({len(table) - n_syn} real, {n_syn} synthetic)"
    if n_syn == 0:
        msg += "; no usable synthetic images to compare with"
    syn = census[census["source"] == "synthetic"]
    if len(syn):
        msg += f"; {int(syn['one_plausible_lesion'].sum())} of {len(syn)} synthetic images hold one plausible lesion"
    return SegmentationReport("ok", msg, {"md": md_path, "csv": csv_path, "lesions": census_csv}, table)


# --------------------------------------------------------------------------------------------------
# the stage


class SegmentationStage:
    """The SAM check: one unit; done when its stamp holds the key (the sampled images and their
    versions, the model, the spec) and its report exists."""

    name = "segmentation"
    UNIT = "segmentation"

    def __init__(self, workdir: Workdir, spec: ValidateConfig) -> None:
        self.workdir, self.spec = workdir, spec
        self.stamps = Stamps(workdir.stamps, self.name)

    @classmethod
    def of(cls, workdir: Workdir, cfg: Any) -> "SegmentationStage":
        """The stage as a factory config sets it up."""
        return cls(workdir, cfg.validation)

    def units(self) -> list[str]:
        return [self.UNIT] if self.spec.segmentation_samples > 0 else []

    def describe(self, unit: str) -> str:
        return "segmentation check (SAM), real vs synthetic"

    def key(self, unit: str) -> str:
        images = census_images(self.workdir)  # the SAM sample is drawn from these
        files = [(p, storage.version_token(p)) for p in (sorted(images["path"]) if not images.empty else [])]
        s = self.spec
        return identity.content_key("segmentation", files, s.tiny, s.sam_model, s.segmentation_samples, s.image_size,
                                    identity.code_digest(__name__))

    def finished(self, unit: str, key: str) -> dict | None:
        if not (self.workdir.reports / "segmentation.md").is_file():
            return None
        return self.stamps.matching(unit, key)

    def run(self, unit: str, key: str) -> dict:
        report = segmentation_check(self.workdir, self.spec)
        summary = {"status": report.status, "message": report.message, **{k: str(v) for k, v in report.paths.items()}}
        self.stamps.write(unit, key, summary)
        return summary

    def close(self, results) -> dict:
        return results[0] if results else {"status": "off", "message": "validate.segmentation_samples is 0"}
