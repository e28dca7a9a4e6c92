"""The memorisation audit (Carlini et al. 2023, "Extracting training data from diffusion models"):
is a generated image a near-copy of a seed, and of which one?

A near-copy survives a crop of up to 10 %, a resize, a flip or quarter turn, colour jitter and JPEG
re-compression; a global descriptor alone cannot tell such a copy (0.14-0.5 from its seed) from a
different lesion (0.21 up). So, two steps, which keep thousands against thousands to minutes:

1. Retrieval (``SeedIndex``, ``top_k``). The global descriptor (low-frequency DCT of a normalised
   32 x 32 colour thumbnail) of every seed is indexed under the eight flips / quarter turns and six
   crops (the whole image, and 5 % in at the centre and each corner: a copy cropped 0-10 % is never
   more than 5 % off one), 48 unit vectors per seed. Each image keeps the ``TOP_K`` seeds with the
   nearest entry (a matrix product and a minimum over each seed's entries).
2. Verification (``inliers``). SIFT keypoints of the image are matched to each candidate's (Lowe's
   ratio test), as they are and with the descriptors mirrored (``MIRROR``), and a RANSAC homography
   counts the matches that agree. Only a plausible copy geometry counts (``plausible_copy``): a
   near-similarity (scale 1/3 to 3, no shear, no perspective, reflections allowed) whose inliers
   spread over an area, since hairs, rulers and frame edges line up along lines. A copy has
   hundreds of inliers; different real lesions at most 8 (all 16,770 ordered pairs of the 130 real
   ISIC images); ``quality.memorisation_min_inliers`` (15) decides.

When geometry cannot decide, the global check does (distance below ``quality.memorisation_threshold``):
an image or nearest seed too plain for keypoints (fewer than ``MIN_KEYPOINTS``), or one under
``MIN_SIDE`` px without twice the inliers (upscaled 32-128 px images have keypoints on interpolation
and JPEG artefacts that a copy does not reproduce, and simple shapes line up by chance). Such small
images are scaled up at most ``MAX_UPSCALE`` times for their keypoints, and keep fewer: of 132
near-copies of the real seeds at 64 px 86 were flagged (90 upscaled to 384 px, at 3.4x the time),
at 128 px 129 (131, at 1.5x); no different real image was flagged at either size. All accepted seeds
(every split) count: a near-copy of a validation or test image would leak it into training as well.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import cv2
import numpy as np

THUMB = 32
DCT_BLOCK = 8
CROP_MARGIN = 0.05
VARIANTS = 6 * 8  # crops x flips / quarter turns per seed in the index
WORK_SIDE = 384  # short side at which keypoints are found (at 256 copies keep too few; 512 costs 1.5x)
# A small image is scaled up no more than this for its keypoints: interpolation adds no detail (SIFT
# doubles its input once more itself), only cost (SIFT on a 64 px render: 26 ms at 384 px, 6 ms at
# 128 px with fewer keypoints).
MAX_UPSCALE = 2
N_FEATURES = 500
CONTRAST_THRESHOLD = 0.01  # OpenCV's 0.04 leaves a tenth of the (low-contrast) seeds under 20 keypoints
RATIO = 0.75  # at 0.8 a quarter of unrelated pairs reach 20 matches; copies keep ~all of theirs
RANSAC_PX = 3.0  # reprojection tolerance at WORK_SIDE
MIN_KEYPOINTS = 40
MIN_SIDE = 256
# Below MIN_SIDE keypoints sit on upscaling artefacts, and simple drawn lesions of one shape reach
# 15-16 consistent matches: geometry alone needs twice the inliers there, else the global check decides.
SMALL_IMAGE_FACTOR = 2
TOP_K = 5  # the true seed was the nearest for every planted real-seed copy; 5 is margin


@dataclass(frozen=True)
class LocalFeatures:
    points: np.ndarray  # (n, 2) float32, x and y at WORK_SIDE
    descriptors: np.ndarray  # (n, 128) uint8 (SIFT values are integers in 0..255)
    side: int  # the image's own short side

    @property
    def matchable(self) -> bool:
        return len(self.points) >= MIN_KEYPOINTS


@dataclass(frozen=True)
class SeedIndex:
    ids: list[str]
    refs: np.ndarray  # (len(ids) * VARIANTS, D) float32, unit rows, each seed's variants contiguous
    features: list[LocalFeatures]
    thumbs: list[np.ndarray]  # 96 px, for the audit's picture sheets

    @property
    def size(self) -> int:
        return len(self.ids)


@dataclass(frozen=True)
class AuditResult:
    seed: int  # the seed it copies when memorised, else the nearest by the global descriptor; -1: no seeds
    distance: float  # global descriptor distance to that seed
    inliers: int  # geometrically consistent matches with that seed
    memorised: bool
    method: str  # "geometric", or "global" when keypoints could not decide


# --------------------------------------------------------------------------- global descriptor


def _thumbnail(rgb: np.ndarray) -> np.ndarray:
    return cv2.resize(np.ascontiguousarray(rgb[..., :3]), (THUMB, THUMB), interpolation=cv2.INTER_AREA)


def _thumb_descriptor(thumb: np.ndarray) -> np.ndarray:
    x = thumb.astype(np.float32) / 255.0
    x -= x.mean(axis=(0, 1), keepdims=True)
    x /= x.std() + 1e-3
    v = np.concatenate([cv2.dct(np.ascontiguousarray(x[..., c]))[:DCT_BLOCK, :DCT_BLOCK].ravel() for c in range(3)])
    return (v / (np.linalg.norm(v) + 1e-8)).astype(np.float32)


def embed(rgb: np.ndarray) -> np.ndarray:
    """Unit-length global descriptor: low-frequency DCT of a normalised 32 x 32 colour thumbnail."""
    return _thumb_descriptor(_thumbnail(rgb))


def dihedral(rgb: np.ndarray) -> list[np.ndarray]:
    """The image under the eight flips / quarter turns."""
    out = []
    for k in range(4):
        r = np.rot90(rgb, k)
        out += [r, r[:, ::-1]]
    return [np.ascontiguousarray(v) for v in out]


def crops(rgb: np.ndarray, margin: float = CROP_MARGIN) -> list[np.ndarray]:
    """The whole image, and windows ``margin`` smaller per side at the centre and each corner."""
    h, w = rgb.shape[:2]
    ch, cw = round(h * (1 - margin)), round(w * (1 - margin))
    corners = [((h - ch) // 2, (w - cw) // 2), (0, 0), (0, w - cw), (h - ch, 0), (h - ch, w - cw)]
    return [rgb] + [rgb[t : t + ch, s : s + cw] for t, s in corners]


def seed_descriptors(rgb: np.ndarray) -> np.ndarray:
    """(VARIANTS, D): the global descriptor of every crop of every flip / quarter turn of a seed
    (a square thumbnail commutes with flips and turns, so the thumbnail is turned, not the image)."""
    return np.stack([_thumb_descriptor(v) for c in crops(rgb) for v in dihedral(_thumbnail(c))])


def top_k(refs: np.ndarray, queries: np.ndarray, k: int = TOP_K) -> tuple[np.ndarray, np.ndarray]:
    """(seed indices, distances), both (n, k), nearest first: a seed's distance is its nearest entry's."""
    d2 = np.clip(2.0 - 2.0 * queries @ refs.T, 0.0, None)
    per_seed = d2.reshape(len(queries), -1, VARIANTS).min(axis=2)
    k = min(k, per_seed.shape[1])
    idx = np.argpartition(per_seed, k - 1, axis=1)[:, :k]
    order = np.take_along_axis(per_seed, idx, axis=1).argsort(axis=1)
    idx = np.take_along_axis(idx, order, axis=1)
    return idx, np.sqrt(np.take_along_axis(per_seed, idx, axis=1))


# --------------------------------------------------------------------------- local features


def _mirror_permutation() -> np.ndarray:
    # A SIFT descriptor is 4 x 4 cells (row across, column along the keypoint's orientation) x 8
    # orientation bins. Mirroring the image mirrors the keypoint frame across its own axis: rows
    # reverse and every angle changes sign (tests check it against SIFT on the mirrored image).
    r, c, o = np.meshgrid(np.arange(4), np.arange(4), np.arange(8), indexing="ij")
    return (((3 - r) * 4 + c) * 8 + (8 - o) % 8).ravel()


MIRROR = _mirror_permutation()


def _to_work(rgb: np.ndarray) -> tuple[np.ndarray, float]:
    """Grey pixels with the short side at ``WORK_SIDE``, or at ``MAX_UPSCALE`` times the image's own
    where that is less, and the factor that takes their coordinates to ``WORK_SIDE``."""
    g = cv2.cvtColor(np.ascontiguousarray(rgb[..., :3]), cv2.COLOR_RGB2GRAY)
    h, w = g.shape
    side = min(WORK_SIDE, MAX_UPSCALE * min(h, w))
    s = side / min(h, w)
    if s != 1:
        size = (max(1, round(w * s)), max(1, round(h * s)))
        g = cv2.resize(g, size, interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_CUBIC)
    return g, WORK_SIDE / min(g.shape)


def local_features(rgb: np.ndarray) -> LocalFeatures:
    """SIFT keypoints (at most ``N_FEATURES``, fewer on a small image), their coordinates at a short side of
    ``WORK_SIDE``."""
    grey, to_work = _to_work(rgb)
    # fewer on a smaller work image, in proportion to its side: the keypoints a real 64 px image
    # has are fewer anyway, a noisy one's are on its noise
    sift = cv2.SIFT_create(nfeatures=max(1, round(N_FEATURES / to_work)), contrastThreshold=CONTRAST_THRESHOLD)
    keypoints, desc = sift.detectAndCompute(grey, None)
    points = np.array([kp.pt for kp in keypoints], np.float32).reshape(-1, 2) * np.float32(to_work)
    desc = np.zeros((0, 128), np.uint8) if desc is None else np.clip(desc + 0.5, 0, 255).astype(np.uint8)
    return LocalFeatures(points, desc, int(min(rgb.shape[:2])))


def ratio_matches(a: np.ndarray, b: np.ndarray, ratio: float = RATIO) -> tuple[np.ndarray, np.ndarray]:
    """Indices (into a, into b) of the pairs whose nearest neighbour beats the second by ``ratio``."""
    if len(a) < 2 or len(b) < 2:
        return np.zeros(0, int), np.zeros(0, int)
    fa, fb = a.astype(np.float32), b.astype(np.float32)
    d2 = (fa * fa).sum(1)[:, None] + (fb * fb).sum(1)[None, :] - 2.0 * fa @ fb.T
    two = np.partition(d2, 1, axis=1)[:, :2]
    best = d2.argmin(axis=1)
    keep = np.sqrt(np.clip(two[:, 0], 0, None)) < ratio * np.sqrt(np.clip(two[:, 1], 0, None))
    return np.flatnonzero(keep), best[keep]


def plausible_copy(h: np.ndarray, inlier_points: np.ndarray) -> bool:
    """A crop / resize / flip / quarter turn: near-similarity, no perspective, inliers spread out."""
    a = h[:2, :2] / h[2, 2]
    s_max, s_min = np.linalg.svd(a, compute_uv=False)
    perspective = float(np.abs(h[2, :2] / h[2, 2]).max()) * WORK_SIDE
    if not (1 / 3 < s_min and s_max < 3 and s_min / s_max > 0.6 and perspective < 0.2):
        return False
    spread = np.sqrt(max(float(np.linalg.eigvalsh(np.cov(inlier_points.T))[0]), 0.0))  # the narrower one
    return spread > 0.05 * WORK_SIDE


def inliers(query: LocalFeatures, seed: LocalFeatures, min_matches: int = 15) -> int:
    """Matches consistent with one plausible copy geometry, the better of as-is and mirrored. Under
    ``min_matches`` ratio-test matches RANSAC is skipped (it could not verify; it is what costs time
    on unrelated pairs)."""
    best = 0
    # both orientations always: a mirrored copy can pass unmirrored too, with a tenth of the inliers
    for desc in (query.descriptors, query.descriptors[:, MIRROR]):
        qi, si = ratio_matches(desc, seed.descriptors)
        if len(qi) < max(4, min_matches, best + 1):
            continue
        p, q = query.points[qi], seed.points[si]
        h, mask = cv2.findHomography(p, q, cv2.RANSAC, RANSAC_PX, maxIters=2000, confidence=0.995)
        if h is None or abs(h[2, 2]) < 1e-12:
            continue
        inl = mask.ravel().astype(bool)
        if inl.sum() > max(best, 2) and plausible_copy(h, p[inl]):
            best = int(inl.sum())
    return best


# --------------------------------------------------------------------------- the audit


def build_index(seeds: Iterable[tuple[str, np.ndarray]]) -> SeedIndex:
    """Global entries, keypoints and a picture thumbnail of every seed (id, RGB)."""
    ids, refs, features, thumbs = [], [], [], []
    for sid, rgb in seeds:
        ids.append(sid)
        refs.append(seed_descriptors(rgb))
        features.append(local_features(rgb))
        thumbs.append(cv2.resize(np.ascontiguousarray(rgb[..., :3]), (96, 96), interpolation=cv2.INTER_AREA))
    dim = 3 * DCT_BLOCK**2
    return SeedIndex(ids, np.concatenate(refs) if refs else np.zeros((0, dim), np.float32), features, thumbs)


def merge_indexes(parts: Sequence[SeedIndex]) -> SeedIndex:
    """One index from several (built in parallel), in order."""
    dim = 3 * DCT_BLOCK**2
    refs = [p.refs for p in parts if len(p.refs)]
    return SeedIndex([i for p in parts for i in p.ids], np.concatenate(refs) if refs else np.zeros((0, dim), np.float32),
                     [f for p in parts for f in p.features], [t for p in parts for t in p.thumbs])


def audit_image(rgb: np.ndarray, index: SeedIndex, *, min_inliers: int = 15, global_threshold: float = 0.1,
                k: int = TOP_K) -> AuditResult:
    """Is ``rgb`` a near-copy of a seed in ``index``? (See the module docstring.)"""
    if index.size == 0:
        return AuditResult(-1, float("inf"), 0, False, "global")
    cands, dists = top_k(index.refs, embed(rgb)[None], k)
    cands, dists = cands[0], dists[0]
    feats = local_features(rgb)
    best, pos = 0, 0
    if feats.matchable:
        for p, seed in enumerate(cands):
            if index.features[seed].matchable:
                n = inliers(feats, index.features[seed], min_inliers)
                if n > best:
                    best, pos = n, p
    nearest = index.features[cands[0]]
    small = min(feats.side, nearest.side, index.features[cands[pos]].side) < MIN_SIDE
    if best >= min_inliers * (SMALL_IMAGE_FACTOR if small else 1):
        return AuditResult(int(cands[pos]), float(dists[pos]), best, True, "geometric")
    if small or not (feats.matchable and nearest.matchable):
        return AuditResult(int(cands[0]), float(dists[0]), best, bool(dists[0] < global_threshold), "global")
    return AuditResult(int(cands[pos]), float(dists[pos]), best, False, "geometric")
