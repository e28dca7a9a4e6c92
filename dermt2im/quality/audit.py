"""The memorisation audit (Carlini et al. 2023, "Extracting training data from diffusion models"):
is a generated image a near-copy of a seed image?

Every synthetic image gets its nearest seed image under ``embed`` (a 32x32 colour thumbnail,
normalised, low-frequency 8x8 DCT per channel, unit length), minimised over the eight flips /
rotations of the seed, so a resized, flipped or re-compressed copy of a seed stays close. Below
``memorisation_threshold`` the image is ``memorised``. All accepted seeds (every split) count: a
near-copy of a validation or test image would leak it into training as well.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import cv2
import numpy as np

from dermt2im.core import storage
from dermt2im.core.manifest import SEEDS, read_manifest
from dermt2im.core.workdir import Workdir
from dermt2im.quality.images import load_rgb

log = logging.getLogger(__name__)
THUMB = 32
DCT_BLOCK = 8


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
        path = storage.resolve(p, workdir.root)
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


def audit(embeddings: dict[int, np.ndarray], seeds: SeedSet, threshold: float) -> list[dict]:
    """For each synthetic image (row position -> embedding): its nearest seed, the distance and
    whether it is a near-copy (below ``threshold``)."""
    if not seeds.ids or not embeddings:
        return []
    rows = list(embeddings)
    owner, dist = nearest(np.stack([embeddings[i] for i in rows]).astype(np.float32), seeds.refs, seeds.owners)
    return [{"i": i, "seed": int(o), "distance": float(d), "memorised": bool(d < threshold)}
            for i, o, d in zip(rows, owner, dist)]
