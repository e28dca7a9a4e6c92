"""Training mixtures: which real and which synthetic images each validation regime trains on.

Pure functions on DataFrames; no I/O, no torch. A *regime* is a synthetic share ``r`` plus a
*setting* that says what is held fixed when synthetic images are added:

``constant`` (the default, and the controlled comparison)
    The total training size is fixed at ``N``, the number of real training images. The mixture has
    ``S = round(r * N)`` synthetic and ``N - S`` real images. Real images are *replaced*, so a
    difference to the baseline is due to the data source, not to a larger training set.
``additive`` (what the paper did)
    All ``N`` real images, plus ``S = round(r * N / (1 - r))`` synthetic ones on top, so that the
    synthetic share of the mixture is ``r``. Undefined for ``r = 1``.

Named regimes (``validate.regimes``):

- ``baseline``: real training images only (``r = 0``).
- ``hybrid``: ``r = validate.synthetic_ratio`` (0.75 as in the paper), constant setting.
- ``hybrid-additive``: the same share in the paper's additive setting.
- ``synthetic_only`` (or ``synthetic-only``): ``N`` synthetic images, no real ones.
- ``sweep-<setting>-<percent>``, e.g. ``sweep-constant-50``; ``validate.sweep_ratios`` x
  ``validate.sweep_settings`` adds one per pair.

Synthetic sources: a regime's synthetic images can be restricted to one source with ``@NAME``
(``hybrid@ext``: only images imported as ``ext``; ``hybrid@dermt2im``: only the factory's own
renders). ``validate.synthetic_sources`` runs every regime that uses synthetic images once per source
it lists, so one Table IV compares real-only, the factory's set and any external set side by side.

Class composition: every mixture keeps the label composition of the real training split (the
synthetic count is split across labels in proportion to the real counts, largest remainder), so
the regimes differ in where images come from, never in class prior. When a label has fewer usable
synthetic images than asked for, all of them are used; in the constant setting the shortfall is
filled with real images of that label so that the total stays ``N`` (the achieved share is then
below ``r``); in the additive and synthetic-only regimes the mixture is smaller. The achieved
counts are in the mixture (``n_real``, ``n_synthetic``, ``notes``) and are logged with every run.

Sampling is seeded and *nested*: for a given seed, each (label, source) pool is shuffled once, and
a regime takes a prefix of it. So at one seed the 50 % synthetic images are a subset of the 75 %
ones and the kept real images of a constant regime are a subset of the baseline's.

Only synthetic rows with ``status == "accepted"`` and ``memorised`` not True are usable (the
quality gate and the memorisation audit both passed), and never rows rendered with the base model
alone (``base_model_only``).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd

from dermt2im.core.errors import DermT2imError
from dermt2im.core.specs import LABELS, ValidateConfig

REAL, SYNTHETIC = "real", "synthetic"
SETTINGS = ("constant", "additive")
ITEM_COLUMNS = ["path", "label", "source"]


class RegimeError(DermT2imError, ValueError):
    """A regime name or ratio that makes no sense."""


class NoSyntheticImages(RegimeError):
    """A regime needs synthetic images and none are usable."""


@dataclass(frozen=True)
class RegimeSpec:
    name: str
    setting: str  # constant | additive
    synthetic_ratio: float  # nominal share of synthetic images in the mixture
    fill_with_real: bool = True  # constant setting: keep the total at N when synthetic run short
    synthetic_source: str | None = None  # draw synthetic images from this source only; None: all

    @property
    def needs_synthetic(self) -> bool:
        return self.synthetic_ratio > 0

    def from_source(self, source: str) -> "RegimeSpec":
        return replace(self, name=f"{self.name.split('@', 1)[0]}@{source}", synthetic_source=source)

    @property
    def source_label(self) -> str:
        """What Table IV shows: the source, "all" pooled, or "none" for real-only regimes."""
        return self.synthetic_source or ("all" if self.needs_synthetic else "none")


def _pct(r: float) -> str:
    return f"{r * 100:g}"


def parse_regime(name: str, synthetic_ratio: float = 0.75) -> RegimeSpec:
    """The spec for one regime name (see the module docstring), ``@SOURCE`` included."""
    base, at, source = name.strip().partition("@")
    spec = _parse_base(base, synthetic_ratio)
    if not at:
        return spec
    if not source or not spec.needs_synthetic:
        raise RegimeError(f"regime {name!r}: '@SOURCE' names the synthetic source of a regime that uses synthetic "
                          "images (e.g. hybrid@ext)")
    return spec.from_source(source)


def _parse_base(name: str, synthetic_ratio: float) -> RegimeSpec:
    key = name.strip().lower()
    if key == "baseline":
        return RegimeSpec("baseline", "constant", 0.0)
    if key == "hybrid":
        return RegimeSpec("hybrid", "constant", float(synthetic_ratio))
    if key == "hybrid-additive":
        return RegimeSpec("hybrid-additive", "additive", float(synthetic_ratio))
    if key in ("synthetic_only", "synthetic-only"):
        return RegimeSpec("synthetic_only", "constant", 1.0, fill_with_real=False)
    if key.startswith("sweep-"):
        parts = key.split("-")
        if len(parts) == 3 and parts[1] in SETTINGS:
            try:
                pct = float(parts[2])
            except ValueError:
                pct = -1.0
            if 0.0 <= pct <= 100.0:
                return RegimeSpec(f"sweep-{parts[1]}-{_pct(pct / 100)}", parts[1], pct / 100.0)
    raise RegimeError(
        f"unknown regime {name!r}: use baseline, hybrid, hybrid-additive, synthetic_only or "
        "sweep-<constant|additive>-<percent> (e.g. sweep-constant-50)"
    )


def sweep_regimes(ratios: tuple[float, ...], settings: tuple[str, ...]) -> list[RegimeSpec]:
    out = []
    for setting in settings:
        for r in ratios:
            if not 0.0 <= r <= 1.0:
                raise RegimeError(f"sweep ratio {r} is outside [0, 1]")
            out.append(RegimeSpec(f"sweep-{setting}-{_pct(r)}", setting, float(r)))
    return out


def expand_regimes(cfg: ValidateConfig) -> list[RegimeSpec]:
    """``cfg.regimes`` (the word ``sweep`` is accepted there as a placeholder) plus the sweep over
    ``cfg.sweep_ratios`` x ``cfg.sweep_settings``, each regime that uses synthetic images and names no
    source once per ``cfg.synthetic_sources``; duplicates removed, order kept."""
    specs = [parse_regime(n, cfg.synthetic_ratio) for n in cfg.regimes if n.strip().lower() != "sweep"]
    specs += sweep_regimes(tuple(cfg.sweep_ratios), tuple(cfg.sweep_settings))
    if cfg.synthetic_sources:
        specs = [variant for s in specs for variant in (
            [s.from_source(src) for src in cfg.synthetic_sources]
            if s.needs_synthetic and s.synthetic_source is None else [s])]
    seen: dict[str, RegimeSpec] = {}
    for s in specs:
        seen.setdefault(s.name, s)
    return list(seen.values())


# --- inputs ----------------------------------------------------------------------------------


def _is_true(v) -> bool:
    return v is True or (isinstance(v, (np.bool_, bool)) and bool(v))


OWN_SOURCE = "dermt2im"  # the factory's own renders (rows from before imports existed have no source)


def synthetic_sources(synthetic: pd.DataFrame) -> pd.Series:
    """Each row's source: the name it was imported under, or ``dermt2im``."""
    if "source" not in synthetic.columns:
        return pd.Series(OWN_SOURCE, index=synthetic.index)
    return synthetic["source"].fillna(OWN_SOURCE).astype(str)


def usable_synthetic(synthetic: pd.DataFrame) -> pd.DataFrame:
    """Rows that passed the quality gate and the memorisation audit, as (path, label, source, sha256,
    synthetic_source).

    ``sha256`` lets cache keys see a re-rendered image: synthetic paths are names, not content."""
    if synthetic is None or synthetic.empty:
        return pd.DataFrame(columns=[*ITEM_COLUMNS, "sha256", "synthetic_source", "sample_key", "sampler",
                                     "transformation"])
    df = synthetic
    ok = (df["status"] == "accepted") & ~df["memorised"].map(_is_true) & df["label"].isin(LABELS)
    if "base_model_only" in df.columns:  # the base model alone draws no lesion of a class
        ok &= ~df["base_model_only"].map(_is_true)
    ok &= df["path"].notna()
    out = df.loc[ok, ["path", "label"]].copy()
    out["sha256"] = df.loc[ok, "sha256"].values if "sha256" in df.columns else None
    out["source"] = SYNTHETIC
    out["synthetic_source"] = synthetic_sources(df)[ok].values
    for column in ("sample_key", "sampler", "transformation"):  # what the class agreement is reported by
        out[column] = df.loc[ok, column].values if column in df.columns else None
    return out.drop_duplicates("path").reset_index(drop=True)


def synthetic_summary(synthetic: pd.DataFrame) -> str:
    """Why there may be no usable synthetic images, in numbers."""
    if synthetic is None or synthetic.empty:
        return "the synthetic manifest is empty or missing (run `dermt2im generate` first)"
    n = len(synthetic)
    accepted = int((synthetic["status"] == "accepted").sum())
    memorised = int(synthetic["memorised"].map(_is_true).sum())
    unchecked = int(synthetic["status"].isna().sum())
    return (
        f"{n} synthetic rows: {accepted} accepted, {memorised} flagged as memorised, "
        f"{unchecked} not yet through the quality gate"
    )


def real_rows(seeds: pd.DataFrame, split: str) -> pd.DataFrame:
    """Accepted, labelled seed rows of one split as (path, label, source, lesion_id, sample_id).

    ``path`` is the preprocessed image when there is one, else the original file."""
    df = seeds[(seeds["status"] == "accepted") & (seeds["split"] == split) & seeds["label"].isin(LABELS)]
    path = df["processed_path"].where(df["processed_path"].notna(), df["source_path"])
    out = pd.DataFrame(
        {
            "path": path.astype(str).values,
            "label": df["label"].values,
            "source": REAL,
            "lesion_id": df["lesion_id"].values,
            "sample_id": df["sample_id"].values,
        }
    )
    return out.drop_duplicates("path").reset_index(drop=True)


# --- mixtures --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Mixture:
    regime: RegimeSpec
    seed: int
    items: tuple[tuple[str, str, str], ...]  # (path, label, source)
    n_real_available: int  # N: real training images (the constant setting's total)
    target_synthetic: int  # S asked for by the regime
    notes: tuple[str, ...] = field(default=())

    @property
    def n_real(self) -> int:
        return sum(1 for it in self.items if it[2] == REAL)

    @property
    def n_synthetic(self) -> int:
        return sum(1 for it in self.items if it[2] == SYNTHETIC)

    @property
    def actual_ratio(self) -> float:
        return self.n_synthetic / len(self.items) if self.items else float("nan")

    def label_counts(self, source: str | None = None) -> dict[str, int]:
        out = {lab: 0 for lab in LABELS}
        for _, lab, src in self.items:
            if source is None or src == source:
                out[lab] += 1
        return out

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame(list(self.items), columns=ITEM_COLUMNS)

    def digest(self) -> str:
        """Content hash of the rows (order-independent), for cache keys."""
        h = hashlib.sha256()
        for row in sorted(self.items):
            h.update("\x1f".join(row).encode())
            h.update(b"\x1e")
        return h.hexdigest()


def _round(x: float) -> int:
    return int(math.floor(x + 0.5 + 1e-9))


def allocate(total: int, weights: dict[str, int]) -> dict[str, int]:
    """Split ``total`` across keys in proportion to ``weights`` (largest remainder, ties by key)."""
    wsum = sum(weights.values())
    if wsum == 0 or total == 0:
        return {k: 0 for k in weights}
    exact = {k: total * w / wsum for k, w in weights.items()}
    out = {k: int(math.floor(v + 1e-9)) for k, v in exact.items()}
    rest = total - sum(out.values())
    for k in sorted(weights, key=lambda k: (-(exact[k] - out[k]), k))[:rest]:
        out[k] += 1
    return out


def target_synthetic(spec: RegimeSpec, n_real: int) -> int:
    r = spec.synthetic_ratio
    if spec.setting == "constant":
        return _round(r * n_real)
    if spec.setting == "additive":
        if r >= 1.0:
            raise RegimeError(f"{spec.name}: the additive setting is undefined at 100% synthetic")
        return _round(r * n_real / (1.0 - r))
    raise RegimeError(f"{spec.name}: unknown setting {spec.setting!r}")


def _stable_int(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")


def _shuffled(pool: pd.DataFrame, seed: int, label: str, source: str) -> list[str]:
    paths = sorted(pool["path"].astype(str).tolist())
    rng = np.random.default_rng(np.random.SeedSequence([seed, _stable_int(label), _stable_int(source)]))
    return [paths[i] for i in rng.permutation(len(paths))]


def build_mixture(real_train: pd.DataFrame, synthetic: pd.DataFrame, spec: RegimeSpec, seed: int) -> Mixture:
    """The training rows of one regime at one seed.

    ``real_train``: rows with ``path`` and ``label`` (see ``real_rows``); ``synthetic``: usable rows
    (see ``usable_synthetic``). Raises ``NoSyntheticImages`` when the regime needs synthetic images
    and none are usable for it.
    """
    real_train = real_train.drop_duplicates("path")
    synthetic = synthetic.drop_duplicates("path") if synthetic is not None else pd.DataFrame(columns=ITEM_COLUMNS)
    if spec.synthetic_source is not None and len(synthetic):
        synthetic = synthetic[synthetic["synthetic_source"] == spec.synthetic_source]
    n_by_label = {lab: int((real_train["label"] == lab).sum()) for lab in LABELS}
    n_real = sum(n_by_label.values())
    if n_real == 0:
        raise RegimeError("there are no real training images (seeds with split 'train')")
    total_syn = target_synthetic(spec, n_real)
    want = allocate(total_syn, n_by_label)
    notes: list[str] = []
    items: list[tuple[str, str, str]] = []
    for lab in LABELS:
        real_pool = _shuffled(real_train[real_train["label"] == lab], seed, lab, REAL)
        syn_pool = _shuffled(synthetic[synthetic["label"] == lab], seed, lab, SYNTHETIC) if len(synthetic) else []
        s = min(want[lab], len(syn_pool))
        if s < want[lab]:
            notes.append(f"{lab}: {want[lab]} synthetic images asked for, {len(syn_pool)} usable")
        if spec.setting == "additive":
            r = len(real_pool)
        elif spec.fill_with_real:
            r = n_by_label[lab] - s
        else:
            r = 0
        items += [(p, lab, REAL) for p in real_pool[:r]]
        items += [(p, lab, SYNTHETIC) for p in syn_pool[:s]]
    mixture = Mixture(spec, seed, tuple(items), n_real, total_syn, tuple(notes))
    if spec.needs_synthetic and total_syn > 0 and mixture.n_synthetic == 0:
        where = f" from source {spec.synthetic_source!r}" if spec.synthetic_source else ""
        raise NoSyntheticImages(f"regime {spec.name!r} needs synthetic images but none{where} are usable")
    if not items:
        raise RegimeError(f"regime {spec.name!r} produced an empty training set")
    return mixture
