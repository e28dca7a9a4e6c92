"""The tiny preset relaxes two quality checks for its noise-drawing random-weight model; gate tests need all of them."""

from dermt2im.core.config import FactoryConfig, load_config

# empty: calibrated on the workdir's seeds, or the fixed fallback when there are too few
FULL_GATE = ["quality.max_high_frequency_ratio=null", "quality.min_lesion_contrast=null"]


def tiny_with_full_gate(overrides: list[str] | None = None) -> FactoryConfig:
    return load_config("tiny", FULL_GATE + list(overrides or []))
