"""The classifiers: ViT and MobileNetV2 from transformers, pretrained (hub id or local folder,
safetensors only, a fresh 2-class head) or, with ``validate.tiny``, built from a small config with a
fixed seed, fully offline."""

from __future__ import annotations

from pathlib import Path

from dermt2im.core.errors import DermT2imError
from dermt2im.core.specs import LABELS, ValidateConfig

LABEL2ID = {lab: i for i, lab in enumerate(LABELS)}  # benign 0, malignant 1
ID2LABEL = {i: lab for lab, i in LABEL2ID.items()}
MODEL_KINDS = ("vit", "mobilenet_v2")


class ModelUnavailable(DermT2imError, RuntimeError):
    """A pretrained model could not be loaded (offline, wrong id, no safetensors weights)."""


def _processor_class(name: str):
    """The Pillow-backed processor when torchvision is absent (transformers 5), else the default."""
    import transformers

    try:
        import torchvision  # noqa: F401

        return getattr(transformers, name)
    except ImportError:
        return getattr(transformers, f"{name}Pil", None) or getattr(transformers, name)


def tiny_model(kind: str, image_size: int, seed: int):
    """A small randomly initialised classifier and its processor, built offline with a fixed seed."""
    from transformers import (
        MobileNetV2Config,
        MobileNetV2ForImageClassification,
        ViTConfig,
        ViTForImageClassification,
    )

    import torch

    torch.manual_seed(seed)
    if kind == "vit":
        patch = 8 if image_size % 8 == 0 else max(1, image_size // 4)
        config = ViTConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            image_size=image_size,
            patch_size=patch,
            num_labels=2,
            id2label=ID2LABEL,
            label2id=LABEL2ID,
        )
        model = ViTForImageClassification(config)
        processor = _processor_class("ViTImageProcessor")(size={"height": image_size, "width": image_size})
    elif kind == "mobilenet_v2":
        config = MobileNetV2Config(
            image_size=image_size,
            depth_multiplier=0.35,
            classifier_dropout_prob=0.1,
            num_labels=2,
            id2label=ID2LABEL,
            label2id=LABEL2ID,
        )
        model = MobileNetV2ForImageClassification(config)
        processor = _processor_class("MobileNetV2ImageProcessor")(
            size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
        )
    else:
        raise ValueError(f"unknown model kind {kind!r}; expected one of {MODEL_KINDS}")
    return model, processor


def pretrained_model(kind: str, name: str, seed: int):
    """A pretrained backbone with a new 2-class head (initialised under ``seed``) and its processor."""
    from transformers import (
        AutoImageProcessor,
        MobileNetV2ForImageClassification,
        ViTForImageClassification,
    )

    cls = {"vit": ViTForImageClassification, "mobilenet_v2": MobileNetV2ForImageClassification}.get(kind)
    if cls is None:
        raise ValueError(f"unknown model kind {kind!r}; expected one of {MODEL_KINDS}")
    import torch

    torch.manual_seed(seed)
    try:
        model = cls.from_pretrained(
            name,
            num_labels=2,
            id2label=ID2LABEL,
            label2id=LABEL2ID,
            ignore_mismatched_sizes=True,
            use_safetensors=True,
        )
        processor = AutoImageProcessor.from_pretrained(name)
    except (OSError, ValueError, EnvironmentError) as err:
        raise ModelUnavailable(_not_loadable(kind, name, err)) from err
    return model, processor


def _not_loadable(kind: str, name: str, err: BaseException) -> str:
    """One line: which model, where it was looked for, what to download."""
    from huggingface_hub import constants

    key = "validate.vit_model" if kind == "vit" else "validate.mobilenet_model"
    first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
    local = Path(name).expanduser()
    if local.is_dir():
        return (f"{kind} model folder {name} cannot be loaded: {first} (it needs config.json, safetensors weights and "
                f"preprocessor_config.json, as `huggingface-cli download <id> --local-dir {name}` writes them)")
    if name.startswith(("/", "./", "../", "~")) or name.count("/") > 1:
        return (f"{kind} model folder {name} not found: set {key} to a folder that holds the model (`huggingface-cli "
                f"download <id> --local-dir DIR`) or to a hub id")
    offline = " with HF_HUB_OFFLINE=1" if constants.HF_HUB_OFFLINE else ""
    return (f"{kind} model {name!r} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}){offline}: download it "
            f"once with `huggingface-cli download {name}`, or set {key} to a local folder ({first})")


def model_name(kind: str, cfg: ValidateConfig) -> str:
    if cfg.tiny:
        return f"tiny-{kind}"
    return cfg.vit_model if kind == "vit" else cfg.mobilenet_model


def build_classifier(kind: str, cfg: ValidateConfig, seed: int):
    if cfg.tiny:
        return tiny_model(kind, cfg.image_size, seed)
    return pretrained_model(kind, model_name(kind, cfg), seed)


def save_model(model, processor, out_dir: Path) -> Path:
    """``save_pretrained`` (safetensors) of the model and its processor: reloadable with transformers."""
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir, safe_serialization=True)
    processor.save_pretrained(out_dir)
    return out_dir
