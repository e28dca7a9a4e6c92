"""Manifests on fsspec filesystems (memory:// here; s3:// works the same through s3fs) and the
storage helpers; local paths keep their atomic temp + rename behaviour."""

from __future__ import annotations

import uuid
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from dermt2im.core import storage
from dermt2im.core.identity import manifest_digest as digest
from dermt2im.core.manifest import (
    PLAN,
    SEEDS,
    ManifestError,
    read_manifest,
    upsert,
    write_manifest,
)


def _plan_rows(keys, shard=0) -> pd.DataFrame:
    return pd.DataFrame({"sample_key": keys, "label": "benign", "index": range(len(keys)), "prompt": "p",
                         "sampler": "euler", "steps": 2, "seed": [hash(k) % 1000 for k in keys], "shard": shard})


def test_locations_local_and_remote():
    assert not storage.is_remote("/tmp/x.parquet") and not storage.is_remote(Path("rel/x"))
    assert not storage.is_remote("file:///tmp/x.parquet")
    assert storage.local_path("file:///tmp/x.parquet") == Path("/tmp/x.parquet")
    assert storage.is_remote("s3://bucket/m/plan.parquet") and storage.is_remote("memory://a/b")
    with pytest.raises(ValueError, match="not a local path"):
        storage.local_path("s3://bucket/x")


def test_bytes_round_trip_on_memory_and_local(memory_root, tmp_path):
    for loc in (f"{memory_root}/images/benign/a.png", str(tmp_path / "images" / "a.png"),
                f"file://{tmp_path}/images/b.png"):
        assert not storage.exists(loc)
        storage.atomic_put_bytes(loc, b"\x89PNG data")
        assert storage.exists(loc) and storage.read_bytes(loc) == b"\x89PNG data"
    assert not list(tmp_path.rglob("*.tmp"))


def test_manifest_write_read_upsert_digest_on_memory_fs(memory_root, tmp_path):
    url = f"{memory_root}/manifests/plan.parquet"
    assert read_manifest(url, PLAN).empty  # nothing there yet: the empty schema
    out = write_manifest(_plan_rows(["b-0", "b-1"]), url, PLAN)
    assert out == url and storage.exists(url)
    df = read_manifest(url, PLAN)
    assert df["sample_key"].tolist() == ["b-0", "b-1"] and list(df.columns) == PLAN.columns
    merged = upsert(url, _plan_rows(["b-1", "b-2"], shard=1), PLAN)
    assert merged["sample_key"].tolist() == ["b-0", "b-1", "b-2"]
    assert merged.set_index("sample_key").loc["b-1", "shard"] == 1
    # the object is plain Parquet with the schema metadata, readable with fsspec directly
    fs, path = storage.to_fs(url)
    with fs.open(path, "rb") as fh:
        assert pq.read_table(fh).schema.metadata[b"dermt2im.manifest"] == b"plan"
    # content digest is the same wherever the manifest lives
    local = tmp_path / "plan.parquet"
    write_manifest(merged, local, PLAN)
    assert digest(url, PLAN) == digest(local, PLAN)


def test_a_failed_write_leaves_the_remote_object_untouched(memory_root, monkeypatch):
    url = f"{memory_root}/manifests/plan.parquet"
    write_manifest(_plan_rows(["b-0"]), url, PLAN)
    before = storage.read_bytes(url)

    def broken(table, where, **kw):
        Path(where).write_bytes(b"PAR1 half a file")
        raise OSError("disk full")

    monkeypatch.setattr(pq, "write_table", broken)
    with pytest.raises(OSError, match="disk full"):
        write_manifest(_plan_rows(["b-0", "b-1"]), url, PLAN)
    assert storage.read_bytes(url) == before
    with pytest.raises(ManifestError, match="duplicate keys"):
        write_manifest(_plan_rows(["b-0", "b-0"]), url, PLAN)
    assert storage.read_bytes(url) == before


def test_a_foreign_manifest_is_refused_on_memory_fs(memory_root):
    url = f"{memory_root}/manifests/seeds.parquet"
    write_manifest(pd.DataFrame({"source_path": ["/x.png"], "status": ["accepted"]}), url, SEEDS)
    with pytest.raises(ManifestError, match="is a seeds manifest, expected plan"):
        read_manifest(url, PLAN)


def test_local_paths_still_return_paths_and_leave_no_temporaries(tmp_path):
    p = tmp_path / "m" / "plan.parquet"
    out = write_manifest(_plan_rows(["b-0"]), str(p), PLAN)
    assert isinstance(out, Path) and out == p
    assert read_manifest(f"file://{p}", PLAN)["sample_key"].tolist() == ["b-0"]
    assert not list(tmp_path.rglob("*.tmp"))


# ---------------------------------------------------------------------------------------------
# a local S3-compatible endpoint (moto's server, from the dev extra), through s3fs


@pytest.fixture
def s3_bucket(monkeypatch):
    pytest.importorskip("s3fs")
    moto_server = pytest.importorskip("moto.server")
    import socket

    import fsspec
    import s3fs

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                 "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)
    # fsspec's per-protocol defaults: every s3:// URL in dermt2im.core.storage reaches the local endpoint
    monkeypatch.setitem(fsspec.config.conf, "s3", {"endpoint_url": f"http://127.0.0.1:{port}", "key": "testing",
                                                   "secret": "testing"})
    s3fs.S3FileSystem.clear_instance_cache()
    bucket = f"dermt2im-{uuid.uuid4().hex[:8]}"
    fs, _ = storage.to_fs(f"s3://{bucket}")
    fs.mkdir(bucket)
    try:
        yield f"s3://{bucket}"
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
        server.stop()


def test_manifests_and_images_on_a_local_s3_endpoint(s3_bucket, monkeypatch):
    url = f"{s3_bucket}/work/manifests/plan.parquet"
    assert read_manifest(url, PLAN).empty
    write_manifest(_plan_rows(["b-0", "b-1"]), url, PLAN)
    merged = upsert(url, _plan_rows(["b-2"], shard=1), PLAN)
    assert merged["sample_key"].tolist() == ["b-0", "b-1", "b-2"]
    assert read_manifest(url, PLAN).equals(merged)

    png = f"{s3_bucket}/work/synthetic/benign/b-0.png"
    storage.atomic_put_bytes(png, b"\x89PNG fake")
    assert storage.exists(png) and storage.read_bytes(png) == b"\x89PNG fake"

    before = storage.read_bytes(url)

    def broken(table, where, **kw):
        Path(where).write_bytes(b"PAR1 half")
        raise OSError("killed mid-write")

    monkeypatch.setattr(pq, "write_table", broken)
    with pytest.raises(OSError):
        write_manifest(_plan_rows(["b-9"]), url, PLAN)
    assert storage.read_bytes(url) == before  # the object is the old one, whole


def test_a_missing_bucket_is_an_error_naming_the_url_and_is_never_created(s3_bucket):
    missing = f"s3://typo-{uuid.uuid4().hex[:8]}"
    with pytest.raises(FileNotFoundError, match=f"cannot write {missing}/m/plan.parquet: .*bucket"):
        write_manifest(_plan_rows(["b-0"]), f"{missing}/m/plan.parquet", PLAN)
    with pytest.raises(FileNotFoundError, match=f"cannot write {missing}/img/a.png"):
        storage.atomic_put_bytes(f"{missing}/img/a.png", b"\x89PNG")
    fs, _ = storage.to_fs(s3_bucket)
    assert missing.removeprefix("s3://") not in fs.ls("", refresh=True)
