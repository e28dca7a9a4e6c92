"""How the stages run: devices, batch sizes, workers, and where records and images live.

Nothing here changes what a stage makes (that is ``dermt2im.core.specs``), so nothing here enters a
cache key: moving a run to another GPU, a bigger batch or a bucket never re-runs finished work.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, ConfigDict, Field, field_validator

from dermt2im.core.specs import NO_WORDS, YES_WORDS, Strict

Device = Literal["auto", "cuda", "cpu"]


def normalise_location(v: str | None) -> str | None:
    """A storage location as given: "" (e.g. an empty override) means the default (None); a trailing
    slash goes ("s3://b/p/" -> "s3://b/p"; "/" stays "/")."""
    v = (v or "").strip()
    return (v.rstrip("/") or v) if v else None


class PreprocessRuntime(Strict):
    workers: int = Field(0, ge=0, description="processes; 0 uses every core")


def _switch_word(v: Any) -> Any:
    """A switch as typed: on / off / auto, or true / false / yes / no (a YAML or JSON boolean too)."""
    if isinstance(v, bool):
        return "on" if v else "off"
    if isinstance(v, str):
        word = v.strip().lower()
        return "on" if word in YES_WORDS else "off" if word in NO_WORDS else word
    return v


Switch = Annotated[Literal["auto", "on", "off"], BeforeValidator(_switch_word)]


class TrainRuntime(Strict):
    device: Device = "auto"
    gradient_checkpointing: bool = Field(True, description="trades compute for memory; the weights are the same")
    compile: Switch = Field("auto", description="torch.compile the UNet's forward and backward; auto: on CUDA only")
    channels_last: Switch = Field("auto", description="NHWC memory format for the UNet; auto: on CUDA only")
    tf32: bool = Field(True, description="TF32 matmuls and convolutions on Ampere and newer GPUs")
    checkpoint_every: int = Field(500, ge=1, description="optimizer steps between resumable checkpoints")
    checkpoints_keep: int = Field(3, ge=1)


class GenerateRuntime(Strict):
    device: Device = "auto"
    dtype: Literal["auto", "fp32", "fp16", "bf16"] = Field(
        "auto", description="auto: fp16 on CUDA, bf16 on a CPU with native bf16 (AVX512-BF16, AMX), else fp32; "
        "each image's row records the dtype it was made in"
    )
    batch_size: int = Field(8, ge=1)
    compile: Switch = Field("auto", description="torch.compile the UNet and the VAE decoder; auto: on CUDA only")
    channels_last: Switch = Field("auto", description="NHWC memory format for the UNet and the VAE; auto: on CUDA only")
    fuse_qkv: bool = Field(True, description="one projection for attention's query, key and value")
    writer_threads: int = Field(2, ge=1)


class QualityRuntime(Strict):
    workers: int = Field(0, ge=0, description="processes measuring images for the gate; 0: one per core but one")
    while_rendering: bool = Field(True, description="measure each batch of images for the gate as soon as it is "
                                  "written, while the next renders (a pipeline, not a phase after it)")


class ValidateRuntime(Strict):
    device: Device = "auto"


class RuntimeConfig(Strict):
    # YAML key `validate`; the attribute is `validation` because BaseModel.validate exists.
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True, populate_by_name=True)

    preprocess: PreprocessRuntime = PreprocessRuntime()
    train: TrainRuntime = TrainRuntime()
    generate: GenerateRuntime = GenerateRuntime()
    quality: QualityRuntime = QualityRuntime()
    validation: ValidateRuntime = Field(ValidateRuntime(), alias="validate")


class StorageConfig(Strict):
    """Where the factory's records and images live; the workdir itself stays on a POSIX filesystem."""

    manifests: str | None = Field(
        None,
        description="where the Parquet manifests go: None = W/manifests; else a local folder (relative to the "
        "workdir) or an fsspec URL (s3://bucket/prefix, ...); the config snapshot, locks and weights stay in W",
    )
    images: str | None = Field(
        None,
        description="where rendered PNGs go: None = W/synthetic; else a local folder (relative to the workdir) or an "
        "fsspec URL (s3://bucket/prefix, memory://...) holding <label>/<sample_key>.png",
    )

    @field_validator("manifests", "images")
    @classmethod
    def _location_text(cls, v: str | None) -> str | None:
        return normalise_location(v)


# Names whose values say where things are and how to reach them, never secrets: a runtime_env is
# stored in the cluster and shown on its dashboard.
FORWARDED_ENV = ("MLFLOW_TRACKING_URI", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_ENDPOINT",
                 "FSSPEC_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION",
                 "AWS_REGION")
_RAY_ADDRESS = re.compile(r"(local|auto|ray://[^\s/:]+:\d+|[^\s/:]+:\d+)")


class ScaleConfig(Strict):
    """Scale-out on a Ray cluster (``dermt2im.runners.ray_runner``). Without ``ray_address`` the
    factory runs in this process and nothing imports or starts Ray."""

    ray_address: str | None = Field(
        None,
        description="None: in this process, no Ray; 'local': a Ray started here, on this machine's GPUs; 'auto': the "
        "cluster this machine belongs to; 'host:port' (the head's GCS) or 'ray://host:port' (Ray Client)",
    )
    actors_per_node: int | None = Field(
        None, ge=1, description="renderer actors per node; None: one per gpus_per_actor GPUs (one per node on CPU nodes)"
    )
    gpus_per_actor: float = Field(1.0, ge=0, description="GPUs each renderer actor holds (0: a CPU actor)")
    cpus_per_actor: float = Field(1.0, ge=0)
    gpus_per_cell: float = Field(1.0, ge=0, description="GPUs each validation cell (a Ray task) holds; 0.5: two share one")
    cpus_per_cell: float = Field(1.0, ge=0)
    actor_restarts: int = Field(3, ge=0, description="Ray restarts a killed renderer this often (its shard re-runs)")
    task_retries: int = Field(2, ge=0, description="Ray re-runs a call whose process died this often (actors, cells)")
    shard_attempts: int = Field(3, ge=1, description="a shard is given up after this many renderers died on it")
    actor_replacements: int = Field(4, ge=0, description="new renderers started for ones Ray gave up on, per stage run")
    start_timeout_s: float = Field(600.0, gt=0, description="how long renderers may take to be placed and load")
    namespace: str = Field("dermt2im", min_length=1)
    forward_env: list[str] = Field(
        default_factory=lambda: list(FORWARDED_ENV),
        description="environment variables of this process handed to the Ray workers (those set); add secrets such "
        "as AWS_SECRET_ACCESS_KEY only where the cluster has no credentials of its own",
    )

    @field_validator("ray_address")
    @classmethod
    def _address(cls, v: str | None) -> str | None:
        v = (v or "").strip() or None
        if v is not None and not _RAY_ADDRESS.fullmatch(v):
            raise ValueError(f"{v!r} is not local, auto, host:port or ray://host:port")
        return v


class TrackingConfig(Strict):
    mlflow_uri: str | None = Field(None, description="default: sqlite:///<workdir>/mlflow.db; MLFLOW_TRACKING_URI wins")
    experiment: str = "derm-t2im"
