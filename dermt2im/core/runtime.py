"""How the stages run: devices, batch sizes, workers, and where records and images live.

Nothing here changes what a stage makes (that is ``dermt2im.core.specs``), so nothing here enters a
cache key: moving a run to another GPU, a bigger batch or a bucket never re-runs finished work.
"""

from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict, Field, field_validator

from dermt2im.core.specs import Strict

Device = Literal["auto", "cuda", "cpu"]


def normalise_location(v: str | None) -> str | None:
    """A storage location as given: "" (e.g. an empty override) means the default (None); a trailing
    slash goes ("s3://b/p/" -> "s3://b/p"; "/" stays "/")."""
    v = (v or "").strip()
    return (v.rstrip("/") or v) if v else None


class PreprocessRuntime(Strict):
    workers: int = Field(0, ge=0, description="processes; 0 uses every core")


Switch = Literal["auto", "on", "off"]


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
    lease_seconds: float = Field(
        120.0, gt=0, description="a worker's claim on a shard lapses this long after its last renewal (scale-out)"
    )


class ValidateRuntime(Strict):
    device: Device = "auto"


class RuntimeConfig(Strict):
    # YAML key `validate`; the attribute is `validation` because BaseModel.validate exists.
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True, populate_by_name=True)

    preprocess: PreprocessRuntime = PreprocessRuntime()
    train: TrainRuntime = TrainRuntime()
    generate: GenerateRuntime = GenerateRuntime()
    validation: ValidateRuntime = Field(ValidateRuntime(), alias="validate")


class StorageConfig(Strict):
    """Where the factory's records and images live; the workdir itself stays on a POSIX filesystem."""

    manifests: str | None = Field(
        None,
        description="where the Parquet manifests go: None = W/manifests; else a local folder (relative to the "
        "workdir) or an fsspec URL (s3://bucket/prefix, ...); the config snapshot, leases and weights stay in W",
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


class TrackingConfig(Strict):
    mlflow_uri: str | None = Field(None, description="default: sqlite:///<workdir>/mlflow.db; MLFLOW_TRACKING_URI wins")
    experiment: str = "derm-t2im"
