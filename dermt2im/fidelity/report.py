"""The fidelity table: every metric per set and stratum, with its interval and sample size.

A *set* is a group of images judged against the *reference*, the training seeds (what the LoRA saw):

* ``floor``: the held-out real images (the seeds' validation and test splits): what real images score;
* ``test``: each unseen real test set (another acquisition, a domain shift);
* ``synthetic``: each generation run (``runs``): the accepted images of one source made with one base
  model, LoRA and LoRA scale; a set brought with ``import-synthetic`` is a run of its own;
* ``ceiling``: images rendered by the random-weight tiny Stable Diffusion: what noise scores.

Each set is broken down into *strata*: all images, each class, sampler, transformation (prompt
template) and skin-tone category. A class stratum is compared with the training seeds of that class,
the others with all of them. Per stratum, at most ``max_images`` images (a seeded random subset).

Metrics (``METRICS``): per embedding FID, KID, precision, recall, density and coverage; the FRD on
radiomics; per image, the median ITA and the share of each ITA category, the median typicality and
the share flagged atypical, the median nearest-seed distance and the share closer to the seeds than
all but ``COPY_QUANTILE`` of held-out real images. Each is a ``bootstrap.Estimate``: value, interval,
images, reference images and a warning where they are too few.

``position`` places a set between the floor (0) and the ceiling (1) on one metric; ``skin_tone_response``
says whether prompts that ask for a skin type move the ITA of what was generated.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from dermt2im.core.specs import FidelityConfig
from dermt2im.fidelity import bootstrap as bs
from dermt2im.fidelity.distances import NEAREST_K, frechet_distance, kid, prdc
from dermt2im.fidelity.radiomics import frd
from dermt2im.fidelity.skin_tone import BIN_NAMES, UNDEFINED, requested_skin_type

KINDS = ("floor", "test", "synthetic", "ceiling")
PRDC = ("precision", "recall", "density", "coverage")
HIGHER_IS_BETTER = {"precision", "recall", "density", "coverage", "typicality"}
ID_COLUMNS = ["kind", "set", "run", "stratum", "value", "n", "n_reference"]


@dataclass
class ImageSet:
    """Images of one set: one row per image (``label``, ``sampler``, ``transformation``, ``skin_tone``,
    ``ita``, ``typicality``, ``atypical``, ``nearest_seed``) and their features per embedding
    (``features[name]``: one row per image; radiomics rows may be NaN where not extracted)."""

    kind: str
    name: str
    rows: pd.DataFrame
    features: dict[str, np.ndarray] = field(default_factory=dict)
    run: str = ""
    description: str = ""

    def __len__(self) -> int:
        return len(self.rows)


def metric_names(embeddings: Sequence[str], radiomics: bool) -> list[str]:
    names = []
    for e in embeddings:
        names += [f"{m}.{e}" for m in ("fid", "kid", *PRDC)]
    if radiomics:
        names.append("frd")
    names += ["ita.median", *(f"ita.share.{b.replace(' ', '_')}" for b in BIN_NAMES), "typicality.median",
              "atypical.share", "nearest_seed.median", "copy.share"]
    return names


def _subset(idx: np.ndarray, limit: int, tag: str) -> np.ndarray:
    if len(idx) <= limit:
        return idx
    seed = int(hashlib.sha256(tag.encode()).hexdigest()[:8], 16)
    return np.sort(np.random.default_rng(seed).choice(idx, size=limit, replace=False))


def _strata(images: ImageSet, wanted: Sequence[str]) -> list[tuple[str, str, np.ndarray]]:
    rows = images.rows
    out = [("all", "all", np.arange(len(rows)))]
    for column in wanted:
        if column not in rows.columns:
            continue
        values = rows[column]
        present = values[values.notna() & (values.astype(str) != UNDEFINED)]
        if present.empty or (column != "label" and images.kind != "synthetic" and column != "skin_tone"):
            continue
        order = list(BIN_NAMES) if column == "skin_tone" else sorted(present.astype(str).unique())
        for v in order:
            idx = np.flatnonzero(values.astype(str).to_numpy() == v)
            if len(idx):
                out.append((column, v, idx))
    return out


def _share(values: np.ndarray) -> float:
    return float(np.mean(values)) if len(values) else math.nan


def stratum_metrics(images: ImageSet, idx: np.ndarray, reference: ImageSet, ref_idx: np.ndarray,
                    embeddings: Sequence[str], cfg: FidelityConfig, copy_cut: float, tag: str) -> dict[str, bs.Estimate]:
    """Every metric of one stratum against its reference images."""
    out: dict[str, bs.Estimate] = {}
    opts = {"resamples": cfg.bootstrap}
    idx, ref_idx = _subset(idx, cfg.max_images, tag), _subset(ref_idx, cfg.max_images, tag + "/reference")
    for e in embeddings:
        if e not in images.features or e not in reference.features:
            continue
        a, b = images.features[e][idx], reference.features[e][ref_idx]
        out[f"fid.{e}"] = bs.two_sample(lambda w, wr, a=a, b=b: frechet_distance(a, b, w, wr), len(a), len(b),
                                        name="fid", dimensions=a.shape[1], bias_shift=True, lower_bound=0.0, **opts)
        out[f"kid.{e}"] = bs.two_sample(lambda w, wr, a=a, b=b: kid(a, b, w, wr), len(a), len(b), name="kid", **opts)
        both = bs.two_sample_all(lambda w, wr, a=a, b=b: prdc(b, a, wr, w), len(a), len(b), names=PRDC,
                                 minimum=NEAREST_K + 2, **opts)  # each point needs k neighbours besides itself
        out.update({f"{k}.{e}": v for k, v in both.items()})
    if "radiomics" in images.features and "radiomics" in reference.features:
        x, r = images.features["radiomics"][idx], reference.features["radiomics"][ref_idx]
        x = x[np.isfinite(x).all(1)][: cfg.frd_max_images]
        r = r[np.isfinite(r).all(1)][: cfg.frd_max_images]
        out["frd"] = bs.two_sample(lambda w, wr, x=x, r=r: frd(x, r, w, wr), len(x), len(r), name="frd",
                                   dimensions=x.shape[1], bias_shift=True, **opts)
    rows = images.rows.iloc[idx]
    ita = rows["ita"].to_numpy(float) if "ita" in rows else np.full(len(rows), np.nan)
    out["ita.median"] = bs.one_sample(ita, np.median, name="ita", **opts)
    tones = rows["skin_tone"].astype(str).to_numpy() if "skin_tone" in rows else np.full(len(rows), UNDEFINED)
    defined = tones[tones != UNDEFINED]
    for b in BIN_NAMES:
        out[f"ita.share.{b.replace(' ', '_')}"] = bs.one_sample((defined == b).astype(float), _share, name="ita",
                                                                 **opts)
    if "typicality" in rows:
        out["typicality.median"] = bs.one_sample(rows["typicality"].to_numpy(float), np.median, name="typicality",
                                                 **opts)
        atypical = rows["atypical"].map(lambda v: np.nan if v is None or pd.isna(v) else float(bool(v)))
        out["atypical.share"] = bs.one_sample(atypical.to_numpy(float), _share, name="typicality", **opts)
    if "nearest_seed" in rows:
        near = rows["nearest_seed"].to_numpy(float)
        out["nearest_seed.median"] = bs.one_sample(near, np.median, name="memorisation", **opts)
        closer = np.where(np.isnan(near), np.nan, (near < copy_cut).astype(float)) if np.isfinite(copy_cut) else \
            np.full(len(near), np.nan)
        out["copy.share"] = bs.one_sample(closer, _share, name="memorisation", **opts)
    return out


def _warnings(estimates: dict[str, bs.Estimate]) -> str:
    """One line per distinct warning, naming the metrics it concerns."""
    by_text: dict[str, list[str]] = {}
    for name, est in estimates.items():
        if est.warning:
            by_text.setdefault(est.warning, []).append(name)
    return "; ".join(f"{', '.join(names)}: {text}" for text, names in by_text.items())


def table(sets: Sequence[ImageSet], reference: ImageSet, embeddings: Sequence[str], cfg: FidelityConfig,
          copy_cut: float) -> pd.DataFrame:
    """One row per (set, stratum): identity columns, then per metric its value, ``.low``, ``.high``
    and ``.n``, and the warnings."""
    names = metric_names(embeddings, "radiomics" in reference.features)
    records = []
    ref_labels = reference.rows["label"].astype(str).to_numpy()
    for images in sets:
        for stratum, value, idx in _strata(images, cfg.strata):
            ref_idx = np.flatnonzero(ref_labels == value) if stratum == "label" else np.arange(len(reference))
            tag = f"{images.kind}/{images.name}/{images.run}/{stratum}/{value}"
            est = stratum_metrics(images, idx, reference, ref_idx, embeddings, cfg, copy_cut, tag)
            record = {"kind": images.kind, "set": images.name, "run": images.run, "stratum": stratum, "value": value,
                      "n": int(len(idx)), "n_reference": int(len(ref_idx))}
            for m in names:
                e = est.get(m)
                record.update({m: e.value if e else math.nan, f"{m}.low": e.low if e else math.nan,
                               f"{m}.high": e.high if e else math.nan, f"{m}.n": e.n if e else 0})
            record["warnings"] = _warnings(est)
            records.append(record)
    return pd.DataFrame.from_records(records)


def position(tab: pd.DataFrame, run_row: pd.Series, metric: str) -> float:
    """Where ``run_row`` lies on ``metric`` between the floor (0) and the ceiling (1) of its stratum."""

    def pick(kind: str) -> float:
        m = tab[(tab["kind"] == kind) & (tab["stratum"] == run_row["stratum"]) & (tab["value"] == run_row["value"])]
        return float(m[metric].iloc[0]) if len(m) else math.nan

    floor, ceiling = pick("floor"), pick("ceiling")
    if not (math.isfinite(floor) and math.isfinite(ceiling)) or ceiling == floor:
        return math.nan
    return (float(run_row[metric]) - floor) / (ceiling - floor)


@dataclass(frozen=True)
class SkinToneResponse:
    """Do prompts asking for a skin type move the ITA of the images made from them?"""

    set: str
    run: str
    types: dict[int, tuple[float, int]]  # requested Fitzpatrick type -> (median ITA, images)
    rho: bs.Estimate  # Spearman correlation between requested type and ITA (negative: darker asked, darker made)

    @property
    def moves(self) -> bool:
        return bool(self.rho.high < 0) if math.isfinite(self.rho.high) else False

    def sentence(self) -> str:
        roman = {1: "I", 2: "II", 3: "III", 4: "IV", 5: "V", 6: "VI"}
        shown = ", ".join(f"{roman[t]} {m:.1f} deg (n={n})" for t, (m, n) in sorted(self.types.items()))
        verdict = ("prompts for darker skin give darker skin (lower ITA): they move it" if self.moves else
                   "the prompts do NOT measurably move the ITA")
        name = self.run if self.run and self.run != self.set else self.set
        return (f"{name}: median ITA per requested Fitzpatrick type {shown}; Spearman rho between type and ITA "
                f"{self.rho.format(2)}; {verdict}.")


def skin_tone_response(images: ImageSet, resamples: int = bs.RESAMPLES) -> SkinToneResponse | None:
    """None when fewer than two skin types were asked for (with a defined ITA)."""
    from scipy.stats import spearmanr

    rows = images.rows
    text = rows["transformation"].where(rows["transformation"].notna() & (rows["transformation"].astype(str) != ""),
                                        rows.get("prompt")) if "transformation" in rows else rows.get("prompt")
    if text is None:
        return None
    asked = np.array([requested_skin_type(t if isinstance(t, str) else None) or np.nan for t in text], float)
    ita = rows["ita"].to_numpy(float)
    keep = np.isfinite(asked) & np.isfinite(ita)
    asked, ita = asked[keep], ita[keep]
    if len(np.unique(asked)) < 2:
        return None
    types = {int(t): (float(np.median(ita[asked == t])), int((asked == t).sum())) for t in np.unique(asked)}

    def rho(sample: np.ndarray) -> float:
        a, i = asked[sample], ita[sample]
        return float(spearmanr(a, i)[0]) if len(np.unique(a)) > 1 and len(np.unique(i)) > 1 else math.nan

    n = len(asked)
    value = rho(np.arange(n))
    rng = np.random.default_rng(bs.RANDOM_SEED)
    low, high = bs.interval(np.array([rho(rng.integers(0, n, n)) for _ in range(resamples)])) if resamples else (
        math.nan, math.nan)
    return SkinToneResponse(images.name, images.run, types, bs.Estimate(value, low, high, n, 0, bs.too_small("ita", n)))
