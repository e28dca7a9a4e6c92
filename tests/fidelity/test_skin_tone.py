"""Skin tone: CIELAB against scikit-image's independent conversion, ITA against its formula and
published categories, the lesion masked out, phantoms of each Fitzpatrick type landing in their ITA
categories, and real ISIC images where the literature puts them (very light)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from PIL import Image

from dermt2im.fidelity.skin_tone import (
    BIN_NAMES,
    UNDEFINED,
    ita_bin,
    ita_from_lab,
    requested_skin_type,
    skin_mask,
    skin_tone,
    to_lab,
)
from dermt2im.phantoms import render_phantom


def test_cielab_equals_scikit_image():
    from skimage.color import rgb2lab

    rgb = np.random.default_rng(0).integers(0, 256, (16, 16, 3)).astype(np.uint8)
    assert to_lab(rgb) == pytest.approx(rgb2lab(rgb), abs=0.3)  # OpenCV interpolates sRGB gamma


@pytest.mark.parametrize("lightness,b,ita,category", [
    (65.0, 15.0, 45.0, "light"),  # arctan(15 / 15)
    (50.0, 20.0, 0.0, "brown"),
    (40.0, 10.0, -45.0, "dark"),  # arctan(-10 / 10)
    (50.0 + 20.0 * np.tan(np.radians(60)), 20.0, 60.0, "very light"),
    (50.0 + 20.0 * np.tan(np.radians(30)), 20.0, 30.0, "intermediate"),
    (50.0 + 20.0 * np.tan(np.radians(20)), 20.0, 20.0, "tan"),
])
def test_ita_and_its_categories(lightness, b, ita, category):
    assert ita_from_lab(lightness, b) == pytest.approx(ita)
    assert ita_bin(ita_from_lab(lightness, b)) == category


def test_category_bounds_are_chardon_and_del_binos():
    # > 55 very light, > 41 light, > 28 intermediate, > 10 tan, > -30 brown, else dark
    assert [ita_bin(v) for v in (55.01, 55.0, 41.0, 28.0, 10.0, -30.0, -30.01)] == [
        "very light", "light", "intermediate", "tan", "brown", "dark", "dark"]
    assert ita_bin(float("nan")) == UNDEFINED


def test_skin_with_bluish_white_balance_stays_on_its_side():
    assert ita_from_lab(80.0, -2.0) > 90 and ita_bin(ita_from_lab(80.0, -2.0)) == "very light"
    assert ita_from_lab(30.0, -2.0) < -90 and ita_bin(ita_from_lab(30.0, -2.0)) == "dark"


def phantom(label: str, seed: int, skin_type: int | None, style: str = "isic") -> np.ndarray:
    return render_phantom(label, np.random.default_rng([5, seed]), size=128, style=style, skin_type=skin_type)


def test_phantoms_of_each_fitzpatrick_type_fall_in_their_ita_category():
    """Each phantom draws its skin's lightness at random around its type's colour (as real skin of one
    type varies), so a type's images spread over about 15 degrees of ITA: a dozen per type, and both
    their median and their most common category are the type's."""
    expected = dict(zip(range(1, 7), BIN_NAMES))  # type 1 very light ... type 6 dark
    medians = []
    for skin_type in range(1, 7):
        tones = [skin_tone(phantom(("benign", "malignant")[i % 2], i, skin_type)) for i in range(12)]
        values = [t.ita for t in tones]
        medians.append(np.median(values))
        assert ita_bin(medians[-1]) == expected[skin_type], (skin_type, values)
        assert Counter(t.category for t in tones).most_common(1)[0][0] == expected[skin_type], (skin_type, values)
    assert all(a > b + 10 for a, b in zip(medians, medians[1:]))  # darker type, clearly lower ITA


def test_a_phantom_without_a_skin_type_is_unchanged():
    a = render_phantom("benign", np.random.default_rng(3), size=64)
    b = render_phantom("benign", np.random.default_rng(3), size=64, skin_type=None)
    assert np.array_equal(a, b)
    with pytest.raises(ValueError, match="Fitzpatrick"):
        render_phantom("benign", np.random.default_rng(3), size=64, skin_type=7)


def test_the_lesion_is_masked_out():
    rgb = phantom("malignant", 1, 2)
    skin, lesion, _ = skin_mask(rgb)
    assert lesion.sum() > 0.05 * lesion.size and not (skin & lesion).any()
    recoloured = rgb.copy()
    recoloured[lesion] = (20, 60, 200)  # the lesion turned blue: the skin around it is what ITA reads
    before, after = skin_tone(rgb).ita, skin_tone(recoloured).ita
    assert after == pytest.approx(before, abs=1.0)
    whole = lambda im: ita_from_lab(to_lab(im)[..., 0].mean(), to_lab(im)[..., 2].mean())  # noqa: E731
    assert abs(whole(recoloured) - whole(rgb)) > 5.0  # a whole-image ITA would have moved


def test_an_image_of_lesion_alone_has_no_ita():
    rgb = np.full((128, 128, 3), 15, np.uint8)  # nothing but black: no skin to read
    tone = skin_tone(rgb)
    assert np.isnan(tone.ita) and tone.category == UNDEFINED


def test_prompts_name_a_skin_type():
    from dermt2im.core.specs import GenerateConfig

    asked = [requested_skin_type(t) for t in GenerateConfig().transformations]
    assert asked == [None, None, None, None, 1, 2, 3, 4, 5, 6]
    assert requested_skin_type("a lesion on olive skin") == 4 and requested_skin_type("Fitzpatrick skin type 2") == 2


@pytest.mark.realdata
def test_real_isic_images_are_mostly_very_light(real_dermoscopy):
    """The ISIC archive is known to be dominated by very light skin (Kinyanjui et al. 2020)."""
    files = sorted((real_dermoscopy / "images").glob("*.jpg"))[::4]
    tones = [skin_tone(np.asarray(Image.open(f).convert("RGB"))) for f in files]
    counts = Counter(t.category for t in tones)
    assert counts["very light"] > 0.7 * len(tones) and counts[UNDEFINED] == 0, counts
