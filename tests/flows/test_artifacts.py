"""What the Prefect UI's artifacts hold, without a server: embedded thumbnails, valid keys, and a
link to the comparison run that a browser can follow."""

import base64
import io
import re

import numpy as np
from PIL import Image

from dermt2im.core.runtime import TrackingConfig
from dermt2im.tasks.artifacts import THUMBNAIL_SIDE, artifact_key, embedded_image, mlflow_link


def test_images_are_embedded_as_small_thumbnails(tmp_path):
    noisy = np.random.default_rng(0).integers(0, 255, (2000, 1500, 3), dtype=np.uint8)  # like a grid of noise
    path = tmp_path / "grid.png"
    Image.fromarray(noisy).save(path)
    md = embedded_image(path, "grid")
    mime, data = re.fullmatch(r"!\[grid\]\(data:(image/\w+);base64,([A-Za-z0-9+/=]+)\)", md).groups()
    raw = base64.b64decode(data)
    assert mime == "image/jpeg" and len(data) < 1_000_000  # noise: JPEG; under what both Prefect UIs render
    with Image.open(io.BytesIO(raw)) as im:
        assert max(im.size) == THUMBNAIL_SIDE and im.size[0] / im.size[1] == 1500 / 2000
    small = tmp_path / "flat.png"
    Image.new("RGB", (300, 200), "white").save(small)
    assert embedded_image(small, "flat").startswith("![flat](data:image/png;base64,")


def test_artifact_keys_are_valid_and_one_per_dataset():
    assert artifact_key("ingest", "ISIC_2019 test.v2") == "ingest-isic-2019-test-v2"
    assert artifact_key("generate", "grid_overview") == "generate-grid-overview"
    assert artifact_key("preprocess", "ham") != artifact_key("preprocess", "isic")


def test_the_mlflow_link_is_one_a_browser_can_follow(workdir, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    assert "(http://mlflow:5000/#/experiments/3/runs/abc)" in mlflow_link(TrackingConfig(), workdir, "3", "abc")
    monkeypatch.setenv("DERMT2IM_MLFLOW_UI_URL", "http://127.0.0.1:5000/")
    assert "(http://127.0.0.1:5000/#/experiments/3/runs/abc)" in mlflow_link(TrackingConfig(), workdir, "3", "abc")
    monkeypatch.delenv("DERMT2IM_MLFLOW_UI_URL")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", workdir.mlflow_uri)
    local = mlflow_link(TrackingConfig(), workdir, "3", "abc")
    assert f"mlflow ui --backend-store-uri {workdir.mlflow_uri} --artifacts-destination {workdir.root / 'mlartifacts'}" in local
    assert "http://127.0.0.1:5000/#/experiments/3/runs/abc" in local
