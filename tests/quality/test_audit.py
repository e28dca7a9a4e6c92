"""The memorisation audit: planted near-copies of real seeds (crop 2-10 %, resize, flip or quarter turn,
colour jitter, JPEG) are flagged with the seed they copy; different real images are not."""

from __future__ import annotations

import zlib

import cv2
import numpy as np
import pytest

from dermt2im.quality.audit import (
    MIN_KEYPOINTS,
    MIN_SIDE,
    MIRROR,
    N_FEATURES,
    WORK_SIDE,
    AuditResult,
    audit_image,
    build_index,
    local_features,
    plausible_copy,
    ratio_matches,
    top_k,
)
from dermt2im.phantoms import render_phantom
from tests.quality.near_copies import crop, dihedral_op, jitter, jpeg, near_copy, resize
from tests.real_images import real_images

MIN_INLIERS = 15


@pytest.fixture(scope="module")
def real_seeds(real_dermoscopy) -> tuple[np.ndarray, ...]:
    return real_images(real_dermoscopy, 512)[1]


@pytest.fixture(scope="module")
def real_index(real_seeds):
    return build_index((str(i), im) for i, im in enumerate(real_seeds))


CHANGES = {
    "crop 2%": lambda im, r: resize(crop(im, 0.02, r), 512),
    "crop 10%": lambda im, r: resize(crop(im, 0.10, r), 512),
    "jitter": lambda im, r: jitter(im, r),
    "jpeg 50": lambda im, r: jpeg(im, 50),
    "flip": lambda im, r: dihedral_op(im, 4),
    "quarter turn": lambda im, r: dihedral_op(im, 1),
    "crop + turn + flip + jitter + jpeg": lambda im, r: near_copy(im, r, k=7),
    "all of it, at 384 px": lambda im, r: near_copy(im, r, side=384),
}


@pytest.mark.realdata
@pytest.mark.parametrize("change", list(CHANGES))
def test_planted_near_copies_of_real_seeds_are_flagged_with_the_right_seed(real_seeds, real_index, change):
    rng = np.random.default_rng(zlib.crc32(change.encode()))
    for i in rng.choice(len(real_seeds), 12, replace=False):
        r = audit_image(CHANGES[change](real_seeds[i], rng), real_index, min_inliers=MIN_INLIERS)
        assert r.memorised and r.seed == i and r.method == "geometric", (change, i, r)
        assert r.inliers >= MIN_INLIERS


@pytest.mark.realdata
def test_no_real_image_is_flagged_against_other_real_images(real_seeds):
    half = len(real_seeds) // 2
    index = build_index((str(i), im) for i, im in enumerate(real_seeds[:half]))
    rng = np.random.default_rng(3)
    others = list(real_seeds[half:]) + [near_copy(im, rng) for im in real_seeds[half::2]]
    results = [audit_image(im, index, min_inliers=MIN_INLIERS) for im in others]
    assert not any(r.memorised for r in results), [r for r in results if r.memorised]
    assert max(r.inliers for r in results) < 10  # measured: at most 8 over all 16,770 ordered pairs


def phantom(seed: int, size: int, label: str = "benign") -> np.ndarray:
    return render_phantom(label, np.random.default_rng(seed), size=size)


def altered_copy(rgb: np.ndarray) -> np.ndarray:
    """As in the project's quality tests: 90 % size, mirrored, JPEG 70."""
    h, w = rgb.shape[:2]
    return jpeg(cv2.resize(rgb, (int(w * 0.9), int(h * 0.9)), interpolation=cv2.INTER_AREA)[:, ::-1], 70)


@pytest.mark.parametrize("size", [64, 128, 512])
def test_phantom_copies_are_flagged_at_any_size_and_others_are_not(size):
    labels = ("benign", "malignant")
    seeds = [phantom(i, size, labels[i % 2]) for i in range(6)]
    index = build_index((str(i), s) for i, s in enumerate(seeds))
    copies = [audit_image(altered_copy(s), index) for s in seeds]
    others = [audit_image(phantom(50 + i, size, labels[i % 2]), index) for i in range(6)]
    assert [(r.memorised, r.seed) for r in copies] == [(True, i) for i in range(6)], copies
    assert not any(r.memorised for r in others), others
    if size >= MIN_SIDE:
        assert all(r.method == "geometric" for r in copies + others)


def test_mirrored_descriptors_match_sift_on_the_mirrored_image():
    rgb = phantom(1, 512, "malignant")
    plain, mirrored = local_features(rgb), local_features(np.ascontiguousarray(rgb[:, ::-1]))
    direct = len(ratio_matches(mirrored.descriptors, plain.descriptors)[0])
    permuted = len(ratio_matches(mirrored.descriptors[:, MIRROR], plain.descriptors)[0])
    assert permuted > 0.8 * len(mirrored.points) and permuted > 5 * max(direct, 1)


def test_only_a_plausible_copy_geometry_counts():
    rng = np.random.default_rng(0)
    spread = rng.uniform(0, WORK_SIDE, (50, 2)).astype(np.float32)
    turn = np.array([[0.0, -0.9, 300], [0.9, 0.0, 10], [0, 0, 1]])  # quarter turn, 90 %: a copy
    assert plausible_copy(turn, spread)
    assert plausible_copy(np.array([[-1.0, 0, 383], [0, 1, 0], [0, 0, 1]]), spread)  # mirrored
    line = np.column_stack([np.linspace(0, 380, 50), np.full(50, 100.0)]).astype(np.float32)
    assert not plausible_copy(turn, line)  # collinear inliers: a hair or a ruler, not a copy
    assert not plausible_copy(np.array([[3.0, 0, 0], [0, 0.2, 0], [0, 0, 1]]), spread)  # squashed
    assert not plausible_copy(np.array([[0.1, 0, 0], [0, 0.1, 0], [0, 0, 1]]), spread)  # shrunk to a spot
    assert not plausible_copy(np.array([[1.0, 0, 0], [0, 1, 0], [0.01, 0, 1]]), spread)  # perspective


def test_top_k_takes_each_seeds_nearest_entry_and_sorts():
    from dermt2im.quality import audit

    refs = np.zeros((2 * audit.VARIANTS, 4), np.float32)  # two seeds; entry 0 of each is set
    refs[0] = [1, 0, 0, 0]
    refs[audit.VARIANTS] = [0, 0, 0.6, 0.8]
    idx, dist = top_k(refs, np.array([[0, 0, 0.6, 0.8], [1, 0, 0, 0]], np.float32), 2)
    assert idx.tolist() == [[1, 0], [0, 1]]
    assert np.all(np.diff(dist, axis=1) >= 0) and dist[1, 0] == pytest.approx(0.0, abs=1e-3)


def test_no_seeds_and_featureless_images_degrade_gracefully():
    flat = np.full((512, 512, 3), 180, np.uint8)
    assert audit_image(flat, build_index([])) == AuditResult(-1, float("inf"), 0, False, "global")
    index = build_index([("s", phantom(0, 256))])
    r = audit_image(flat, index)
    assert not r.memorised and r.method == "global"  # no keypoints on a flat image
    assert audit_image(phantom(0, 256), index).memorised


def test_a_small_image_has_fewer_keypoints_found_below_the_work_side_and_placed_in_its_frame():
    """A 96 px image is scaled up twice (not to ``WORK_SIDE``) for its keypoints, keeps at most half of
    ``N_FEATURES``, and its keypoints lie where those of the same image scaled to ``WORK_SIDE`` lie."""
    rgb = phantom(3, 96, "malignant")
    small = local_features(rgb)
    large = local_features(cv2.resize(rgb, (WORK_SIDE, WORK_SIDE), interpolation=cv2.INTER_CUBIC))
    assert MIN_KEYPOINTS <= len(small.points) <= N_FEATURES / 2 and small.side == 96
    assert 0.8 * WORK_SIDE < small.points.max() <= WORK_SIDE
    nearest = np.linalg.norm(small.points[:, None] - large.points[None], axis=2).min(axis=1)
    assert np.median(nearest) < 2.0, np.median(nearest)
