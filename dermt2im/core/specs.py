"""What each stage makes: the part of the configuration that defines a stage's output.

Every field here changes what a stage writes, so every field is hashed into that stage's keys
(``dermt2im.core.identity``). How a stage runs (devices, batch sizes, worker counts, where files
live) is in ``dermt2im.core.runtime`` and never enters a key: changing it never re-runs anything.

Each model is frozen and strict: an unknown key or a wrong type is an error naming the key.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

Label = Literal["benign", "malignant"]
LABELS: tuple[Label, ...] = ("benign", "malignant")
# The samplers generation can use (``dermt2im.generate.samplers`` builds each); checked here so that a
# misspelt one is refused before a config is saved, not when rendering starts.
SAMPLER_NAMES: tuple[str, ...] = ("euler", "euler_a", "plms", "ddim", "dpmpp_2m")


def _multiple_of_8(name: str, value: int) -> None:
    if value % 8:
        raise ValueError(f"{name} must be a multiple of 8 (the VAE works on 8 x 8 pixel blocks), got {value}")


# What people type for "no" and "yes": a YAML or JSON boolean, or one of these words in any case.
NO_WORDS = ("no", "off", "false", "n", "0")
YES_WORDS = ("yes", "on", "true", "y", "1")


def _precision_word(v: Any) -> Any:
    """``false`` / ``off`` / ``no`` (as typed, or as YAML 1.1 reads them) mean no mixed precision."""
    if v is False or (isinstance(v, str) and v.strip().lower() in NO_WORDS):
        return "no"
    return v.strip().lower() if isinstance(v, str) else v


Precision = Annotated[Literal["no", "fp16", "bf16"], BeforeValidator(_precision_word)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class PhantomConfig(Strict):
    """Procedural seed and test data used when no real SOURCE is given (smoke preset, demos, tests)."""

    n_seed: int = Field(24, ge=2, description="seed images, split evenly between classes")
    n_test: int = Field(24, ge=2, description="images per phantom test set")
    seed: int = 0
    size: int = Field(256, ge=32)
    seed_style: Literal["isic", "ham"] = "isic"
    test_styles: tuple[Literal["isic", "ham"], ...] = ("isic", "ham")
    hair_probability: float = Field(0.3, ge=0, le=1)


class SplitConfig(Strict):
    train: float = Field(0.7, ge=0, le=1)
    val: float = Field(0.15, ge=0, le=1)
    test: float = Field(0.15, ge=0, le=1)
    seed: int = 0

    @model_validator(mode="after")
    def _sums_to_one(self) -> "SplitConfig":
        total = self.train + self.val + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"train + val + test must be 1.0, got {total:g}")
        return self


class IngestConfig(Strict):
    layout: Literal["auto", "isic", "isic-challenge", "ham10000", "folders", "csv"] = "auto"
    diagnosis_labels: dict[str, Label] = Field(
        default_factory=dict, description="extra or overriding diagnosis -> label entries (dermt2im.ingest.layouts)"
    )
    splits: SplitConfig = SplitConfig()
    max_pixels: int = Field(
        89_478_485, ge=1, description="larger images are quarantined as possible decompression bombs"
    )
    min_side: int = Field(64, ge=1, description="images with a shorter side are quarantined (too small to be a lesion)")
    max_aspect_ratio: float = Field(
        4.0, ge=1, description="images longer than this many times their width (or wider) are quarantined"
    )
    extensions: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif")


class PreprocessConfig(Strict):
    size: int = Field(512, ge=16, description="output side length: resize the short side, centre-crop")
    hair_removal: bool = True
    # DullRazor (Lee et al. 1997) with its shape verification (dermt2im.preprocess.hair); sizes at 512 px
    hair_kernel_size: int = Field(17, ge=3, description="black-hat structuring element: wider than any hair")
    hair_threshold: int = Field(10, ge=1, le=255, description="black-hat response of a hair candidate pixel")
    hair_line_threshold: int = Field(15, ge=1, le=255, description="line evidence that starts a hair")
    hair_line_length: int = Field(31, ge=3, description="straight segment a hair contains and network meshes do not")
    hair_min_length: int = Field(60, ge=1, description="long side of a kept hair component")
    hair_min_elongation: float = Field(8.0, gt=0, description="length / mean width of a kept hair component")
    inpaint_radius: int = Field(5, ge=1)
    inpaint_method: Literal["telea", "ns"] = "telea"


class TrainConfig(Strict):
    base_model: str = Field(
        "stable-diffusion-v1-5/stable-diffusion-v1-5",
        description="hub id, local diffusers folder, single .safetensors checkpoint, 'mini' (the miniature SD "
        "pre-trained on phantoms, shipped with the package) or 'tiny' (random weights, for tests)",
    )
    revision: str | None = None
    base_config: str | None = Field(
        None, description="a single-file base_model's configuration: a local folder with the pipeline's config files "
        "(model_index.json, unet/config.json, ..., tokenizer/), so that nothing is fetched; None: the hub's SD v1.5 "
        "configs (fetched, or from the Hugging Face cache). Part of the base model's identity, not of the spec digest")
    instance_token: str = "sks"
    instance_prompt: str = "a dermoscopic image of {token} {label} skin lesion"
    class_prompt: str = "a dermoscopic image of {label} skin lesion"
    lora_per_class: bool = False
    rank: int = Field(4, ge=1)
    alpha: float = Field(4.0, gt=0)
    target_modules: tuple[str, ...] = ("to_k", "to_q", "to_v", "to_out.0")
    train_text_encoder: bool = False
    resolution: int = Field(512, ge=16)
    train_batch_size: int = Field(2, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    epochs: int = Field(120, ge=1)
    max_steps: int | None = Field(None, ge=1, description="overrides epochs when set")
    learning_rate: float = Field(1e-4, gt=0, description="LoRA learning rate (the one Table II actually uses)")
    text_encoder_learning_rate: float = Field(2e-6, gt=0)
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine"] = "constant_with_warmup"
    lr_warmup_steps: int = Field(500, ge=0)
    optimizer: Literal["auto", "adamw", "adamw8bit"] = "auto"
    adam_weight_decay: float = 1e-2
    mixed_precision: Precision = "fp16"
    max_grad_norm: float = Field(1.0, gt=0)
    snr_gamma: float | None = Field(None, gt=0)
    noise_offset: float = Field(0.0, ge=0)
    prior_preservation: bool = False
    prior_loss_weight: float = Field(1.0, ge=0)
    num_class_images: int = Field(100, ge=1)
    class_image_steps: int = Field(25, ge=1, description="sampling steps for prior-preservation class images")
    seed: int = 42
    nan_policy: Literal["stop", "skip"] = "stop"
    validation_images_per_class: int = Field(2, ge=0)
    validation_steps: int = Field(25, ge=1)

    @model_validator(mode="after")
    def _coherent(self) -> "TrainConfig":
        _multiple_of_8("resolution", self.resolution)
        return self


class GenerateConfig(Strict):
    per_class: int = Field(3000, ge=1, description="target number of images per class (not an increment)")
    samplers: tuple[str, ...] = ("euler", "euler_a", "plms")
    steps_min: int = Field(20, ge=1)
    steps_max: int = Field(26, ge=1)
    guidance_scale: float = Field(7.0, ge=0)
    lora_scale: float = Field(0.8, ge=0, description="beta in W = W0 + beta * dW (paper, Eq. 2)")
    width: int = Field(512, ge=16)
    height: int = Field(512, ge=16)
    shard_size: int = Field(100, ge=1)
    seed: int = 1234
    prompt: str = "a dermoscopic image of {token} {label} skin lesion{transformation}"
    negative_prompt: str = "blurry, low quality, text, watermark, ruler, deformed"
    transformations: tuple[str, ...] = (
        "",
        ", tiny mole",
        ", large mole",
        ", several moles",
        ", on fair skin, Fitzpatrick type I",
        ", on light skin, Fitzpatrick type II",
        ", on medium skin, Fitzpatrick type III",
        ", on olive skin, Fitzpatrick type IV",
        ", on brown skin, Fitzpatrick type V",
        ", on dark brown skin, Fitzpatrick type VI",
    )

    @model_validator(mode="after")
    def _coherent(self) -> "GenerateConfig":
        if self.steps_max < self.steps_min:
            raise ValueError(f"steps_max ({self.steps_max}) is below steps_min ({self.steps_min})")
        if not self.samplers:
            raise ValueError(f"samplers is empty; name at least one of: {', '.join(SAMPLER_NAMES)}")
        unknown = [s for s in self.samplers if s not in SAMPLER_NAMES]
        if unknown:
            raise ValueError(f"unknown sampler(s) {', '.join(map(repr, unknown))}; known samplers: "
                             f"{', '.join(sorted(SAMPLER_NAMES))}")
        _multiple_of_8("width", self.width)
        _multiple_of_8("height", self.height)
        return self


Flag = Literal["face", "text", "ruler", "ink", "frame", "hair", "atypical"]
FLAGS: tuple[Flag, ...] = ("face", "text", "ruler", "ink", "frame", "hair")  # the detectors' flags
# far from the seeds in the learned embedding (dermt2im.fidelity.typicality), set over the whole set
ATYPICAL: Flag = "atypical"


class QualityConfig(Strict):
    """The quality gate (``dermt2im.quality.checks``) and the memorisation audit (``quality.audit``).

    The four cuts of the image-measure checks (``min_std``, ``max_high_frequency_ratio``,
    ``min_sharpness``, ``min_lesion_contrast``) are calibrated on the accepted seeds when left empty
    (``dermt2im.quality.calibrate``); a number given here is used as it is.
    """

    min_std: float | None = Field(None, ge=0, description="below this grey-level std the image is blank / low "
                                  "contrast; empty: the seeds' 1st percentile / 2")
    max_saturated_fraction: float = Field(0.5, ge=0, le=1)
    max_high_frequency_ratio: float | None = Field(
        None, ge=0, le=1, description="noise-like above this (white noise ~0.8, skin photographs < 0.2); empty: "
        "the seeds' 99th percentile x 2")
    min_sharpness: float | None = Field(None, ge=0, description="variance of the Laplacian; blurrier is rejected; "
                                        "empty: the seeds' 1st percentile / 4 (generated images are softer)")
    min_lesion_fraction: float = Field(0.005, ge=0, le=1)
    max_lesion_fraction: float = Field(0.95, ge=0, le=1)
    min_lesion_contrast: float | None = Field(
        None, ge=0, description="grey levels by which the (smoothed) lesion must be darker than the skin around it; "
        "empty: the seeds' 1st percentile / 2")
    # what a curator discards or notes (dermt2im.quality.detectors / rulers / text); a score above its
    # threshold sets the flag, and a flag named in reject_flags rejects the image
    max_face_score: float = Field(12.0, ge=0, description="Haar face score (two cascades + eyes) above which a face is found")
    max_text_score: float = Field(0.6, ge=0, le=1, description="text-line probability above which text is found")
    max_ruler_score: float = Field(0.7, ge=0, le=1, description="tick periodicity above which a ruler is found")
    max_ink_score: float = Field(2.5, ge=0, description="per mille of the image in violet / blue strokes")
    max_frame_score: float = Field(10.0, ge=0, le=100, description="% of the border ring that is black")
    max_hair_fraction: float = Field(0.01, ge=0, le=1, description="share of pixels the hair detector finds")
    reject_flags: tuple[Flag, ...] = Field(
        ("face", "text"), description="flags that reject; rulers, ink, frames and hair also occur in real "
        "dermoscopy, so by default they are only recorded (and their per-class rates audited); 'atypical' (far "
        "from the seeds in the learned embedding) can reject generated anatomy and other things no lesion is")
    max_typicality_quantile: float = Field(
        0.99, gt=0, le=1, description="an image farther from the training seeds in the learned seed embedding than "
        "this quantile of the held-out real images is flagged 'atypical' (dermt2im.fidelity.typicality)")
    balance_flags: bool = Field(
        False, description="reject flagged images of the class where a flag is much more frequent, until the "
        "benign and malignant rates match (a class-dependent artefact is a shortcut a classifier learns)")
    shortcut_min_difference: float = Field(
        0.1, ge=0, le=1, description="benign / malignant difference in a flag's rate from which it is called out")
    near_duplicate_hamming: int = Field(4, ge=0, le=64, description="pHash bits: a candidate near-duplicate pair")
    near_duplicate_max_distance: float = Field(
        0.3, ge=0, description="CIELAB thumbnail distance that confirms a pHash candidate as a near-duplicate")
    memorisation_min_inliers: int = Field(
        15, ge=4, description="SIFT matches consistent with one copy geometry that make an image a near-copy of a seed")
    memorisation_threshold: float = Field(
        0.1, ge=0, description="global-descriptor distance below which a sample is a near-copy, for images too "
        "small or plain for keypoints")
    exclude_memorised: bool = True


class Augmentation(Strict):
    """What each training image of a classifier goes through, drawn per image from the cell's seed.
    Dermoscopy has no canonical orientation, so flips and quarter turns are always valid."""

    flips: bool = True
    quarter_turns: bool = True
    colour_jitter: float = Field(0.1, ge=0, le=1, description="brightness, contrast and saturation: 1 +- this")
    crop_scale: float = Field(1.0, gt=0, le=1, description="random crop of at least this share of the area, resized "
                              "back (1: no crop)")


class Recipe(Strict):
    """How one classifier is fine-tuned: AdamW, the learning rate warmed up linearly for
    ``warmup_epochs``, then held or decayed to zero by ``schedule``, with early stopping on the real
    validation split (``ValidateConfig.early_stopping_patience``)."""

    learning_rate: float = Field(gt=0)
    epochs: int = Field(ge=1)
    warmup_epochs: float = Field(0.0, ge=0)
    schedule: Literal["constant", "linear", "cosine"] = "cosine"
    weight_decay: float = Field(0.01, ge=0)
    augmentation: Augmentation = Augmentation()


# ViT-B/16 from ImageNet-21k: a small rate with warm-up. Hugging Face's image-classification guide
# fine-tunes google/vit-base-patch16-224-in21k with AdamW at 5e-5, a linear decay after a warm-up
# over the first 10% of the steps; ViT's authors fine-tune with cosine decay (Dosovitskiy et al., ICLR
# 2021, appendix B.1.1). Ten epochs, one of them warm-up; light augmentation (ViT-B/16 at 224 px sees
# the whole lesion).
VIT_RECIPE = Recipe(learning_rate=5e-5, epochs=10, warmup_epochs=1.0, schedule="cosine", weight_decay=0.01,
                    augmentation=Augmentation(colour_jitter=0.1, crop_scale=1.0))
# MobileNetV2 (ImageNet-1k, BatchNorm): fine-tuned at 1e-4 to 1e-3 with Adam-type optimizers, about
# ten times ViT's rate (Keras' transfer-learning guide trains its MobileNetV2 head at 1e-4 and
# torchvision's fine-tuning tutorial a BatchNorm CNN at 1e-3 with SGD); a BatchNorm network also
# needs steps to re-estimate its statistics on the new data, so more epochs and stronger
# augmentation (random crops down to 70% of the area, more colour jitter) than ViT.
MOBILENET_RECIPE = Recipe(learning_rate=5e-4, epochs=20, warmup_epochs=1.0, schedule="cosine", weight_decay=1e-4,
                          augmentation=Augmentation(colour_jitter=0.2, crop_scale=0.7))


class Recipes(Strict):
    """One recipe per model; a config names only what it changes (``recipes.vit.learning_rate: 1e-4``),
    the rest is the model's default recipe."""

    vit: Recipe = VIT_RECIPE
    mobilenet_v2: Recipe = MOBILENET_RECIPE

    @model_validator(mode="before")
    @classmethod
    def _over_the_defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        out = dict(data)
        for name, default in (("vit", VIT_RECIPE), ("mobilenet_v2", MOBILENET_RECIPE)):
            given = out.get(name)
            if isinstance(given, dict):
                base = default.model_dump()
                augmentation = {**base["augmentation"], **(given.get("augmentation") or {})}
                out[name] = {**base, **given, "augmentation": augmentation}
        return out


class ValidateConfig(Strict):
    models: tuple[Literal["vit", "mobilenet_v2"], ...] = ("vit", "mobilenet_v2")
    vit_model: str = "google/vit-base-patch16-224-in21k"
    mobilenet_model: str = "google/mobilenet_v2_1.0_224"
    tiny: bool = False
    regimes: tuple[str, ...] = ("baseline", "hybrid")
    synthetic_ratio: float = Field(0.75, ge=0, le=1)
    synthetic_sources: tuple[str, ...] = Field(
        (), description="synthetic sources a regime draws from, side by side: each regime that uses synthetic "
        "images runs once per source named here (as 'hybrid@NAME'); empty: every source pooled. 'dermt2im' is "
        "the factory's own renders, other names are sets brought in with `dermt2im import-synthetic`")
    sweep_ratios: tuple[float, ...] = ()
    sweep_settings: tuple[Literal["constant", "additive"], ...] = ("constant", "additive")
    seeds: tuple[int, ...] = (0, 1, 2)
    recipes: Recipes = Field(Recipes(), description="how each classifier is fine-tuned (learning rate, epochs, "
                             "warm-up, schedule, augmentation)")
    epochs: int | None = Field(None, ge=1, description="set: every model's epochs (quick runs); None: each recipe's")
    batch_size: int = Field(16, ge=1)
    learning_rate: float | None = Field(None, gt=0, description="set: every model's learning rate (tiny models "
                                        "trained from scratch); None: each recipe's")
    early_stopping_patience: int = Field(3, ge=1)
    image_size: int = Field(224, ge=16)
    mixed_precision: Precision = "fp16"
    test_sets: dict[str, str] = Field(default_factory=dict, description="name -> SOURCE of an unseen real test set")
    segmentation_samples: int = Field(8, ge=0)
    sam_model: str = "facebook/sam-vit-base"

    def recipe(self, model: str) -> Recipe:
        """The recipe ``model`` is fine-tuned with: its own, with ``epochs`` / ``learning_rate`` when set."""
        own: Recipe = getattr(self.recipes, model)
        changes = {k: v for k, v in (("epochs", self.epochs), ("learning_rate", self.learning_rate)) if v is not None}
        return own.model_copy(update=changes) if changes else own


class FidelityConfig(Strict):
    """The fidelity report (``dermt2im.fidelity``): how good each synthetic set is, against the seeds."""

    embeddings: tuple[str, ...] = Field(
        (), description="local folders of transformers vision models (DINOv2, a ViT, CLIP, a dermatology model; "
        "safetensors only, nothing is downloaded) to measure FID / KID / PRDC in, besides the embedding learned "
        "from the workdir's own seeds")
    bootstrap: int = Field(200, ge=0, description="bootstrap resamples behind each interval (0: no intervals)")
    max_images: int = Field(500, ge=10, description="images per stratum and set the metrics use at most (a seeded "
                            "random subset; the report states how many)")
    frd: bool = Field(True, description="the Fréchet Radiomics Distance (pyradiomics: the slowest metric)")
    frd_size: int = Field(64, ge=16, description="side in px every image is resized to for radiomics")
    frd_filters: tuple[Literal["Original", "LoG", "Wavelet"], ...] = Field(
        ("Original", "LoG", "Wavelet"), description="pyradiomics image filters (FRDv1: all three)")
    frd_max_images: int = Field(200, ge=2, description="images per stratum and set radiomics are computed for at most")
    noise_images: int = Field(32, ge=0, description="images rendered by the random-weight tiny Stable Diffusion: the "
                              "noise ceiling every figure is read against (0: no ceiling)")
    strata: tuple[Literal["label", "sampler", "transformation", "skin_tone"], ...] = Field(
        ("label", "sampler", "transformation", "skin_tone"), description="what the report breaks each set down by")
