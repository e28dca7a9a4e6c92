"""Per-image fidelity measures, recorded when the quality gate assesses a set: each image's typicality
(``typicality``, in the learned seed embedding, calibrated on held-out real images) and the skin tone
around its lesion (``skin_tone``). They go to W's ``fidelity`` manifest, keyed by the sample key (one
writer: the gate), where the fidelity report and the export join them; an image beyond the typicality
cut gets the gate's ``atypical`` flag.

The real images come from the seeds manifest: the accepted, processed seeds of the *train* split fit
the embedding (``embeddings.seed_embedding``, cached by their key), those of the *val* and *test*
splits calibrate the cut. Without training seeds there is no embedding, and without held-out seeds
no cut: typicality is then left empty, with the reason in the summary.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from dermt2im.core import storage
from dermt2im.core.workdir import Workdir
from dermt2im.fidelity.embeddings import Embedding, seed_embedding
from dermt2im.fidelity.skin_tone import skin_tone
from dermt2im.fidelity.typicality import MIN_HELD_OUT, Calibration, calibrate

log = logging.getLogger(__name__)
BATCH = 64
HELD_OUT = ("val", "test")


def seed_rows(workdir: Workdir) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(training seeds, held-out seeds): accepted rows with a processed image, by split."""
    from dermt2im.quality.seeds import accepted_seeds

    df = accepted_seeds(workdir)
    return (df[df["split"] == "train"].reset_index(drop=True),
            df[df["split"].isin(HELD_OUT)].reset_index(drop=True))


def load_image(workdir: Workdir, path: str):
    from dermt2im.quality.images import load_rgb

    return load_rgb(storage.resolve(path, workdir.root))


def _embedding_rows(train: pd.DataFrame) -> list[tuple[str, str, str]]:
    return list(zip(train["sample_id"], train["preprocess_key"], train["label"]))


def embedding_kept(workdir: Workdir, train: pd.DataFrame) -> bool:
    """Whether the seed embedding of these training seeds is fitted and kept already."""
    from dermt2im.fidelity.embeddings import seed_embedding_folder

    return (seed_embedding_folder(workdir.fidelity / "embeddings", _embedding_rows(train)) / "model.safetensors").is_file()


def learned_embedding(workdir: Workdir, train: pd.DataFrame) -> Embedding:
    """The seed embedding of these training seeds (fitted once, then read from W/fidelity/embeddings)."""
    paths = dict(zip(train["sample_id"], train["processed_path"]))
    return seed_embedding(workdir.fidelity / "embeddings", _embedding_rows(train),
                          lambda sid: load_image(workdir, paths[sid]))


def batches(workdir: Workdir, paths: list[str]) -> Iterator[list[np.ndarray]]:
    for i in range(0, len(paths), BATCH):
        yield [load_image(workdir, p) for p in paths[i:i + BATCH]]


def embed_paths(workdir: Workdir, embedding: Embedding, paths: list[str]) -> np.ndarray:
    parts = [embedding.embed(images) for images in batches(workdir, paths)]
    return np.concatenate(parts) if parts else np.zeros((0, embedding.dimensions), np.float32)


@dataclass(frozen=True)
class TypicalityCut:
    """The calibrated typicality check: what reports say about it."""

    embedding: str
    calibration: Calibration | None
    held_out: int
    why_not: str = ""  # why there is no cut
    quantile: float | None = None  # the quality.max_typicality_quantile it was made for

    def __post_init__(self) -> None:
        if self.quantile is None and self.calibration is not None:
            object.__setattr__(self, "quantile", self.calibration.quantile)

    def summary(self) -> dict:
        cal = self.calibration
        if cal is None:
            return {"embedding": self.embedding, "held_out": self.held_out, "cut": None, "why_not": self.why_not}
        return {"embedding": self.embedding, "held_out": self.held_out, "cut": cal.cut, "quantile": cal.quantile,
                "k": cal.k, "held_out_rejected": cal.held_out_rejections()}


def typicality_cut(workdir: Workdir, quantile: float) -> tuple[Embedding | None, TypicalityCut]:
    train, held = seed_rows(workdir)
    if len(train) < 2:
        return None, TypicalityCut("", None, len(held), f"{len(train)} training seeds: no embedding to learn",
                                   quantile)
    embedding = learned_embedding(workdir, train)
    if len(held) < MIN_HELD_OUT:
        return embedding, TypicalityCut(embedding.label, None, len(held),
                                        f"{len(held)} held-out real images (val + test): too few to calibrate "
                                        f"(at least {MIN_HELD_OUT})", quantile)
    reference = embed_paths(workdir, embedding, train["processed_path"].tolist())
    held_emb = embed_paths(workdir, embedding, held["processed_path"].tolist())
    return embedding, TypicalityCut(embedding.label, calibrate(reference, held_emb, quantile=quantile), len(held))


def prepared_cut(workdir: Workdir, quantile: float,
                 prepared: TypicalityCut | None) -> tuple[Embedding | None, TypicalityCut]:
    """The typicality cut ``prepared`` elsewhere (the gate's measuring processes calibrate it while
    rendering goes on) with its embedding read back, or calibrated here when there is none."""
    if prepared is None or prepared.quantile != quantile:
        return typicality_cut(workdir, quantile)
    train, _ = seed_rows(workdir)
    if len(train) < 2 or not prepared.embedding or not embedding_kept(workdir, train):
        return typicality_cut(workdir, quantile)
    return learned_embedding(workdir, train), prepared


def image_measures(workdir: Workdir, rows: pd.DataFrame, quantile: float,
                   measured: Sequence[dict] | None = None,
                   prepared: TypicalityCut | None = None) -> tuple[pd.DataFrame, TypicalityCut]:
    """The fidelity manifest's rows for ``rows`` (sample_key, sha256, source, label, path) and the cut.
    ``measured``, one per row, may hold what the gate measured already (``skin_tone``, a ``SkinTone``,
    and ``seed_input``, what the seed embedding sees: ``embeddings.seed_input``); the images are then
    not read again. ``prepared``: the cut calibrated already for these seeds (``prepared_cut``)."""
    embedding, cut = prepared_cut(workdir, quantile, prepared)
    paths = rows["path"].tolist()
    ita, tone, fraction, distance = [], [], [], []
    for start in range(0, len(paths), BATCH):
        known = list(measured[start:start + BATCH]) if measured is not None else []
        if known and all("skin_tone" in m and "seed_input" in m for m in known):
            tones, inputs = [m["skin_tone"] for m in known], [m["seed_input"] for m in known]
        else:
            inputs = [load_image(workdir, p) for p in paths[start:start + BATCH]]
            tones = [skin_tone(rgb) for rgb in inputs]
        for t in tones:
            ita.append(t.ita)
            tone.append(t.category)
            fraction.append(t.skin_fraction)
        if cut.calibration is not None:
            distance.extend(cut.calibration.distances(embedding.embed(inputs)).tolist())
    out = pd.DataFrame({"sample_key": rows["sample_key"].tolist(), "sha256": rows["sha256"].tolist(),
                        "source": rows["source"].tolist(), "label": rows["label"].tolist(),
                        "ita": ita, "skin_tone": tone, "skin_fraction": fraction,
                        "embedding": cut.embedding or None})
    if cut.calibration is not None:
        d = np.asarray(distance, float)
        out["typicality_distance"] = d
        out["typicality"] = cut.calibration.typicality(d)
        out["atypical"] = cut.calibration.atypical(d)
    else:
        log.warning("typicality not measured: %s", cut.why_not)
        out["typicality_distance"], out["typicality"], out["atypical"] = np.nan, np.nan, None
    return out, cut
