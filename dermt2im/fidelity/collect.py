"""What the fidelity report is computed on: the sets of images read from the workdir, with their
per-image measures and features (``report.ImageSet``).

* the reference (training seeds), the floor (held-out seeds) and each test set: from the seeds and
  test-set manifests (accepted rows with a processed image);
* each generation run: the accepted rows of the synthetic manifest, grouped by source, base model,
  LoRA and LoRA scale, joined with the gate's fidelity manifest (skin tone, typicality) by sample key;
  a row of an imported set without a transformation gets the configured one its prompt contains;
* the noise ceiling: ``noise_images`` images rendered by the random-weight tiny Stable Diffusion at
  the synthetic images' size, cached as PNGs under ``W/fidelity/noise/``.

Features are cached per image (the sha256 of its file) and per extractor under ``W/fidelity/cache/``
as ``.npz`` read without pickle: a report rebuilt after a new import computes only the new images.
Radiomics are computed for at most ``frd_max_images`` images per set (a seeded random subset).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from dermt2im.core import identity, storage
from dermt2im.core.fileio import atomic_path, atomic_write_bytes, sha256_bytes
from dermt2im.core.imaging import encode_png
from dermt2im.core.manifest import FIDELITY, manifest_exists, read_manifest
from dermt2im.core.views import seeds_view, synthetic_view
from dermt2im.core.specs import FidelityConfig, GenerateConfig
from dermt2im.core.workdir import Workdir
from dermt2im.fidelity import memorisation, radiomics
from dermt2im.fidelity.embeddings import Embedding
from dermt2im.fidelity.measures import BATCH
from dermt2im.fidelity.report import ImageSet
from dermt2im.fidelity.skin_tone import skin_tone
from dermt2im.fidelity.typicality import Calibration

log = logging.getLogger(__name__)
OWN = "dermt2im"
RADIOMICS = "radiomics"
NOISE_STEPS = 4
NOISE_GUIDANCE = 7.0
RUN_COLUMNS = ["source", "base_model", "lora_sha256", "lora_scale"]


def _image(workdir: Workdir, path: str) -> tuple[np.ndarray, str]:
    """RGB pixels and the sha256 of the file's bytes."""
    import io

    from PIL import Image

    data = storage.read_bytes(storage.resolve(path, workdir.root))
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB")), sha256_bytes(data)


class FeatureCache:
    """Rows of one extractor's features by image sha256, in ``<folder>/<extractor key>.npz``."""

    def __init__(self, folder: Path, key: str) -> None:
        self.path = Path(folder) / f"{key[:24]}.npz"
        self.rows: dict[str, np.ndarray] = {}
        self.names: list[str] = []
        if self.path.is_file():
            try:
                with np.load(self.path, allow_pickle=False) as z:
                    self.rows = dict(zip(z["ids"].tolist(), z["features"]))
                    self.names = z["names"].tolist()
            except (OSError, ValueError, KeyError):
                log.warning("feature cache %s is unreadable; computing again", self.path)
        self.dirty = False

    def put(self, sha: str, row: np.ndarray, names: Sequence[str] = ()) -> None:
        self.rows[sha] = np.asarray(row, np.float64)
        if names and not self.names:
            self.names = list(names)
        self.dirty = True

    def save(self) -> None:
        if not self.dirty or not self.rows:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        ids = np.array(list(self.rows), dtype="U64")
        width = max(len(v) for v in self.rows.values())
        feats = np.full((len(ids), width), np.nan)
        for i, v in enumerate(self.rows.values()):
            feats[i, :len(v)] = v
        with atomic_path(self.path) as tmp:
            with open(tmp, "wb") as fh:
                np.savez(fh, ids=ids, features=feats, names=np.array(self.names, dtype="U200"))
        self.dirty = False


@dataclass
class Extractors:
    """Everything computed per image, with its caches."""

    embeddings: list[Embedding]
    caches: dict[str, FeatureCache]
    radiomics_size: int
    radiomics_filters: tuple[str, ...]
    seed_reference: np.ndarray  # the audit's index entries of the training seeds
    calibration: Calibration | None  # typicality, in the first (seed) embedding

    @classmethod
    def create(cls, workdir: Workdir, embeddings: list[Embedding], cfg: FidelityConfig,
               seed_reference: np.ndarray, calibration: Calibration | None) -> "Extractors":
        folder = workdir.fidelity / "cache"
        caches = {e.name: FeatureCache(folder, identity.content_key("embedding-features", e.identity)) for e in embeddings}
        if cfg.frd:
            key = identity.content_key("radiomics", cfg.frd_size, list(cfg.frd_filters),
                                       identity.code_digest(radiomics.__name__))
            caches[RADIOMICS] = FeatureCache(folder, key)
        return cls(embeddings, caches, cfg.frd_size, tuple(cfg.frd_filters), seed_reference, calibration)

    def save(self) -> None:
        for cache in self.caches.values():
            cache.save()


def measure_set(workdir: Workdir, kind: str, name: str, rows: pd.DataFrame, ex: Extractors, *,
                radiomics_for: int, run: str = "", description: str = "",
                known: pd.DataFrame | None = None) -> ImageSet:
    """Load ``rows`` (with ``path``) in batches; features per embedding, radiomics for a seeded subset,
    skin tone and typicality (from ``known`` by sample key where the gate measured them), nearest-seed
    distances."""
    rows = rows.reset_index(drop=True)
    n = len(rows)
    seed = int(hashlib.sha256(f"{kind}/{name}/{run}".encode()).hexdigest()[:8], 16)
    with_radiomics = set(np.random.default_rng(seed).permutation(n)[:radiomics_for].tolist()) if RADIOMICS in ex.caches \
        else set()
    feats: dict[str, list[np.ndarray]] = {e.name: [] for e in ex.embeddings}
    radio: list[np.ndarray | None] = []
    ita, tone, nearest, shas = [], [], [], []
    known_by_key = known.set_index("sample_key") if known is not None and len(known) else None
    for start in range(0, n, BATCH):
        loaded = [_image(workdir, p) for p in rows["path"].iloc[start:start + BATCH]]
        images = [im for im, _ in loaded]
        batch_shas = [sha for _, sha in loaded]
        shas += batch_shas
        for e in ex.embeddings:
            cache = ex.caches[e.name]
            todo = [i for i, s in enumerate(batch_shas) if s not in cache.rows]
            if todo:
                for i, row in zip(todo, e.embed([images[i] for i in todo])):
                    cache.put(batch_shas[i], row)
            feats[e.name] += [cache.rows[s] for s in batch_shas]
        for i, (rgb, sha) in enumerate(zip(images, batch_shas)):
            j = start + i
            if j in with_radiomics:
                cache = ex.caches[RADIOMICS]
                if sha not in cache.rows:
                    names, values = radiomics.image_features(rgb, ex.radiomics_size, ex.radiomics_filters)
                    cache.put(sha, values, names)
                radio.append(cache.rows[sha])
            else:
                radio.append(None)
            key = rows.at[j, "sample_key"] if "sample_key" in rows else None
            k = known_by_key.loc[key] if known_by_key is not None and key in known_by_key.index else None
            if k is not None and k["sha256"] == sha and pd.notna(k["skin_tone"]):
                ita.append(float(k["ita"]) if pd.notna(k["ita"]) else np.nan)
                tone.append(str(k["skin_tone"]))
            else:
                t = skin_tone(rgb)
                ita.append(t.ita)
                tone.append(t.category)
        nearest += memorisation.nearest_seed_distances(ex.seed_reference, images).tolist()
    out_rows = rows.assign(sha256_measured=shas, ita=ita, skin_tone=tone, nearest_seed=nearest)
    features = {name: np.asarray(v, np.float64).reshape(n, -1) if n else np.zeros((0, 1)) for name, v in feats.items()}
    if RADIOMICS in ex.caches:
        width = max((len(r) for r in radio if r is not None), default=0)
        features[RADIOMICS] = np.array([r if r is not None else np.full(width, np.nan) for r in radio]).reshape(n, width)
    if ex.calibration is not None and ex.embeddings:
        d = ex.calibration.distances(features[ex.embeddings[0].name])
        out_rows = out_rows.assign(typicality=ex.calibration.typicality(d), atypical=ex.calibration.atypical(d))
    return ImageSet(kind, name, out_rows, features, run, description)


# --- the sets ------------------------------------------------------------------------------------


def test_set_rows(workdir: Workdir) -> dict[str, pd.DataFrame]:
    """Each ingested test set's accepted rows with a processed image."""
    out = {}
    for path in storage.files_in(workdir.test_sets_folder, ".parquet"):
        df = seeds_view(path)
        df = df[(df["status"] == "accepted") & df["processed_path"].notna()].drop_duplicates("sample_id")
        if len(df):
            out[Path(str(path)).stem] = df.assign(path=df["processed_path"], sample_key=df["sample_id"])
    return out


@dataclass(frozen=True)
class Run:
    """One generation run: the accepted images of one source, base model, LoRA and LoRA scale."""

    id: str
    source: str
    rows: pd.DataFrame

    @property
    def params(self) -> dict[str, str]:
        first = self.rows.iloc[0]
        out = {"source": self.source, "images": str(len(self.rows)),
               "classes": ", ".join(f"{k} {v}" for k, v in self.rows["label"].value_counts().sort_index().items())}
        for c in ("base_model", "lora_sha256", "lora_scale", "generator", "model_hash"):
            if c in self.rows and pd.notna(first.get(c)):
                out[c] = str(first[c])
        for c in ("sampler", "steps", "guidance_scale"):
            if c in self.rows:
                values = sorted({str(v) for v in self.rows[c].dropna()})
                if values:
                    out[c + "s"] = ", ".join(values)
        return out

    def describe(self) -> str:
        p = self.params
        if self.source == OWN:
            lora = f"LoRA {p['lora_sha256'][:12]}, scale {p.get('lora_scale', '?')}" if "lora_sha256" in p else "no LoRA"
            return f"base model {p.get('base_model', '?')}, {lora}"
        made = ", ".join(v for v in (p.get("generator"), p.get("base_model"), p.get("model_hash")) if v)
        return f"imported set{' (' + made + ')' if made else ''}"


def _transformation(prompt: object, transformations: Sequence[str]) -> str | None:
    if not isinstance(prompt, str):
        return None
    found = [t for t in transformations if t.strip(" ,") and t.strip(" ,").lower() in prompt.lower()]
    return max(found, key=len) if found else None


def generation_runs(workdir: Workdir, generate: GenerateConfig) -> list[Run]:
    """The accepted synthetic images, one ``Run`` per (source, base model, LoRA, LoRA scale)."""
    df = synthetic_view(workdir)
    df = df[df["status"] == "accepted"].copy()
    if df.empty:
        return []
    df["source"] = df["source"].fillna(OWN)
    missing = df["transformation"].isna()
    df.loc[missing, "transformation"] = [_transformation(p, generate.transformations) for p in df.loc[missing, "prompt"]]
    runs = []
    keyed = df.assign(**{c: df[c].astype(str) for c in RUN_COLUMNS})
    for source, per_source in keyed.groupby("source", sort=True):
        groups = list(per_source.groupby(RUN_COLUMNS[1:], sort=True, dropna=False))
        for values, g in groups:
            digest = hashlib.sha256("|".join(map(str, values)).encode()).hexdigest()[:8]
            run_id = str(source) if len(groups) == 1 else f"{source}#{digest}"
            runs.append(Run(run_id, str(source), df.loc[g.index].reset_index(drop=True)))
    return runs


def gate_measures(workdir: Workdir) -> pd.DataFrame | None:
    return read_manifest(workdir.fidelity_manifest, FIDELITY) if manifest_exists(workdir.fidelity_manifest) else None


def noise_images(workdir: Workdir, n: int, size: tuple[int, int], prompt: str, token: str) -> pd.DataFrame:
    """``n`` images of the random-weight tiny SD (labels alternating), rendered once and kept under
    W/fidelity/noise/<key>/; rows with label, prompt and path."""
    from dermt2im.core.specs import LABELS
    from dermt2im.diffusion.models import tiny_identity

    width, height = size
    prompts = [prompt.format(token=token, label=LABELS[i % 2], transformation="") for i in range(n)]
    key = identity.content_key("noise-ceiling", n, width, height, prompts, NOISE_STEPS, NOISE_GUIDANCE, tiny_identity(0),
                               identity.code_digest(__name__))
    folder = workdir.fidelity / "noise" / key[:16]
    paths = [folder / f"noise-{i:04d}.png" for i in range(n)]
    if not all(p.is_file() for p in paths):
        import torch

        from dermt2im.diffusion.models import build_tiny_pipeline

        log.info("rendering %d noise-ceiling images with the random-weight tiny model", n)
        pipe = build_tiny_pipeline(0)
        for start in range(0, n, 8):
            batch = prompts[start:start + 8]
            gens = [torch.Generator("cpu").manual_seed(start + i) for i in range(len(batch))]
            out = pipe(batch, num_inference_steps=NOISE_STEPS, guidance_scale=NOISE_GUIDANCE, height=height,
                       width=width, generator=gens, output_type="np").images
            for i, im in enumerate(np.asarray(out)):
                atomic_write_bytes(paths[start + i], encode_png((im * 255.0).round().clip(0, 255).astype(np.uint8)))
    return pd.DataFrame({"sample_key": [p.stem for p in paths], "label": [LABELS[i % 2] for i in range(n)],
                         "prompt": prompts, "path": [str(p) for p in paths]})


def synthetic_size(runs: Sequence[Run], fallback: int) -> tuple[int, int]:
    sizes = [(int(w), int(h)) for r in runs for w, h in zip(r.rows["width"], r.rows["height"]) if pd.notna(w) and pd.notna(h)]
    if not sizes:
        return fallback, fallback
    w, h = max(set(sizes), key=sizes.count)
    return w - w % 8 or 8, h - h % 8 or 8
