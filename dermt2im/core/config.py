"""One typed configuration for the whole factory, loaded from YAML presets in ``dermt2im/presets/``.

Every stage has its own frozen, strict model: an unknown key or a wrong type is an error that
names the key and the file it came from. ``load_config`` applies ``--set key.path=value``
overrides from the CLI on top of the file before validation, so they are checked the same way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

Label = Literal["benign", "malignant"]
LABELS: tuple[Label, ...] = ("benign", "malignant")

CONFIG_DIR = Path(__file__).resolve().parent.parent / "presets"

# Diagnosis -> label. Keys are normalised (lower case, '_' and '-' read as spaces); see
# ``normalise_diagnosis``. Users extend or override this with ``ingest.diagnosis_labels``.
DEFAULT_DIAGNOSIS_LABELS: dict[str, Label] = {
    # malignant
    "melanoma": "malignant",
    "mel": "malignant",
    "melanoma metastasis": "malignant",
    "basal cell carcinoma": "malignant",
    "bcc": "malignant",
    "squamous cell carcinoma": "malignant",
    "scc": "malignant",
    "actinic keratosis": "malignant",  # HAM10000 'akiec' (AK / Bowen's disease) is grouped as malignant
    "akiec": "malignant",
    "ak": "malignant",  # ISIC 2019's code for the same class
    # ISIC Archive diagnosis_3 names (newer exports)
    "melanoma, nos": "malignant",
    "melanoma invasive": "malignant",
    "melanoma in situ": "malignant",
    "squamous cell carcinoma, nos": "malignant",
    "squamous cell carcinoma in situ": "malignant",
    "solar or actinic keratosis": "malignant",
    # benign
    "nevus": "benign",
    "nv": "benign",
    "melanocytic nevus": "benign",
    "benign keratosis": "benign",
    "bkl": "benign",
    "seborrheic keratosis": "benign",
    "solar lentigo": "benign",
    "lentigo nos": "benign",
    "lichenoid keratosis": "benign",
    "pigmented benign keratosis": "benign",
    "dermatofibroma": "benign",
    "df": "benign",
    "vascular lesion": "benign",
    "vasc": "benign",
    "angioma": "benign",
    "angiokeratoma": "benign",
    "pyogenic granuloma": "benign",
    "hemorrhage": "benign",
    "hemangioma": "benign",
    "lichen planus like keratosis": "benign",
}


def normalise_diagnosis(name: str) -> str:
    return " ".join(str(name).strip().lower().replace("_", " ").replace("-", " ").split())


def normalise_location(v: str | None) -> str | None:
    """A storage location as given: "" (e.g. an empty override) means the default (None); a trailing
    slash goes ("s3://b/p/" -> "s3://b/p"; "/" stays "/")."""
    v = (v or "").strip()
    return (v.rstrip("/") or v) if v else None


class ConfigError(ValueError):
    """A configuration problem, worded for the person who wrote the file."""


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
        default_factory=dict, description="extra or overriding diagnosis -> label entries"
    )
    splits: SplitConfig = SplitConfig()
    max_pixels: int = Field(
        89_478_485, ge=1, description="larger images are quarantined as possible decompression bombs"
    )
    extensions: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")

    def label_map(self) -> dict[str, Label]:
        merged = dict(DEFAULT_DIAGNOSIS_LABELS)
        merged.update({normalise_diagnosis(k): v for k, v in self.diagnosis_labels.items()})
        return merged


class PreprocessConfig(Strict):
    size: int = Field(512, ge=16, description="output side length: resize the short side, centre-crop")
    hair_removal: bool = True
    # DullRazor (Lee et al. 1997) as commonly implemented with OpenCV: black-hat on grey, threshold, inpaint.
    hair_kernel_size: int = Field(17, ge=3, description="structuring element side, in pixels at 512 px")
    hair_threshold: int = Field(12, ge=1, le=255, description="black-hat response above which a pixel is hair")
    inpaint_radius: int = Field(5, ge=1)
    inpaint_method: Literal["telea", "ns"] = "telea"
    workers: int = Field(0, ge=0, description="processes; 0 uses every core")


class TrainConfig(Strict):
    base_model: str = Field(
        "stable-diffusion-v1-5/stable-diffusion-v1-5",
        description="hub id, local diffusers folder, single .safetensors checkpoint, or 'tiny'",
    )
    revision: str | None = None
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
    mixed_precision: Literal["no", "fp16", "bf16"] = "fp16"
    gradient_checkpointing: bool = True
    max_grad_norm: float = Field(1.0, gt=0)
    snr_gamma: float | None = Field(None, gt=0)
    noise_offset: float = Field(0.0, ge=0)
    prior_preservation: bool = False
    prior_loss_weight: float = Field(1.0, ge=0)
    num_class_images: int = Field(100, ge=1)
    class_image_steps: int = Field(25, ge=1, description="sampling steps for prior-preservation class images")
    seed: int = 42
    checkpoint_every: int = Field(500, ge=1)
    checkpoints_keep: int = Field(3, ge=1)
    nan_policy: Literal["stop", "skip"] = "stop"
    validation_images_per_class: int = Field(2, ge=0)
    validation_steps: int = Field(25, ge=1)
    device: Literal["auto", "cuda", "cpu"] = "auto"


class GenerateConfig(Strict):
    per_class: int = Field(3000, ge=1)
    samplers: tuple[str, ...] = ("euler", "euler_a", "plms")
    steps_min: int = Field(20, ge=1)
    steps_max: int = Field(26, ge=1)
    guidance_scale: float = Field(7.0, ge=0)
    lora_scale: float = Field(0.8, ge=0, description="beta in W = W0 + beta * dW (paper, Eq. 2)")
    width: int = Field(512, ge=16)
    height: int = Field(512, ge=16)
    batch_size: int = Field(4, ge=1)
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
    writer_threads: int = Field(2, ge=1)
    lease_seconds: float = Field(
        120.0, gt=0, description="a worker's claim on a shard lapses this long after its last renewal (scale-out)"
    )
    parallel_workers: int = Field(
        0, ge=0, description="> 0: the generate flow renders through this many runs of worker_deployment (scale-out)"
    )
    worker_deployment: str = "generate-worker/generate-worker-cuda"
    device: Literal["auto", "cuda", "cpu"] = "auto"
    dtype: Literal["auto", "fp32", "fp16", "bf16"] = "auto"
    image_store: str | None = Field(
        None,
        description="where rendered PNGs go: None = W/synthetic; else a local folder (relative to the workdir) or an "
        "fsspec URL (s3://bucket/prefix, memory://...) holding <label>/<sample_key>.png; the workdir stays local",
    )

    @field_validator("image_store")
    @classmethod
    def _store_text(cls, v: str | None) -> str | None:
        return normalise_location(v)  # None: W/synthetic

    @model_validator(mode="after")
    def _step_range(self) -> "GenerateConfig":
        if self.steps_max < self.steps_min:
            raise ValueError(f"steps_max ({self.steps_max}) is below steps_min ({self.steps_min})")
        return self


class QualityConfig(Strict):
    min_std: float = Field(8.0, ge=0, description="below this grey-level std the image is blank / low contrast")
    max_saturated_fraction: float = Field(0.5, ge=0, le=1)
    max_high_frequency_ratio: float = Field(
        0.35, ge=0, le=1, description="noise-like above this (white noise ~0.8, skin photographs < 0.2)"
    )
    min_sharpness: float = Field(5.0, ge=0, description="variance of the Laplacian; blurrier is rejected")
    min_lesion_fraction: float = Field(0.005, ge=0, le=1)
    max_lesion_fraction: float = Field(0.95, ge=0, le=1)
    min_lesion_contrast: float = Field(
        10.0, ge=0, description="grey levels by which the (smoothed) lesion must be darker than the skin around it"
    )
    near_duplicate_hamming: int = Field(4, ge=0, le=64)
    memorisation_threshold: float = Field(0.1, ge=0, description="embedding distance below which a sample is a near-copy")
    exclude_memorised: bool = True


class ValidateConfig(Strict):
    models: tuple[Literal["vit", "mobilenet_v2"], ...] = ("vit", "mobilenet_v2")
    vit_model: str = "google/vit-base-patch16-224-in21k"
    mobilenet_model: str = "google/mobilenet_v2_1.0_224"
    tiny: bool = False
    regimes: tuple[str, ...] = ("baseline", "hybrid")
    synthetic_ratio: float = Field(0.75, ge=0, le=1)
    sweep_ratios: tuple[float, ...] = ()
    sweep_settings: tuple[Literal["constant", "additive"], ...] = ("constant", "additive")
    seeds: tuple[int, ...] = (0, 1, 2)
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(16, ge=1)
    learning_rate: float = Field(5e-5, gt=0)
    early_stopping_patience: int = Field(3, ge=1)
    image_size: int = Field(224, ge=16)
    mixed_precision: Literal["no", "fp16", "bf16"] = "fp16"
    device: Literal["auto", "cuda", "cpu"] = "auto"
    test_sets: dict[str, str] = Field(default_factory=dict, description="name -> SOURCE of an unseen real test set")
    segmentation_samples: int = Field(8, ge=0)
    sam_model: str = "facebook/sam-vit-base"


class TrackingConfig(Strict):
    mlflow_uri: str | None = Field(None, description="default: sqlite:///<workdir>/mlflow.db; MLFLOW_TRACKING_URI wins")
    experiment: str = "derm-t2im"


class OrchestrationConfig(Strict):
    """How the CPU parent flow reaches the GPU stages."""

    gpu_deployments: bool = Field(
        False, description="run train / generate through run_deployment on the cuda work pool instead of in-process"
    )
    train_deployment: str = "train/train-cuda"
    generate_deployment: str = "generate/generate-cuda"
    deployment_timeout_s: float | None = Field(None, gt=0, description="None waits for as long as the run takes")


class StorageConfig(Strict):
    """Where the factory's records live (images: ``generate.image_store``)."""

    manifests: str | None = Field(
        None,
        description="where the Parquet manifests go: None = W/manifests; else a local folder (relative to the "
        "workdir) or an fsspec URL (s3://bucket/prefix, ...); the config snapshot, leases and weights stay in W",
    )

    @field_validator("manifests")
    @classmethod
    def _location_text(cls, v: str | None) -> str | None:
        return normalise_location(v)  # None: W/manifests


class FactoryConfig(Strict):
    # YAML key `validate`; the attribute is `validation` because BaseModel.validate exists.
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True, populate_by_name=True)

    name: str = "derm-t2im"
    phantoms: PhantomConfig = PhantomConfig()
    ingest: IngestConfig = IngestConfig()
    preprocess: PreprocessConfig = PreprocessConfig()
    train: TrainConfig = TrainConfig()
    generate: GenerateConfig = GenerateConfig()
    quality: QualityConfig = QualityConfig()
    validation: ValidateConfig = Field(ValidateConfig(), alias="validate")
    tracking: TrackingConfig = TrackingConfig()
    orchestration: OrchestrationConfig = OrchestrationConfig()
    storage: StorageConfig = StorageConfig()

    @field_validator("name")
    @classmethod
    def _name_is_simple(cls, v: str) -> str:
        if not v or any(c in v for c in "/\\"):
            raise ValueError("name must be non-empty and contain no path separators")
        return v

    def digest(self, section: str | None = None) -> str:
        """A stable content hash of the whole config, or of one section, for cache keys."""
        import hashlib
        import json

        if section is None:
            data = self.model_dump(mode="json", by_alias=True)
        else:
            data = getattr(self, "validation" if section == "validate" else section).model_dump(mode="json")
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def resolve_config_path(name_or_path: str | Path) -> Path:
    """``smoke`` -> dermt2im/presets/smoke.yaml; anything with a suffix or separator is a path."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or len(p.parts) > 1:
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        return p
    candidate = CONFIG_DIR / f"{name_or_path}.yaml"
    if candidate.is_file():
        return candidate
    presets = sorted(x.stem for x in CONFIG_DIR.glob("*.yaml")) if CONFIG_DIR.is_dir() else []
    raise ConfigError(f"no preset named {name_or_path!r}; presets: {', '.join(presets) or 'none found'}")


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.key=value")
    key, raw = item.split("=", 1)
    keys = [k for k in key.strip().split(".") if k]
    if not keys:
        raise ConfigError(f"override {item!r} has an empty key")
    return keys, yaml.safe_load(raw) if raw.strip() else None


def apply_overrides(data: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    data = _deep_copy(data)
    for item in overrides or []:
        keys, value = _parse_override(item)
        node = data
        for k in keys[:-1]:
            child = node.get(k)
            if child is None:
                child = node[k] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {k!r} is not a section")
            node = child
        node[keys[-1]] = value
    return data


def _deep_copy(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _deep_copy(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_deep_copy(v) for v in d]
    return d


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid configuration in {source}:"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key")
        else:
            got = e.get("input")
            shown = "" if isinstance(got, dict) else f" (got {got!r})"
            lines.append(f"  {key}: {e['msg']}{shown}")
    return "\n".join(lines)


def config_from_dict(data: dict[str, Any], source: str = "<dict>", overrides: list[str] | None = None) -> FactoryConfig:
    merged = apply_overrides(data, overrides)
    try:
        return FactoryConfig.model_validate(merged)
    except ValidationError as err:
        where = source if not overrides else f"{source} (with overrides {overrides})"
        raise ConfigError(_format_errors(err, where)) from None


def load_config(name_or_path: str | Path = "smoke", overrides: list[str] | None = None) -> FactoryConfig:
    path = resolve_config_path(name_or_path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of sections, got {type(data).__name__}")
    return config_from_dict(data, str(path), overrides)
