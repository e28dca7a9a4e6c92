"""The smoke preset relaxes two quality checks for its noise-drawing tiny model; gate tests need all of them."""

from dermt2im.core.config import FactoryConfig, load_config
from dermt2im.core.specs import QualityConfig

_DEFAULT = QualityConfig()
FULL_GATE = [
    f"quality.max_high_frequency_ratio={_DEFAULT.max_high_frequency_ratio}",
    f"quality.min_lesion_contrast={_DEFAULT.min_lesion_contrast}",
]


def smoke_with_full_gate(overrides: list[str] | None = None) -> FactoryConfig:
    return load_config("smoke", FULL_GATE + list(overrides or []))
