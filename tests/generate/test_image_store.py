"""``storage.images``: rendered PNGs on an fsspec filesystem (memory:// here, s3:// through a
local moto endpoint when the dev extra is installed), read back by every stage that reads them."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from dermt2im.core import storage
from dermt2im.core.fileio import sha256_bytes
from dermt2im.core.manifest import SYNTHETIC, read_manifest
from dermt2im.core.views import synthetic_view
from dermt2im.diffusion.models import build_tiny_pipeline
from dermt2im.export import export_imagefolder
from dermt2im.quality.images import load_rgb
from dermt2im.quality.stage import assess
from dermt2im.validate import images as classify_images
from dermt2im.validate import models as classify_models
from tests.generate.generate_fixtures import plan, render, stage
from tests.generate.generate_fixtures import state as shard_state
from tests.generate.test_generation import tiny_cfg
from tests.quality.test_quality import seed_workdir
from tests.core.test_storage import s3_bucket  # noqa: F401  (fixture)
from tests.validate.validate_fixtures import tiny_config


@pytest.fixture(scope="module")
def pipe():
    return build_tiny_pipeline(0)


def _render(workdir, cfg, pipe) -> pd.DataFrame:
    plan(workdir, cfg)
    recorded = render(workdir, cfg, 0, pipe=pipe)
    assert len(recorded) == 6
    return read_manifest(workdir.synthetic_manifest, SYNTHETIC)


def _assert_in_store(workdir, df: pd.DataFrame, store: str) -> None:
    for r in df.itertuples(index=False):
        assert r.path == f"{store}/{r.label}/{r.sample_key}.png"
        assert sha256_bytes(storage.read_bytes(r.path)) == r.sha256
    # nothing rendered into the workdir: its synthetic folder holds no image and no temporary
    assert not [p for p in (workdir.root / "synthetic").rglob("*") if p.is_file()]


def test_config_normalises_the_store():
    assert tiny_cfg().storage.images is None
    assert tiny_cfg("storage.images=''").storage.images is None
    assert tiny_cfg("storage.images=s3://b/p/").storage.images == "s3://b/p"
    assert tiny_cfg("generate.image_store=s3://b/p/").storage.images == "s3://b/p"  # the key's earlier name


def test_render_assess_export_and_load_from_a_memory_store(workdir, tmp_path, pipe, memory_root):
    cfg = tiny_cfg(f"storage.images={memory_root}")
    df = _render(workdir, cfg, pipe)
    assert all(p.startswith("memory://") for p in df["path"])
    _assert_in_store(workdir, df, memory_root)
    # the manifest stays local; the cache key of a shard names the store
    assert workdir.synthetic_manifest.is_file()
    assert stage(workdir, cfg).key(0) != stage(workdir, tiny_cfg()).key(0)
    assert str(workdir.using(cfg).images) == memory_root and workdir.using(tiny_cfg()).images == workdir.synthetic

    # idempotent: nothing to render or adopt, the manifest unchanged
    state = shard_state(workdir, cfg, 0)
    assert (len(state.todo), len(state.adopt), state.done) == (0, 0, 6)
    assert render(workdir, cfg, 0, pipe=pipe) == []
    pd.testing.assert_frame_equal(read_manifest(workdir.synthetic_manifest, SYNTHETIC), df)

    # an image deleted from the store is rendered again, to the same bytes
    lost = df.iloc[0]
    fs, path = storage.to_fs(lost["path"])
    fs.rm(path)
    assert [r["sample_key"] for r in render(workdir, cfg, 0, pipe=pipe)] == [lost["sample_key"]]
    assert sha256_bytes(storage.read_bytes(lost["path"])) == lost["sha256"]
    # a PNG in the store that the manifest does not know of is adopted without rendering
    rows = read_manifest(workdir.synthetic_manifest, SYNTHETIC)
    from dermt2im.core.manifest import write_manifest

    write_manifest(rows.iloc[1:], workdir.synthetic_manifest, SYNTHETIC)
    state = shard_state(workdir, cfg, 0)
    assert [r["sample_key"] for r in state.adopt] == [rows.iloc[0]["sample_key"]] and not state.todo

    # the quality gate and memorisation audit read through the store
    render(workdir, cfg, 0, pipe=pipe)  # records the adopted one
    seed_workdir(workdir, n_seeds=2)
    assess(workdir, cfg.quality)
    assessed = synthetic_view(workdir)
    assert set(assessed["status"]) <= {"accepted", "rejected"} and len(assessed) == 6
    assert not assessed["reason"].fillna("").str.startswith(("missing", "unreadable")).any()
    assert assessed["nearest_seed_distance"].notna().all()  # audited: the pixels were read

    # export copies them to a local imagefolder, byte for byte
    out = export_imagefolder(workdir, tmp_path / "export", include_rejected=True, include_memorised=True)
    meta = pd.read_csv(out / "metadata.csv")
    assert len(meta) == 6
    for r in meta.itertuples(index=False):
        assert sha256_bytes((out / r.file_name).read_bytes()) == r.sha256

    # validation's loader decodes an image-store URL (and caches it under the object's version)
    url = df.iloc[1]["path"]
    assert load_rgb(url).shape == (32, 32, 3)
    _model, processor = classify_models.build_classifier("vit", tiny_config().validation, 0)
    x = classify_images.load_images([url, url], processor)
    assert x.dtype == torch.uint8 and x.shape[0] == 2 and np.array_equal(x[0].numpy(), x[1].numpy())
    assert storage.is_file(url) and not storage.is_file(f"{memory_root}/benign/nope.png")


def test_a_local_render_is_unchanged_by_the_option(workdir, pipe):
    df = _render(workdir, tiny_cfg(), pipe)
    assert all(p.startswith(str(workdir.synthetic)) for p in df["path"])
    assert workdir.png_path("benign", "k") == workdir.synthetic / "benign" / "k.png"
    # a local store is a folder, relative to the workdir unless absolute
    assert workdir.using(tiny_cfg("storage.images=imgs")).png_path("benign", "k") == workdir.root / "imgs/benign/k.png"


def test_render_round_trip_on_a_local_s3_endpoint(workdir, pipe, s3_bucket):  # noqa: F811
    store = f"{s3_bucket}/synthetic"
    cfg = tiny_cfg(f"storage.images={store}")
    df = _render(workdir, cfg, pipe)
    assert all(p.startswith("s3://") for p in df["path"])
    _assert_in_store(workdir, df, store)
    assert render(workdir, cfg, 0, pipe=pipe) == []
    assert load_rgb(df.iloc[0]["path"]).shape == (32, 32, 3)
