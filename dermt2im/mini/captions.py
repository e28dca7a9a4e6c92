"""Captions that say what a phantom shows (``PhantomTraits``), never its class.

They use the words of the generation plan's smart transformations (``GenerateConfig.transformations``:
tiny / large / several moles, Fitzpatrick skin types I-VI) and the colours, size and hair a
dermatologist would note, so that the miniature Stable Diffusion's text pathway learns to listen
to those words, and a class word DreamBooth adds later (``sks benign``) has somewhere to bind.
"""

from __future__ import annotations

import numpy as np

from dermt2im.phantoms import PhantomTraits

PREFIX = "a dermoscopic image of a skin lesion"

# As in the plan's transformations (dermt2im.core.specs.GenerateConfig), so that a plan's prompt
# uses words the base model has learnt.
SKIN_PHRASES: dict[int, str] = {
    1: "on fair skin, Fitzpatrick type I",
    2: "on light skin, Fitzpatrick type II",
    3: "on medium skin, Fitzpatrick type III",
    4: "on olive skin, Fitzpatrick type IV",
    5: "on brown skin, Fitzpatrick type V",
    6: "on dark brown skin, Fitzpatrick type VI",
}

# Upper bounds of the main lesion's radius (in half image sides) for each size word.
SIZE_WORDS: tuple[tuple[float, str], ...] = ((0.24, "tiny mole"), (0.32, "small mole"), (0.44, "mole"),
                                            (float("inf"), "large mole"))

# Every word a caption, a training prompt or a generation prompt of the presets uses: each is one
# token of the miniature model's tokenizer (``dermt2im.diffusion.models.build_tiny_tokenizer``).
CAPTION_WORDS: tuple[str, ...] = tuple(sorted(set(
    """a an of on the and with in image images photo dermoscopic dermoscopy skin lesion lesions mole moles tiny
    small large several fair light medium olive brown dark fitzpatrick type i ii iii iv v vi hair black red blue
    grey sks benign malignant blurry low quality text watermark ruler deformed melanoma nevus""".split())))


def size_word(radius: float) -> str:
    return next(word for bound, word in SIZE_WORDS if radius < bound)


def _colour_phrase(colours: tuple[str, ...]) -> str:
    return colours[0] if len(colours) == 1 else ", ".join(colours[:-1]) + " and " + colours[-1]


def caption_phrases(traits: PhantomTraits) -> list[str]:
    """The caption's phrases after the prefix, in a fixed order: size (or several moles), colours,
    skin, hair."""
    phrases = ["several moles" if traits.lesions > 1 else size_word(traits.radius), _colour_phrase(traits.colours)]
    if traits.skin_type is not None:
        phrases.append(SKIN_PHRASES[traits.skin_type])
    if traits.hair:
        phrases.append("with hair")
    return phrases


def caption(traits: PhantomTraits) -> str:
    """The full caption: ``a dermoscopic image of a skin lesion, large mole, brown, on light skin, ...``."""
    return ", ".join([PREFIX, *caption_phrases(traits)])


def dropped(traits: PhantomTraits, rng: np.random.Generator, *, caption_dropout: float, phrase_dropout: float) -> str:
    """The caption a training step sees: empty with probability ``caption_dropout`` (what
    classifier-free guidance needs), else the prefix with each phrase kept with probability
    ``1 - phrase_dropout`` (so short prompts, such as a plan's, are in distribution too)."""
    if rng.random() < caption_dropout:
        return ""
    kept = [p for p in caption_phrases(traits) if rng.random() >= phrase_dropout]
    return ", ".join([PREFIX, *kept])
